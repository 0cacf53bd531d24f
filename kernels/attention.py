r"""Fused bidirectional (non-causal) attention, forward and backward (SPEC 12.2).

Plain-torch reference here; Triton kernels below.
"""
import math

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------
# plain-torch reference

def attention_ref(q, k, v, lens=None, scale=None, upcast=True):
    """softmax(scale q k^T) v over the keys j < lens[b]; rows i >= lens[b] output 0 (and get zero
    gradient); a set with lens == 0 outputs 0, never NaN. q/k/v (B,H,L,d). Uses SDPA."""
    B, H, L, d = q.shape
    dt = q.dtype
    if upcast and dt in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if lens is None:
        o = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return o.to(dt)
    lens = torch.as_tensor(lens, device=q.device).to(torch.int64).reshape(B)
    ar = torch.arange(L, device=q.device)
    # at least one visible key per row so empty sets give finite values; those rows are zeroed below
    kmask = ar[None, :] < lens.clamp_min(1)[:, None]  # (B, L)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=kmask[:, None, None, :], scale=scale)
    qmask = (ar[None, :] < lens[:, None]).to(o.dtype)  # (B, L)
    return (o * qmask[:, None, :, None]).to(dt)


def attention_triton(q, k, v, lens=None, scale=None):
    raise NotImplementedError("the Triton attention kernel lands in the next commit; use attention_ref")
