"""Triton kernels of kernels/energy.py (see its docstring); imported only when a kernel is launched."""
import os

import torch
import triton
import triton.language as tl

from .energy import energy_ref


# ----------------------------------------------------------------------------------------------------
# Triton kernels
#
# Both plans read x and y once per use straight from their (possibly strided, bf16) storage, subtract
# the centre c (B, D) (mean of the valid rows of y, fp32, computed by torch) after the load, round to
# the dot dtype (bf16/fp16 inputs: their own dtype on GPU; fp32 otherwise, and always fp32 under the
# interpreter, where bf16 arithmetic is broken), and take the squared norms from those same rounded
# operands, so d^2 = |a|^2 + |b|^2 - 2 a.b is consistent and its diagonal cancels as well as it can.
# The diagonal of the X-X and Y-Y blocks is then masked exactly; pairs with d^2 <= 1e-8 get weight 0.
#
# Plan A (D <= 256): one program per (i-block of BN rows of a set A, b). A's tile (BN, BD) stays in
#   registers; the program loops over the j-blocks of P (the other set) and of A itself; each loaded
#   tile serves both dots (Gram, then weights @ tile). One fp32 accumulator (BN, BD) holds
#   sum_j k w_ij (-p_j) terms and a (BN,) vector the row sums, so dA = rowcoef * a + acc at the end.
#   Launched twice: A = X (against Y and X, writes dX) and A = Y (against Y only, value only).
#   Registers ~ 3 BN BD fp32 + the (BN, BM) pair tile.
# Plan B (D > 256): one program per (i-block, j-block, b) of each of the three blocks loops over D in
#   BK chunks for the Gram tile and the norms, then writes the scaled weights k w (fp32) to W (B,N,M)
#   or V (B,N,N) (Y-Y writes nothing); dX = diag(W1 - V1) Xc - W Yc + V Xc is then two batched GEMMs
#   in torch (cuBLAS). W is 16 MiB at B16/N512, less than X (62 MiB fp32 at D 2000).
# Loss partials go to a per-program buffer (deterministic), summed by torch; no host sync anywhere.

_F32_DOT = "tf32" if os.environ.get("NANOSTATE_TF32", "0") == "1" else "ieee"


