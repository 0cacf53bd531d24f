"""Attention: reference vs explicit softmax maths (fp64), Triton kernels (interpreted on CPU) vs the
reference for out, dq, dk, dv at odd L and head dims with ragged lens, empty sets, strided inputs,
dispatch, a 20-step training curve. Budget (with test_energy.py): <= 90 s on 2 cores."""
import math

import pytest
import torch

import kernels
from kernels import attention, attention_ref
from kernels.attention import attention_triton

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def _seed_and_impl():
    torch.manual_seed(0)
    prev = kernels.set_impl(None)
    yield
    kernels.set_impl(prev)


def naive(q, k, v, lens=None, scale=None):
    """Explicit masked softmax, loop over sets; rows >= len are 0."""
    B, H, L, d = q.shape
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros_like(q)
    for b in range(B):
        n = L if lens is None else int(lens[b])
        if n == 0:
            continue
        s = (q[b, :, :n] @ k[b, :, :n].transpose(-1, -2)) * scale
        out[b, :, :n] = torch.softmax(s, -1) @ v[b, :, :n]
    return out


def close(a, b, rtol, atol, what):
    err = (a - b).abs()
    ok = bool((err <= atol + rtol * b.abs()).all())
    assert ok, f"{what}: max abs err {err.max().item():.3e}, mean {err.mean().item():.3e}, " \
               f"max |ref| {b.abs().max().item():.3e}"


def fwd_bwd(fn, q, k, v, do, **kw):
    q, k, v = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    o = fn(q, k, v, **kw)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do.to(o.dtype))
    return o.detach(), dq, dk, dv


def qkv(B, H, L, d, dtype=torch.float64, device="cpu"):
    return [torch.randn(B, H, L, d, dtype=dtype, device=device) for _ in range(3)]


# ----------------------------------------------------------------------------------------------------
# reference

