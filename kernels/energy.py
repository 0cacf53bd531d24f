r"""Energy distance between sets of cells: value and gradient in one pass (SPEC 4, 12.1).

Maths
-----
For a predicted set X = {x_i}, i < N, and an observed set Y = {y_j}, j < M (per batch element b):

    E_V = 2/(NM) sum_ij |x_i - y_j| - 1/N^2 sum_ii' |x_i - x_i'| - 1/M^2 sum_jj' |y_j - y_j'|

`energy_distance(..., scale=0.5, statistic="v")` returns scale * E_V per set: 0.5 * E_V is the
reference code's geomloss SamplesLoss("energy") value minus its constant 5e-5 (1/N + 1/M) (geomloss
clamps the N + M self-pair distances to 1e-4; we mask the diagonal to exactly 0 and drop the constant).
`statistic="u"` divides the within-set sums (i != i') by N(N-1) and M(M-1) instead (0 when a set has one
point). Pairs with d^2 <= 1e-8 (duplicates; predictions are often duplicated because controls are drawn
with replacement) keep the geomloss value sqrt(1e-8) off the diagonal but get weight 0 in the gradient,
as geomloss' clamp_min does.

Gradient (Y is data; X is the prediction), with w_ij = 1/|x_i - y_j|, v_ii' = 1/|x_i - x_i'| (0 on the
diagonal and wherever d^2 <= 1e-8):

    dX = 2 scale [ (diag(W 1) X - W Y)/(NM) - (diag(V 1) X - V X)/N^2 ]        (N^2 -> N(N-1) for "u")

Distances come from Gram products, d^2 = |x|^2 + |y|^2 - 2 x.y, so all the work is five batched GEMMs
(XY^T, XX^T, YY^T for the value, W Y and V X for dX) plus a per-pair epilogue (sqrt, reciprocal, masks).
The Gram trick cancels badly when the points sit far from the origin (|mean|/spread = 40 loses 3 digits
in fp32, 2 in bf16), so both sets are first **centred** on the mean of Y (E is translation invariant and
the centre carries no gradient), and everything accumulates in fp32.

Gradient in forward (the Liger pattern): the pairwise weights are live in the forward, so dX is written
there and saved; backward only multiplies it by grad_output[b] (no host sync). When x needs no grad,
dX is skipped. Only dX (size of x) is kept for backward, never the N x M matrices.

Ragged sets: n_x, n_y (B,) give the valid rows of each set; padded rows get no value and zero gradient;
a set with n_x == 0 or n_y == 0 has value NaN (the caller takes a nanmean over sets) and zero gradient.

Plain-torch reference (`energy_ref`)
------------------------------------
Also the CPU training path. It is a custom autograd.Function computing the same closed-form gradient
with in-place epilogues, a chunk of sets at a time (about 16 MiB of centred copies and pair matrices
per chunk), writing dX straight into the buffer saved for backward: peak extra memory is dX plus one
chunk, versus geomloss' autograd through its distance matrices (which saves them for backward).

Triton kernels (`energy_triton`)
--------------------------------
See the section above the kernels for the tiling and memory plans (A: registers for small D;
B: W/V matrices + GEMMs for D ~ 2000).

Limits: N, M in 1..1024 for the Triton kernels (any size for the reference), D in 1..8192; fp32, bf16,
fp16, fp64 (fp64: reference only) inputs; y gets a gradient only through the reference path.
"""
import torch

EPS2 = 1e-8  # d^2 at or below this: weight 0, value sqrt(EPS2) (geomloss' clamp)


# ----------------------------------------------------------------------------------------------------
# plain-torch reference (also the fast CPU path)

def _set_sizes(n, size, B, device):
    """(B,) int64 lengths, clipped to [0, size], or None when every set is full."""
    if n is None:
        return None
    n = torch.as_tensor(n, device=device).to(torch.int64).reshape(B)
    return n.clamp(0, size)


