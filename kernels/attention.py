r"""Fused bidirectional (non-causal) attention, forward and backward (SPEC 12.2).

Maths
-----
Per (b, h), with q/k/v (L, d), s = scale (default 1/sqrt(d)) and the valid length n = lens[b]:

    S = s Q K^T (keys j >= n masked to -inf),  P = softmax_rows(S),  O = P V     (rows i >= n: O = 0)

Forward (FlashAttention-2): one program per (q-block of BM rows, b*h) keeps its Q tile, an fp32
accumulator (BM, BD), the running max m and sum l in registers, and loops over **all** key blocks below
n with an online softmax; s*log2(e) is folded into the scores so the exponentials are exp2. It stores O
and LSE = m + log2(l) (base 2, fp32). A row with no valid key (n = 0) never enters the loop and is
stored as 0 (l is guarded, so no 0/0 NaN).

Backward (own design, not the Triton tutorial's, whose non-causal gradients are wrong):

    Delta_i = sum_c dO_ic O_ic      P = exp2(s log2e Q K^T - LSE)  (masked -> 0)
    dV = P^T dO    dP = dO V^T    dS = P * (dP - Delta)    dQ = s dS K    dK = s dS^T Q

- dK/dV kernel: one program per key block of BN keys (b*h) keeps K, V, dK, dV tiles and loops over all
  valid q-blocks, recomputing P from LSE. Deterministic, no atomics.
- dQ kernel: one program per q-block loops over the key blocks.
- Delta = rowsum(dO * O) is one torch reduction (fp32).
Rows i >= n get no gradient (their output is the constant 0) and contribute nothing to dK/dV.

Odd head dims (58, 84, 120, 124, ...): tiles are padded to BD = max(16, next_pow2(d)) with masked loads
(other=0) and stores, so the padding columns add 0 to every dot (84 -> 128 wastes 52% of the dot work).
Pointer loads (no TMA: rows of 58/84/124 bf16 are not 16-byte aligned). All offsets are int64.

Memory: O (input dtype) + LSE (B, H, L) fp32 saved for backward; nothing L x L is ever stored.
Dtypes: fp32, bf16, fp16 (fp64: reference). bf16/fp16 dots run in the input dtype with fp32
accumulation on GPU; fp32 dots use IEEE fp32 (NANOSTATE_TF32=1 selects TF32); under the interpreter
everything is fp32 (bf16 arithmetic is broken there, SPEC 12.4).

Limits: L in 1..4096 tested (any L works; the kernels loop), d <= 256.
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
    """The fused Triton kernel (kernels/attention_tl.py), imported on first use: a CPU run that never
    launches a kernel never imports Triton."""
    from .attention_tl import attention_triton as f
    return f(q, k, v, lens=lens, scale=scale)
