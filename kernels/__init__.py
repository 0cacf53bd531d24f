"""Kernels: fused energy distance and bidirectional attention, each with its plain-torch reference.

Dispatch (SPEC 12, 14.9):
- Triton on CUDA tensors;
- the plain-torch reference on CPU tensors (it is also the CPU training path, tuned for speed/memory);
- `set_impl("triton")` forces the Triton kernels (on CPU this needs `TRITON_INTERPRET=1` set before
  `kernels` is imported: the tests' conftest does it), `set_impl("ref")` forces the references,
  `set_impl(None)` restores the default.
Nothing here queries the GPU driver at import time.
"""
import os

from .attention import attention_ref, attention_triton
from .energy import energy_ref, energy_triton

_override_impl = None  # None | "triton" | "ref"


def set_impl(impl):
    """Force a path for every later call: None (auto), "triton" or "ref". Returns the previous value."""
    global _override_impl
    if impl not in (None, "triton", "ref"):
        raise ValueError(f"impl must be None, 'triton' or 'ref', got {impl!r}")
    prev, _override_impl = _override_impl, impl
    return prev


def get_impl():
    return _override_impl


def interpreted():
    """True when Triton kernels run under the CPU interpreter (flag read when @triton.jit decorates)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _use_triton(t):
    if _override_impl == "ref":
        return False
    if _override_impl == "triton":
        if not t.is_cuda and not interpreted():
            raise RuntimeError("set_impl('triton') on CPU tensors needs TRITON_INTERPRET=1 set before "
                               "importing kernels")
        return True
    return t.is_cuda


def attention(q, k, v, lens=None, scale=None):
    """Non-causal attention, q/k/v (B,H,L,d); `lens` (B,) masks keys >= len and zeroes rows >= len."""
    if _use_triton(q):
        return attention_triton(q, k, v, lens=lens, scale=scale)
    return attention_ref(q, k, v, lens=lens, scale=scale)


def energy_distance(x, y, n_x=None, n_y=None, scale=0.5, statistic="v"):
    """Energy distance per set, x (B,N,D) predictions, y (B,M,D) targets -> (B,) (see kernels/energy.py)."""
    if _use_triton(x):
        return energy_triton(x, y, n_x=n_x, n_y=n_y, scale=scale, statistic=statistic)
    return energy_ref(x, y, n_x=n_x, n_y=n_y, scale=scale, statistic=statistic)


__all__ = ["attention", "energy_distance", "attention_ref", "energy_ref", "set_impl", "get_impl",
           "interpreted"]