@triton.jit
def _energy_rows_kernel(A, P, C, LA, LP, DA, PART,
                        sab, san, sad, spb, spn, spd, scb, sdb, sdn, sdd,
                        NA, D, n_prog, scale,
                        TERM_P: tl.constexpr, NEED_GRAD: tl.constexpr, U_STAT: tl.constexpr,
                        BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
    """Plan A: rows [pid*BN, pid*BN+BN) of set A (b) vs set P (cross term) and vs A (diag term)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    na = tl.load(LA + b)
    offs_n = pid * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    rmask = offs_n < na
    c = tl.load(C + b * scb + offs_d, mask=dmask, other=0.0)  # (BD,) fp32 centre
    a_ptr = A + b * sab + offs_n[:, None].to(tl.int64) * san + offs_d[None, :] * sad
    amask = rmask[:, None] & dmask[None, :]
    a = tl.where(amask, tl.load(a_ptr, mask=amask, other=0.0).to(tl.float32) - c[None, :], 0.0)
    a_dot = a.to(DOT_DTYPE)
    a = a_dot.to(tl.float32)
    aa = tl.sum(a * a, 1)  # (BN,) norms of the rounded operand
    na_f = na.to(tl.float32)
    acc = tl.zeros((BN, BD), dtype=tl.float32)
    rowcoef = tl.zeros((BN,), dtype=tl.float32)
    s_p = tl.zeros((BN,), dtype=tl.float32)
    s_a = tl.zeros((BN,), dtype=tl.float32)
    n_p = na
    if TERM_P:
        n_p = tl.load(LP + b)
    np_f = n_p.to(tl.float32)
    # gradient coefficients: 2 scale/(n m) for the cross term, 2 scale/n^2 (or n(n-1)) for the self term
    k_p = 2.0 * scale / tl.maximum(na_f * np_f, 1.0)
    if U_STAT:
        k_a = tl.where(na_f > 1.0, 2.0 * scale / tl.maximum(na_f * (na_f - 1.0), 1.0), 0.0)
    else:
        k_a = 2.0 * scale / tl.maximum(na_f * na_f, 1.0)
    k_a = tl.where(np_f > 0.0, k_a, 0.0)  # empty partner set: value NaN, gradient 0
    if TERM_P:
        for j0 in range(0, n_p, BM):
            offs_m = j0 + tl.arange(0, BM)
            cmask = offs_m < n_p
            pmask = cmask[:, None] & dmask[None, :]
            p_ptr = P + b * spb + offs_m[:, None].to(tl.int64) * spn + offs_d[None, :] * spd
            p = tl.where(pmask, tl.load(p_ptr, mask=pmask, other=0.0).to(tl.float32) - c[None, :], 0.0)
            p_dot = p.to(DOT_DTYPE)
            p = p_dot.to(tl.float32)
            pp = tl.sum(p * p, 1)
            g = tl.dot(a_dot, tl.trans(p_dot), input_precision=PREC)  # (BN, BM) fp32
            d2 = tl.maximum(aa[:, None] + pp[None, :] - 2.0 * g, 0.0)
            valid = rmask[:, None] & cmask[None, :]
            d2c = tl.maximum(d2, 1e-8)
            r = tl.math.rsqrt(d2c)
            s_p += tl.sum(tl.where(valid, d2c * r, 0.0), 1)
            if NEED_GRAD:
                w = tl.where(valid & (d2 > 1e-8), r, 0.0) * k_p
                rowcoef += tl.sum(w, 1)
                acc -= tl.dot(w, p, input_precision=PREC)
    for j0 in range(0, na, BM):
        offs_m = j0 + tl.arange(0, BM)
        cmask = offs_m < na
        qmask = cmask[:, None] & dmask[None, :]
        q_ptr = A + b * sab + offs_m[:, None].to(tl.int64) * san + offs_d[None, :] * sad
        q = tl.where(qmask, tl.load(q_ptr, mask=qmask, other=0.0).to(tl.float32) - c[None, :], 0.0)
        q_dot = q.to(DOT_DTYPE)
        q = q_dot.to(tl.float32)
        qq = tl.sum(q * q, 1)
        g = tl.dot(a_dot, tl.trans(q_dot), input_precision=PREC)
        d2 = tl.maximum(aa[:, None] + qq[None, :] - 2.0 * g, 0.0)
        valid = rmask[:, None] & cmask[None, :] & (offs_n[:, None] != offs_m[None, :])
        d2c = tl.maximum(d2, 1e-8)
        r = tl.math.rsqrt(d2c)
        s_a += tl.sum(tl.where(valid, d2c * r, 0.0), 1)
        if NEED_GRAD:
            w = tl.where(valid & (d2 > 1e-8), r, 0.0) * k_a
            rowcoef -= tl.sum(w, 1)
            acc += tl.dot(w, q, input_precision=PREC)
    if NEED_GRAD:
        da = rowcoef[:, None] * a + acc
        smask = (offs_n < NA)[:, None] & dmask[None, :]
        d_ptr = DA + b * sdb + offs_n[:, None].to(tl.int64) * sdn + offs_d[None, :] * sdd
        tl.store(d_ptr, da, mask=smask)
    part = PART + (b * n_prog + pid) * 2
    tl.store(part, tl.sum(s_p, 0))
    tl.store(part + 1, tl.sum(s_a, 0))


@triton.jit
def _energy_tile_kernel(A, P, C, LA, LP, W, PART,
                        sab, san, sad, spb, spn, spd, scb, swb, swn, swm,
                        NA, NP, D, n_pm, coef, U_STAT: tl.constexpr,
                        DIAG: tl.constexpr, WRITE_W: tl.constexpr,
                        BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
    """Plan B: one (BN, BM) tile of the distances between set A and set P (P = A when DIAG), Gram over
    D in BK chunks; writes coef k w_ij (fp32) to W and the tile's distance sum to PART."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    na = tl.load(LA + b)
    n_p = tl.load(LP + b)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = pid_m * BM + tl.arange(0, BM)
    rmask = offs_n < na
    cmask = offs_m < n_p
    g = tl.zeros((BN, BM), dtype=tl.float32)
    aa = tl.zeros((BN,), dtype=tl.float32)
    pp = tl.zeros((BM,), dtype=tl.float32)
    nk = tl.where((pid_n * BN < na) & (pid_m * BM < n_p), D, 0)  # skip tiles that are all padding
    for k0 in range(0, nk, BK):
        offs_k = k0 + tl.arange(0, BK)
        kmask = offs_k < D
        c = tl.load(C + b * scb + offs_k, mask=kmask, other=0.0)
        am = rmask[:, None] & kmask[None, :]
        a = tl.load(A + b * sab + offs_n[:, None].to(tl.int64) * san + offs_k[None, :] * sad,
                    mask=am, other=0.0).to(tl.float32)
        a_dot = tl.where(am, a - c[None, :], 0.0).to(DOT_DTYPE)
        pm = cmask[:, None] & kmask[None, :]
        p = tl.load(P + b * spb + offs_m[:, None].to(tl.int64) * spn + offs_k[None, :] * spd,
                    mask=pm, other=0.0).to(tl.float32)
        p_dot = tl.where(pm, p - c[None, :], 0.0).to(DOT_DTYPE)
        a32 = a_dot.to(tl.float32)
        p32 = p_dot.to(tl.float32)
        aa += tl.sum(a32 * a32, 1)
        pp += tl.sum(p32 * p32, 1)
        g = tl.dot(a_dot, tl.trans(p_dot), g, input_precision=PREC)
    d2 = tl.maximum(aa[:, None] + pp[None, :] - 2.0 * g, 0.0)
    valid = rmask[:, None] & cmask[None, :]
    if DIAG:
        valid = valid & (offs_n[:, None] != offs_m[None, :])
    d2c = tl.maximum(d2, 1e-8)
    r = tl.math.rsqrt(d2c)
    tl.store(PART + (b * tl.num_programs(0) + pid_n) * n_pm + pid_m,
             tl.sum(tl.sum(tl.where(valid, d2c * r, 0.0), 1), 0))
    if WRITE_W:
        na_f = na.to(tl.float32)
        np_f = n_p.to(tl.float32)
        if DIAG:
            if U_STAT:
                k = tl.where(na_f > 1.0, coef / tl.maximum(na_f * (na_f - 1.0), 1.0), 0.0)
            else:
                k = coef / tl.maximum(na_f * na_f, 1.0)
        else:
            k = coef / tl.maximum(na_f * np_f, 1.0)
        w = tl.where(valid & (d2 > 1e-8), r, 0.0) * k
        wm = (offs_n < NA)[:, None] & (offs_m < NP)[None, :]
        tl.store(W + b * swb + offs_n[:, None].to(tl.int64) * swn + offs_m[None, :] * swm, w, mask=wm)


# ----------------------------------------------------------------------------------------------------
# launchers

PLAN_A_MAX_D = 256


def _interp():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _dot_dtype(dt):
    if _interp():
        return tl.float32  # bf16 arithmetic is broken in the interpreter (SPEC 12.4)
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(dt, tl.float32)


def _plan_a_blocks(D, dtype):
    """(BN, BM, BD, num_warps) for plan A. Hand-picked, untimed (no GPU when written)."""
    BD = max(16, triton.next_power_of_2(D))
    if _interp():
        return 32, 32, BD, 4
    if dtype == torch.float32:  # IEEE fp32 dots run on FMA units: small tiles
        return (32, 32, BD, 4) if BD <= 64 else (16, 32, BD, 4) if BD <= 128 else (16, 32, BD, 8)
    return (64, 64, BD, 4) if BD <= 64 else (32, 64, BD, 8) if BD <= 128 else (16, 32, BD, 8)


def _plan_b_blocks(D, dtype):
    """(BN, BM, BK, num_warps) for plan B. Hand-picked, untimed (no GPU when written)."""
    if _interp():
        return 32, 32, 32, 4
    if dtype == torch.float32:
        return 32, 32, 32, 4
    return 64, 64, 64, 8


def _lengths(n, size, B, device):
    if n is None:
        return torch.full((B,), size, dtype=torch.int32, device=device)
    return torch.as_tensor(n, device=device).reshape(B).clamp(0, size).to(torch.int32)


def _centre(y, ny_i32):
    """Mean of the valid rows of y, (B, D) fp32 (0 for an empty set)."""
    B, M, _ = y.shape
    yv = y.float()
    valid = torch.arange(M, device=y.device)[None, :] < ny_i32[:, None]
    s = (yv * valid[:, :, None]).sum(1)
    return s / ny_i32.clamp_min(1).to(torch.float32)[:, None]


def _energy_fwd_triton(x, y, n_x, n_y, scale, statistic, need_dx):
    """Returns (value (B,) fp32, dX (B,N,D) fp32 or None)."""
    B, N, D = x.shape
    M = y.shape[1]
    dev = x.device
    nx = _lengths(n_x, N, B, dev)
    ny = _lengths(n_y, M, B, dev)
    c = _centre(y, ny).contiguous()
    u = statistic == "u"
    dd = _dot_dtype(x.dtype)
    interp = _interp()
    if D <= PLAN_A_MAX_D:
        BN, BM, BD, warps = _plan_a_blocks(D, x.dtype)
        dx = torch.empty((B, N, D), dtype=torch.float32, device=dev) if need_dx else x.new_empty(1)
        nbx = triton.cdiv(N, BN)
        part_x = torch.empty((B, nbx, 2), dtype=torch.float32, device=dev)
        sdx = dx.stride() if need_dx else (0, 0, 0)
        _energy_rows_kernel[(nbx, B)](
            x, y, c, nx, ny, dx, part_x,
            *x.stride(), *y.stride(), c.stride(0), *sdx,
            N, D, nbx, float(scale),
            TERM_P=True, NEED_GRAD=need_dx, U_STAT=u, BN=BN, BM=BM, BD=BD,
            DOT_DTYPE=dd, PREC=_F32_DOT, num_warps=warps)
        nby = triton.cdiv(M, BN)
        part_y = torch.empty((B, nby, 2), dtype=torch.float32, device=dev)
        _energy_rows_kernel[(nby, B)](
            y, y, c, ny, ny, part_y, part_y,
            *y.stride(), *y.stride(), c.stride(0), 0, 0, 0,
            M, D, nby, float(scale),
            TERM_P=False, NEED_GRAD=False, U_STAT=u, BN=BN, BM=BM, BD=BD,
            DOT_DTYPE=dd, PREC=_F32_DOT, num_warps=warps)
        s_xy = part_x[:, :, 0].sum(1)
        s_xx = part_x[:, :, 1].sum(1)
        s_yy = part_y[:, :, 1].sum(1)
    else:
        BN, BM, BK, warps = _plan_b_blocks(D, x.dtype)

        def tiles(a, na, p, npl, NA, NP, diag, w):
            gn, gm = triton.cdiv(NA, BN), triton.cdiv(NP, BM)
            part = torch.empty((B, gn, gm), dtype=torch.float32, device=dev)
            sw = w.stride() if w is not None else (0, 0, 0)
            _energy_tile_kernel[(gn, gm, B)](
                a, p, c, na, npl, w if w is not None else part, part,
                *a.stride(), *p.stride(), c.stride(0), *sw,
                NA, NP, D, gm, 2.0 * float(scale), U_STAT=u, DIAG=diag, WRITE_W=w is not None,
                BN=BN, BM=BM, BK=BK, DOT_DTYPE=dd, PREC=_F32_DOT, num_warps=warps)
            return part.sum((1, 2))

        Wm = torch.empty((B, N, M), dtype=torch.float32, device=dev) if need_dx else None
        Vm = torch.empty((B, N, N), dtype=torch.float32, device=dev) if need_dx else None
        s_xy = tiles(x, nx, y, ny, N, M, False, Wm)
        s_xx = tiles(x, nx, x, nx, N, N, True, Vm)
        s_yy = tiles(y, ny, y, ny, M, M, True, None)
        dx = None
        if need_dx:
            xc = x.float() - c[:, None, :]
            yc = y.float() - c[:, None, :]
            if n_x is not None:
                xc.masked_fill_(~(torch.arange(N, device=dev)[None, :] < nx[:, None])[:, :, None], 0.0)
            if n_y is not None:
                yc.masked_fill_(~(torch.arange(M, device=dev)[None, :] < ny[:, None])[:, :, None], 0.0)
            empty_y = (ny == 0).to(torch.float32)[:, None, None]
            Vm.mul_(1.0 - empty_y)  # empty partner set: gradient 0
            dx = xc * (Wm.sum(-1) - Vm.sum(-1))[:, :, None]
            dx.baddbmm_(Wm, yc, alpha=-1.0)
            dx.baddbmm_(Vm, xc)
    nf = nx.to(torch.float32)
    mf = ny.to(torch.float32)
    n1, m1 = nf.clamp_min(1), mf.clamp_min(1)
    if u:
        cxx = torch.where(nf > 1, 1.0 / (n1 * (n1 - 1).clamp_min(1)), torch.zeros_like(nf))
        cyy = torch.where(mf > 1, 1.0 / (m1 * (m1 - 1).clamp_min(1)), torch.zeros_like(mf))
    else:
        cxx, cyy = 1.0 / (n1 * n1), 1.0 / (m1 * m1)
    val = scale * (2.0 * s_xy / (n1 * m1) - cxx * s_xx - cyy * s_yy)
    val = torch.where((nf == 0) | (mf == 0), torch.full_like(val, float("nan")), val)
    return val, (dx if need_dx else None)


# ----------------------------------------------------------------------------------------------------
# autograd

class _EnergyTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, n_x, n_y, scale, statistic):
        val, dx = _energy_fwd_triton(x, y, n_x, n_y, scale, statistic, ctx.needs_input_grad[0])
        ctx.save_for_backward(dx)
        ctx.x_dtype = x.dtype
        return val

    @staticmethod
    def backward(ctx, g):
        (dx,) = ctx.saved_tensors
        gx = None
        if dx is not None:
            gx = (dx * g.to(dx.dtype)[:, None, None]).to(ctx.x_dtype)  # no host sync
        return gx, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# public

def energy_triton(x, y, n_x=None, n_y=None, scale=0.5, statistic="v"):
    """Fused Triton energy distance per set (B,) fp32; value + dX in one pass. Falls back to
    `energy_ref` for what the kernel does not do: fp64 inputs, or y needing a gradient."""
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"need x (B,N,D) and y (B,M,D), got {tuple(x.shape)} and {tuple(y.shape)}")
    if statistic not in ("v", "u"):
        raise ValueError(f"statistic must be 'v' or 'u', got {statistic!r}")
    if x.dtype == torch.float64 or y.requires_grad:
        return energy_ref(x, y, n_x, n_y, scale, statistic)
    return _EnergyTriton.apply(x, y, n_x, n_y, float(scale), statistic)