def _pair_block(a, b, aa, bb, diag, valid, need_w):
    """Distances between rows of a (B,n,D) and b (B,m,D): returns (sum of valid distances (B,),
    weight matrix 1/d with zero weight on the diagonal / duplicates / padding, or None)."""
    d2 = (aa[:, :, None] + bb[:, None, :])  # (B, n, m)
    d2.baddbmm_(a, b.transpose(1, 2), alpha=-2.0)
    small = d2 <= EPS2 if need_w else None  # also catches the negatives left by cancellation
    d = d2.clamp_min_(EPS2).sqrt_()
    if diag:
        d.diagonal(dim1=1, dim2=2).zero_()
    if valid is not None:
        d.masked_fill_(~valid, 0.0)
    s = d.sum((1, 2))
    if not need_w:
        return s, None
    w = d.reciprocal_()
    w.masked_fill_(small, 0.0)
    if valid is not None:
        w.masked_fill_(~valid, 0.0)
    if diag:
        w.diagonal(dim1=1, dim2=2).zero_()
    return s, w


def _energy_ref_chunk(x, y, nx, ny, scale, statistic, dt, dx_out, dy_out):
    """Value for a chunk of sets; writes dX / dY into the given (B,N,D) / (B,M,D) buffers (or None)."""
    B, N, D = x.shape
    M = y.shape[1]
    dev = x.device
    need_dx, need_dy = dx_out is not None, dy_out is not None
    xf = x.detach()
    yf = y.detach()
    mx = None if nx is None else torch.arange(N, device=dev)[None, :] < nx[:, None]  # (B, N)
    my = None if ny is None else torch.arange(M, device=dev)[None, :] < ny[:, None]  # (B, M)
    nf = torch.full((B,), float(N), dtype=dt, device=dev) if nx is None else nx.to(dt)
    mf = torch.full((B,), float(M), dtype=dt, device=dev) if ny is None else ny.to(dt)
    # centre both sets on the mean of Y (translation invariance; keeps the Gram trick accurate)
    if my is None:
        c = yf.mean(1, keepdim=True, dtype=dt)  # (B, 1, D)
    else:
        c = (yf.to(dt) * my[:, :, None]).sum(1, keepdim=True) / mf.clamp_min(1)[:, None, None]
    xf = torch.sub(xf.to(dt), c)  # the only copies of x and y: one chunk at a time
    yf = torch.sub(yf.to(dt), c)
    if mx is not None:
        xf.masked_fill_(~mx[:, :, None], 0.0)
    if my is not None:
        yf.masked_fill_(~my[:, :, None], 0.0)
    xx = xf.pow(2).sum(-1)  # (B, N)
    yy = yf.pow(2).sum(-1)  # (B, M)
    vxy = None if (mx is None and my is None) else (
        (mx if mx is not None else torch.ones(B, N, dtype=torch.bool, device=dev))[:, :, None]
        & (my if my is not None else torch.ones(B, M, dtype=torch.bool, device=dev))[:, None, :])
    vxx = None if mx is None else mx[:, :, None] & mx[:, None, :]
    vyy = None if my is None else my[:, :, None] & my[:, None, :]
    need_w = need_dx or need_dy
    s_xy, W = _pair_block(xf, yf, xx, yy, False, vxy, need_w)
    s_xx, V = _pair_block(xf, xf, xx, xx, True, vxx, need_dx)
    s_yy, U = _pair_block(yf, yf, yy, yy, True, vyy, need_dy)
    n1, m1 = nf.clamp_min(1), mf.clamp_min(1)
    if statistic == "v":
        cxx, cyy = 1.0 / (n1 * n1), 1.0 / (m1 * m1)
    else:
        cxx = torch.where(nf > 1, 1.0 / (n1 * (n1 - 1).clamp_min(1)), torch.zeros_like(nf))
        cyy = torch.where(mf > 1, 1.0 / (m1 * (m1 - 1).clamp_min(1)), torch.zeros_like(mf))
    cxy = 1.0 / (n1 * m1)
    empty = (nf == 0) | (mf == 0)
    val = scale * (2.0 * cxy * s_xy - cxx * s_xx - cyy * s_yy)
    val = torch.where(empty, torch.full_like(val, float("nan")), val)
    live = (~empty).to(dt)
    if need_w:
        W.mul_((2.0 * scale * cxy * live)[:, None, None])
    if need_dx:
        V.mul_((2.0 * scale * cxx * live)[:, None, None])
        rc = (W.sum(-1) - V.sum(-1))[:, :, None]
        if dx_out.dtype == dt:  # write straight into the saved gradient
            torch.mul(xf, rc, out=dx_out)
            dx_out.baddbmm_(W, yf, alpha=-1.0)
            dx_out.baddbmm_(V, xf)
        else:
            dx = xf * rc
            dx.baddbmm_(W, yf, alpha=-1.0)
            dx.baddbmm_(V, xf)
            dx_out.copy_(dx)
        del V
    if need_dy:
        U.mul_((2.0 * scale * cyy * live)[:, None, None])
        dy = yf * (W.sum(1) - U.sum(-1))[:, :, None]  # (B, M, D)
        dy.baddbmm_(W.transpose(1, 2), xf, alpha=-1.0)
        dy.baddbmm_(U, yf)
        dy_out.copy_(dy)
    return val


