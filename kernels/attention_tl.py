"""Triton kernels of kernels/attention.py (see its docstring); imported only when a kernel is launched."""
import math
import os

import torch
import triton
import triton.language as tl

from .attention import attention_ref


# ----------------------------------------------------------------------------------------------------
# Triton kernels

LOG2E = 1.4426950408889634
_F32_DOT = "tf32" if os.environ.get("NANOSTATE_TF32", "0") == "1" else "ieee"


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, LENS,
                     sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
                     sob, soh, sol, sod, H, L, d, qk_scale,
                     BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    n = tl.load(LENS + b)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < d
    rmask = offs_m < n
    qm = rmask[:, None] & dmask[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sql + offs_d[None, :] * sqd,
                mask=qm, other=0.0).to(DOT_DTYPE)
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    kv_end = tl.where(pid_m * BM < n, n, 0)  # q-blocks that are all padding skip the loop
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    for j0 in range(0, kv_end, BN):
        offs_n = j0 + tl.arange(0, BN)
        cmask = offs_n < n
        km = cmask[:, None] & dmask[None, :]
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * skl + offs_d[None, :] * skd,
                    mask=km, other=0.0).to(DOT_DTYPE)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svl + offs_d[None, :] * svd,
                    mask=km, other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (BM, BN), log2 units
        s = tl.where(cmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PREC)
        m_i = m_new
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    o = tl.where(rmask[:, None], o, 0.0)
    om = (offs_m < L)[:, None] & dmask[None, :]
    tl.store(O + b * sob + h * soh + offs_m[:, None].to(tl.int64) * sol + offs_d[None, :] * sod,
             o.to(O.dtype.element_ty), mask=om)
    lse = tl.where(rmask & (l_i > 0.0), m_i + tl.math.log2(l_safe), 0.0)
    tl.store(LSE + bh * L + offs_m, lse, mask=offs_m < L)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, LENS,
                          sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
                          sdob, sdoh, sdol, sdod, H, L, d, qk_scale, sm_scale,
                          BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                          DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
    """One program per key block: dV = P^T dO, dK = s dS^T Q over all valid q-blocks."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    n = tl.load(LENS + b)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < d
    cmask = offs_n < n
    km = cmask[:, None] & dmask[None, :]
    k = tl.load(K + b * skb + h * skh + offs_n[:, None].to(tl.int64) * skl + offs_d[None, :] * skd,
                mask=km, other=0.0).to(DOT_DTYPE)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None].to(tl.int64) * svl + offs_d[None, :] * svd,
                mask=km, other=0.0).to(DOT_DTYPE)
    dk = tl.zeros((BN, BD), dtype=tl.float32)
    dv = tl.zeros((BN, BD), dtype=tl.float32)
    q_end = tl.where(pid_n * BN < n, n, 0)  # padding keys: nothing to accumulate
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    for i0 in range(0, q_end, BM):
        offs_m = i0 + tl.arange(0, BM)
        rmask = offs_m < n
        qm = rmask[:, None] & dmask[None, :]
        q = tl.load(q_base + offs_m[:, None].to(tl.int64) * sql + offs_d[None, :] * sqd,
                    mask=qm, other=0.0).to(DOT_DTYPE)
        do = tl.load(do_base + offs_m[:, None].to(tl.int64) * sdol + offs_d[None, :] * sdod,
                     mask=qm, other=0.0).to(DOT_DTYPE)
        lse = tl.load(LSE + bh * L + offs_m, mask=rmask, other=0.0)
        delta = tl.load(DELTA + bh * L + offs_m, mask=rmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (BM, BN)
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(rmask[:, None] & cmask[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(DOT_DTYPE)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(DOT_DTYPE)), q, input_precision=PREC)
    dk = dk * sm_scale
    sm = (offs_n < L)[:, None] & dmask[None, :]
    off = bh * L * d + offs_n[:, None].to(tl.int64) * d + offs_d[None, :]  # DK/DV contiguous (B,H,L,d)
    tl.store(DK + off, dk.to(DK.dtype.element_ty), mask=sm)
    tl.store(DV + off, dv.to(DV.dtype.element_ty), mask=sm)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, LENS,
                        sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
                        sdob, sdoh, sdol, sdod, H, L, d, qk_scale, sm_scale,
                        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
    """One program per q-block: dQ = s dS K over all valid key blocks."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    n = tl.load(LENS + b)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < d
    rmask = offs_m < n
    qm = rmask[:, None] & dmask[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sql + offs_d[None, :] * sqd,
                mask=qm, other=0.0).to(DOT_DTYPE)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None].to(tl.int64) * sdol + offs_d[None, :] * sdod,
                 mask=qm, other=0.0).to(DOT_DTYPE)
    lse = tl.load(LSE + bh * L + offs_m, mask=rmask, other=0.0)
    delta = tl.load(DELTA + bh * L + offs_m, mask=rmask, other=0.0)
    dq = tl.zeros((BM, BD), dtype=tl.float32)
    kv_end = tl.where(pid_m * BM < n, n, 0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    for j0 in range(0, kv_end, BN):
        offs_n = j0 + tl.arange(0, BN)
        cmask = offs_n < n
        km = cmask[:, None] & dmask[None, :]
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * skl + offs_d[None, :] * skd,
                    mask=km, other=0.0).to(DOT_DTYPE)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svl + offs_d[None, :] * svd,
                    mask=km, other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(rmask[:, None] & cmask[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(DOT_DTYPE), k, input_precision=PREC)
    dq = dq * sm_scale
    sm = (offs_m < L)[:, None] & dmask[None, :]
    off = bh * L * d + offs_m[:, None].to(tl.int64) * d + offs_d[None, :]  # DQ contiguous (B,H,L,d)
    tl.store(DQ + off, dq.to(DQ.dtype.element_ty), mask=sm)


# ----------------------------------------------------------------------------------------------------
# launchers

def _interp():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _dot_dtype(dt):
    if _interp():
        return tl.float32  # bf16 arithmetic is broken in the interpreter (SPEC 12.4)
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(dt, tl.float32)


def _blocks(L, BD, bwd, dtype):
    """(BM, BN, num_warps). Hand-picked, not timed: no GPU was available when this was written; they
    compile for sm_90 without register spills (checked with Triton's ptxas, see dev/LOG.md).
    fp32 inputs take IEEE fp32 dots (FMA, no tensor cores): small tiles, it is the correctness path."""
    if _interp():
        return 32, 32, 4
    if dtype == torch.float32:
        return (32, 32, 4) if BD <= 64 else (16, 32, 4)
    if bwd:
        return (64, 64, 8) if BD <= 64 else (32, 64, 8) if BD <= 128 else (32, 32, 8)
    return (128, 64, 4) if BD <= 64 else (128, 64, 8) if BD <= 128 else (64, 32, 8)


def _lens(lens, B, L, device):
    if lens is None:
        return torch.full((B,), L, dtype=torch.int32, device=device)
    return torch.as_tensor(lens, device=device).reshape(B).clamp(0, L).to(torch.int32)


def _attn_fwd(q, k, v, n, scale):
    B, H, L, d = q.shape
    BD = max(16, triton.next_power_of_2(d))
    BM, BN, warps = _blocks(L, BD, False, q.dtype)
    o = torch.empty_like(q)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    _attn_fwd_kernel[(triton.cdiv(L, BM), B * H)](
        q, k, v, o, lse, n, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, L, d, scale * LOG2E, BM=BM, BN=BN, BD=BD, DOT_DTYPE=_dot_dtype(q.dtype), PREC=_F32_DOT,
        num_warps=warps)
    return o, lse


def _attn_bwd(q, k, v, o, lse, do, n, scale):
    B, H, L, d = q.shape
    BD = max(16, triton.next_power_of_2(d))
    BM, BN, warps = _blocks(L, BD, True, q.dtype)
    delta = (do.float() * o.float()).sum(-1).contiguous()  # (B, H, L) fp32, D_i = rowsum(dO*O)
    dq = torch.empty((B, H, L, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, L, d), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, L, d), dtype=v.dtype, device=q.device)
    args = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), H, L, d, scale * LOG2E, scale)
    kw = dict(BM=BM, BN=BN, BD=BD, DOT_DTYPE=_dot_dtype(q.dtype), PREC=_F32_DOT, num_warps=warps)
    _attn_bwd_dkdv_kernel[(triton.cdiv(L, BN), B * H)](q, k, v, do, lse, delta, dk, dv, n, *args, **kw)
    _attn_bwd_dq_kernel[(triton.cdiv(L, BM), B * H)](q, k, v, do, lse, delta, dq, n, *args, **kw)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# autograd

class _AttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, n, scale):
        o, lse = _attn_fwd(q, k, v, n, scale)
        ctx.save_for_backward(q, k, v, o, lse, n)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, n = ctx.saved_tensors
        dq, dk, dv = _attn_bwd(q, k, v, o, lse, do, n, ctx.scale)
        return dq, dk, dv, None, None


# ----------------------------------------------------------------------------------------------------
# public

def attention_triton(q, k, v, lens=None, scale=None):
    """Fused Triton attention, q/k/v (B,H,L,d) -> (B,H,L,d); fp64 goes to `attention_ref`."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"need q, k, v of one shape (B,H,L,d), got {q.shape}, {k.shape}, {v.shape}")
    if q.dtype == torch.float64:
        return attention_ref(q, k, v, lens=lens, scale=scale)
    B, H, L, d = q.shape
    if d > 256:
        raise ValueError(f"head dim {d} > 256 is not supported by the Triton kernel")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    n = _lens(lens, B, L, q.device)
    return _AttentionTriton.apply(q, k, v, n, scale)