@pytest.mark.parametrize("B,H,L,d,ragged", [(2, 2, 7, 5, True), (1, 3, 33, 58, False), (3, 1, 20, 16, True)])
def test_ref_matches_naive(B, H, L, d, ragged):
    q, k, v = qkv(B, H, L, d)
    do = torch.randn_like(q)
    lens = torch.tensor([0, L // 2 + 1, L][:B]) if ragged else None
    r1 = fwd_bwd(attention_ref, q, k, v, do, lens=lens, scale=0.3)
    r2 = fwd_bwd(naive, q, k, v, do, lens=lens, scale=0.3)
    for a, b, name in zip(r1, r2, "o dq dk dv".split()):
        assert torch.isfinite(a).all(), name
        close(a, b, 1e-10, 1e-12, name)


# ----------------------------------------------------------------------------------------------------
# Triton kernels (interpreted on CPU) vs reference

CASES = [  # (B, H, L, d, ragged)
    (2, 2, 1, 58, False),
    (2, 2, 7, 124, True),
    (1, 2, 100, 64, False),
    (2, 1, 129, 84, True),
    (1, 1, 129, 32, False),
    (2, 2, 40, 120, True),
]


@pytest.mark.parametrize("B,H,L,d,ragged", CASES)
def test_triton_matches_ref(B, H, L, d, ragged):
    q, k, v = qkv(B, H, L, d, device=DEV)
    do = torch.randn_like(q)
    lens = torch.tensor([L, max(L // 3, 1)][:B], device=DEV) if ragged else None
    r0 = fwd_bwd(attention_ref, q, k, v, do, lens=lens)  # fp64
    r1 = fwd_bwd(attention_triton, q.float(), k.float(), v.float(), do.float(), lens=lens)
    for a, b, name in zip(r1, r0, "o dq dk dv".split()):
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
        close(a.double(), b, 1e-4, 2e-5, name)
    if ragged:  # padded keys/rows get exactly zero gradient and output
        n = int(lens[1])
        for a, name in zip(r1, "o dq dk dv".split()):
            assert (a[1, :, n:] == 0).all(), name


def test_triton_empty_sets_strided_fp16_scale():
    B, H, L, d = 3, 2, 19, 41
    # (B, L, H, d) storage viewed as (B, H, L, d): non-contiguous strides, as a model's q/k/v are
    q, k, v = [torch.randn(B, L, H, d, device=DEV).transpose(1, 2) for _ in range(3)]
    do = torch.randn(B, H, L, d, device=DEV)
    lens = torch.tensor([0, 5, 19], device=DEV)
    r0 = fwd_bwd(attention_ref, q.double(), k.double(), v.double(), do.double(), lens=lens, scale=0.2)
    r1 = fwd_bwd(attention_triton, q, k, v, do, lens=lens, scale=0.2)
    for a, b, name in zip(r1, r0, "o dq dk dv".split()):
        assert torch.isfinite(a).all(), name
        assert (a[0] == 0).all(), name  # empty set: output 0 and no gradient, no NaN
        close(a.double(), b, 1e-4, 2e-5, name)
    # fp16 storage: compare with the fp64 reference on the same rounded inputs
    qh, kh, vh, doh = q.half(), k.half(), v.half(), do.half()
    r0 = fwd_bwd(attention_ref, qh.double(), kh.double(), vh.double(), doh.double(), lens=lens)
    r1 = fwd_bwd(attention_triton, qh, kh, vh, doh, lens=lens)
    for a, b, name in zip(r1, r0, "o dq dk dv".split()):
        assert a.dtype == torch.float16, name
        close(a.double(), b, 2e-3, 2e-3, f"fp16 {name}")


def test_dispatch(monkeypatch):
    q, k, v = qkv(1, 1, 5, 8, dtype=torch.float32, device=DEV)
    ref = attention_ref(q, k, v)
    kernels.set_impl("triton")
    close(attention(q, k, v), ref, 1e-5, 1e-6, "forced triton")
    kernels.set_impl(None)
    if not CUDA:  # CPU default is the reference, never the interpreter
        monkeypatch.setattr(kernels, "attention_triton", lambda *a, **kw: 1 / 0)
        close(attention(q, k, v), ref, 0, 0, "cpu default")


def test_training_curve_triton_matches_ref():
    """20 Adam steps of a one-layer self-attention regressor with ragged sets: interpreted kernel
    curve equals the reference curve."""
    B, L, G, H, d = 2, 12, 8, 1, 12

    def run(impl):
        torch.manual_seed(0)
        qkv_proj = torch.nn.Linear(G, 3 * H * d).to(DEV)
        out_proj = torch.nn.Linear(H * d, G).to(DEV)
        params = list(qkv_proj.parameters()) + list(out_proj.parameters())
        opt = torch.optim.Adam(params, lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(B, L, G, generator=gen).to(DEV)
        tgt = (x.mean(1, keepdim=True) * 2 - x).to(DEV)  # needs attention across the set
        lens = torch.tensor([L, 7], device=DEV)
        valid = (torch.arange(L, device=DEV)[None, :] < lens[:, None]).float()[:, :, None]
        kernels.set_impl(impl)
        losses = []
        for _ in range(20):
            q, k, v = qkv_proj(x).view(B, L, 3, H, d).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, d)
            o = attention(q, k, v, lens=lens).transpose(1, 2).reshape(B, L, H * d)
            loss = (((out_proj(o) - tgt) ** 2) * valid).sum() / valid.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        kernels.set_impl(None)
        return torch.tensor(losses)

    ref, tri = run("ref"), run("triton")
    assert ref[-1] < 0.8 * ref[0], f"loss did not go down: {ref.tolist()}"
    close(tri, ref, 1e-4, 1e-6, "loss curve")


# ----------------------------------------------------------------------------------------------------
# GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("B,H,L,d", [(16, 12, 513, 64), (16, 8, 257, 58), (4, 8, 2049, 128), (2, 4, 4096, 124)])
def test_gpu_full_shapes_and_bf16_rule(B, H, L, d):
    q, k, v = qkv(B, H, L, d, dtype=torch.float32, device="cuda")
    do = torch.randn_like(q)
    lens = torch.randint(1, L + 1, (B,), device="cuda")
    r0 = fwd_bwd(attention_ref, q.double(), k.double(), v.double(), do.double(), lens=lens)
    r1 = fwd_bwd(attention_triton, q, k, v, do, lens=lens)
    for a, b, name in zip(r1, r0, "o dq dk dv".split()):
        close(a.double(), b, 1e-3, 1e-4, f"fp32 {name}")
    # bf16 (flash-attn rule): kernel error vs fp64 <= 2x torch's own bf16 error
    qb, kb, vb, dob = q.bfloat16(), k.bfloat16(), v.bfloat16(), do.bfloat16()
    r0 = fwd_bwd(attention_ref, qb.double(), kb.double(), vb.double(), dob.double(), lens=lens)
    rt = fwd_bwd(attention_ref, qb, kb, vb, dob, lens=lens, upcast=False)
    rk = fwd_bwd(attention_triton, qb, kb, vb, dob, lens=lens)
    for a, t, b, name in zip(rk, rt, r0, "o dq dk dv".split()):
        ek = (a.double() - b).abs().max().item()
        et = (t.double() - b).abs().max().item()
        assert ek <= 2 * et + 1e-5, f"bf16 {name}: kernel {ek:.3e} vs torch {et:.3e}"