REF_CHUNK_ELEMS = 1 << 22  # sets per chunk so that a chunk's copies + pair matrices stay ~16 MiB fp32


def _energy_ref_impl(x, y, n_x, n_y, scale, statistic, upcast, need_dx, need_dy):
    """Value (B,), dX or None, dY or None, computed without autograd, a chunk of sets at a time (the
    centred copies and the pair matrices exist for one chunk only; dX is written into its buffer)."""
    if statistic not in ("v", "u"):
        raise ValueError(f"statistic must be 'v' or 'u', got {statistic!r}")
    B, N, D = x.shape
    M = y.shape[1]
    dt = x.dtype
    if upcast and dt in (torch.float16, torch.bfloat16):
        dt = torch.float32
    dev = x.device
    nx = _set_sizes(n_x, N, B, dev)
    ny = _set_sizes(n_y, M, B, dev)
    dx = torch.empty(x.shape, dtype=x.dtype, device=dev) if need_dx else None
    dy = torch.empty(y.shape, dtype=y.dtype, device=dev) if need_dy else None
    per_set = (N + M) * D + N * M + N * N + M * M
    bc = max(1, REF_CHUNK_ELEMS // per_set)
    vals = []
    for b0 in range(0, B, bc):
        b1 = min(B, b0 + bc)
        vals.append(_energy_ref_chunk(
            x[b0:b1], y[b0:b1], None if nx is None else nx[b0:b1], None if ny is None else ny[b0:b1],
            scale, statistic, dt, None if dx is None else dx[b0:b1], None if dy is None else dy[b0:b1]))
    val = vals[0] if len(vals) == 1 else torch.cat(vals)
    return val, dx, dy


class _EnergyRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, n_x, n_y, scale, statistic, upcast):
        val, dx, dy = _energy_ref_impl(x, y, n_x, n_y, scale, statistic, upcast,
                                       ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(dx, dy)
        ctx.dtypes = (x.dtype, y.dtype)
        return val

    @staticmethod
    def backward(ctx, g):
        dx, dy = ctx.saved_tensors
        gx = gy = None
        if dx is not None:
            gx = (dx * g.to(dx.dtype)[:, None, None]).to(ctx.dtypes[0])
        if dy is not None:
            gy = (dy * g.to(dy.dtype)[:, None, None]).to(ctx.dtypes[1])
        return gx, gy, None, None, None, None, None


def energy_ref(x, y, n_x=None, n_y=None, scale=0.5, statistic="v", upcast=True):
    """Plain-torch energy distance per set, (B,) in fp32 (fp64 for fp64 inputs; input dtype when
    upcast=False). Differentiable in x (and in y if it requires grad) via the closed-form gradient."""
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"need x (B,N,D) and y (B,M,D), got {tuple(x.shape)} and {tuple(y.shape)}")
    return _EnergyRef.apply(x, y, n_x, n_y, float(scale), statistic, upcast)


def energy_triton(x, y, n_x=None, n_y=None, scale=0.5, statistic="v"):
    """The fused Triton kernel (kernels/energy_tl.py), imported on first use: a CPU run that never
    launches a kernel never imports Triton."""
    from .energy_tl import energy_triton as f
    return f(x, y, n_x=n_x, n_y=n_y, scale=scale, statistic=statistic)
