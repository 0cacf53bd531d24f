"""
Baselines (SPEC 11) that write the same cell-level pred.h5ad as the model, so every metric applies,
and a side-by-side report of the baselines (and of model predictions) on one split.

    python -m state.baselines report --data=DIR --split=split.json [--pred=runs/x/pred.h5ad ...] \
        [--out=FOLDER (default: baselines/ beside the first --pred)] [--profile=full]
    python -m state.baselines write --data=DIR --split=split.json --which=perturbation_mean --out=pred.h5ad

`report` trains nothing heavy (means and one closed-form ridge), evaluates every baseline with
state.eval against the real test cells, and prints one table: the mean of each metric per method,
the per-metric winner marked `*`, and "model - best baseline" for each --pred. A --pred file is
compared with the real.h5ad next to it when there is one (predict.py writes both), else with the
real test cells of the split.

All baselines are built from `split.train` rows only, except `celleval_baseline`, which is
cell-eval's `baseline` command and is built from the TEST data (labelled so):
  perturbation_mean  x_hat = x_ctrl(c*) + mean over training contexts c of (mu_{c,p} - mu_ctrl_c)
                     (a perturbation with no training context falls back to the mean training delta)
  context_mean       x_hat = mean of the perturbed training cells of c*; zero-shot fallback (none):
                     mu_ctrl_{c*} + mean over training contexts of (mu_pert_c - mu_ctrl_c)
  linear             Y ~ G W P^T + b 1^T (Ahlmann-Eltze et al.), the two-sided ridge closed form
                     W = (G^T G + lam I)^-1 G^T (Y - b 1^T) P (P^T P + lam I)^-1 with G = top-d PCA
                     gene loadings of training cells, P = one-hot (identity), b = row means of Y,
                     lam picked on the val rows; x_hat = x_ctrl + G W P[p]^T + b
  two_way            x_hat = x_ctrl(c*) + alpha_p + beta_c*: the perturbation's mean delta over training
                     contexts plus c*'s mean residual over its support perturbations (shift_table)
  auto_shift         x_hat = x_ctrl(c*) + whichever shift (pert-mean, context-mean, two-way) has the lowest
                     cross-fitted error on c*'s own training perturbations (zero-shot: two-way)
  celleval_baseline  every perturbed cell = mean of the per-perturbation pseudobulks of the test
                     file (control included, as cell-eval computes it); real controls appended
Control cells are copied through as real cells (is_predicted False) in every pred.
"""

import os
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np

from state.config import dashes
from state.data import Prepared, Rows
from state.errors import Parser, UserError, output_folder, staged_folder
from state.eval import BEST, evaluate, score
from state.h5ad import H5AD, write_cells
from state.perts import gene_pca, parts_of
from state.sampler import draw_controls
from state.splits import Split


# -----------------------------------------------------------------------------------------------
# training statistics


def group_means(data, rows, shard=False):
    """Mean expression per (context, pert) over the given rows (an index array or a Rows, e.g. a split
    part: then read segment by segment, never one index per cell): dict (c, p) -> (mean (G,), n).
    A segment that covers more than half of its group is its group's sum (sums.npy, written by
    prepare) minus the rows it leaves out: a training part reads only the val cells. shard=True under
    torchrun: each rank reads every world-th segment and the sums are all-reduced (same result on all)."""
    import torch.distributed as dist

    segs, gi = (rows if isinstance(rows, Rows) else Rows.of(rows)).cut(data)
    S, T = data.sums, data.group_table
    r, w = (dist.get_rank(), dist.get_world_size()) if shard and dist.is_initialized() else (0, 1)

    def total(s, lo, hi):
        """Sum of the rows at positions [lo, hi) of segment s (float64)."""
        r = Rows(segs.start[s:s + 1], segs.n[s:s + 1], [lo], [hi], segs.key[s:s + 1], segs.shuf[s:s + 1])
        m = len(r)
        return data.rows(np.sort(r.at(np.zeros(m, np.int64), np.arange(m)))).sum(0, dtype=np.float64) if m else 0.0

    keys = sorted({(int(T[g, 0]), int(T[g, 1])) for g in gi})  # the same on every rank
    sums = {k: (0.0, 0) for k in keys}
    for s in range(r, len(segs.start), w):
        g, lo, hi, n = gi[s], int(segs.lo[s]), int(segs.hi[s]), int(segs.n[s])
        whole = segs.start[s] == T[g, 3] and n == T[g, 4] - T[g, 3]  # the segment permutes all of its group
        if S is not None and whole and 2 * (hi - lo) > n:
            x = S[g] - total(s, 0, lo) - total(s, hi, n)
        else:
            x = total(s, lo, hi)
        c, p = int(T[g, 0]), int(T[g, 1])
        t, k = sums.get((c, p), (0.0, 0))
        sums[(c, p)] = (t + x, k + hi - lo)
    if w > 1:
        import torch
        dev = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces device tensors only
        a = np.stack([np.broadcast_to(sums[k][0], (data.n_genes,)) for k in keys])  # (K, G) this rank's sums
        a = torch.from_numpy(a).to(dev)
        n = torch.tensor([sums[k][1] for k in keys], dtype=torch.float64, device=dev)
        dist.all_reduce(a)
        dist.all_reduce(n)
        a, n = a.cpu().numpy(), n.cpu().numpy()
        sums = {k: (a[i], int(n[i])) for i, k in enumerate(keys)}
    return {k: (s / n, n) for k, (s, n) in sums.items()}


def _test_layout(data, split):
    """Rows of the real test file: perturbed test cells then the held-out controls."""
    return np.concatenate([split.test, split.test_ctrl])


def _obs(data, rows, is_pred):
    """obs columns of the pred/real contract; real cells carry their own barcode."""
    return {data.pert_col: data.label("pert", data.pert[rows]).astype(str),
            data.context_col or "context": data.label("context", data.context[rows]).astype(str),
            "is_predicted": np.asarray(is_pred, bool),
            "ctrl_cell_barcode": data.names(rows)}


def real_pair(data, split):
    """The real test cells as an (X, obs) pair (controls of the held-out context included)."""
    rows = _test_layout(data, split)
    return data.rows(rows), _obs(data, rows, np.zeros(len(rows), bool))


def control_draws(data, split, seed=0):
    """The one control pool of every method: for each perturbed test cell (split.test order), a control
    cell of its own context, drawn per (context, perturbation) group, groups in sorted order, as evenly as
    possible (state.sampler.draw_controls) from the TRAINING controls of that context with one generator
    seeded `seed`. predict.py test and every baseline start from these same cells, so paired differences
    compare like with like."""
    return _controls_for(data, split, np.random.default_rng(seed))


def control_pools(data, split):
    """{context code: its training control rows} for every context with a test cell: what control_draws
    draws from, and what recentre centres on."""
    tr = split.train[data.pert[split.train] == data.control_code]
    return {int(c): tr[data.context[tr] == c] for c in np.unique(data.context[split.test])}


def _controls_for(data, split, rng):
    """control_draws with a given generator (the baselines pass a fresh default_rng(seed))."""
    out = np.empty(len(split.test), np.int64)
    for c, pool in control_pools(data, split).items():
        if len(pool) == 0:
            raise UserError(f"context '{data.context_names[c]}' has no training controls")
        for p in np.unique(data.pert[split.test][data.context[split.test] == c]):
            m = (data.context[split.test] == c) & (data.pert[split.test] == p)
            out[m] = draw_controls(pool, m.sum(), rng)
    return out


def recentre(P, drawn_mean, pool_mean):
    """Predicted cells P (n, G) of one group, started from control cells whose mean is `drawn_mean` (G,),
    moved by pool_mean - drawn_mean (pool_mean: the mean of the control cells they were drawn from): the
    group's predicted mean is then the pool's mean plus the method's own shift, as shifts are estimated
    against those same controls. Without it every gene of a predicted pseudobulk carries the sampling noise
    of which controls the group happened to start from: on Papalexi that noise costs pearson_delta 0.02-0.08
    and MAE 5-15% (dev/LOG.md, session 8). Cell-to-cell spread is unchanged."""
    return P + (pool_mean - drawn_mean).astype(P.dtype)


def _assemble(data, split, Xhat, ctrl_rows):
    """pred (X, obs): predicted test cells then the real held-out controls. Cells started from control
    cells (`ctrl_rows`) are recentred group by group on the pool they were drawn from (recentre)."""
    if ctrl_rows is not None:
        Xhat = np.array(Xhat, np.float32)
        mu = {c: data.rows(pool).mean(0, dtype=np.float64) for c, pool in control_pools(data, split).items()}
        key = data.context[split.test].astype(np.int64) * len(data.pert_names) + data.pert[split.test]
        for k in np.unique(key):
            m = np.flatnonzero(key == k)
            Xhat[m] = recentre(Xhat[m], data.rows(ctrl_rows[m]).mean(0, dtype=np.float64),
                               mu[int(data.context[split.test][m[0]])])
    X = np.concatenate([np.clip(Xhat, 0, 14).astype(np.float32), data.rows(split.test_ctrl)])
    rows = _test_layout(data, split)
    isp = np.r_[np.ones(len(split.test), bool), np.zeros(len(split.test_ctrl), bool)]
    obs = _obs(data, rows, isp)
    cb = obs["ctrl_cell_barcode"].astype(object)  # predicted cells: the control they started from
    cb[:len(split.test)] = data.names(ctrl_rows) if ctrl_rows is not None else ""
    obs["ctrl_cell_barcode"] = cb.astype(str)
    return X, obs


def _deltas(data, M):
    """delta_{c,p} = mu_{c,p} - mu_ctrl_c for every training (c, p) with a control mean in c."""
    ctl = data.control_code
    return {(c, p): m - M[(c, ctl)][0] for (c, p), (m, _) in M.items()
            if p != ctl and (c, ctl) in M}


# -----------------------------------------------------------------------------------------------
# baselines: each returns a pred (X, obs) pair


def perturbation_mean(data, split, seed=0):
    """Control cells of the target context + the perturbation's mean delta over training contexts."""
    rng = np.random.default_rng(seed)
    M = group_means(data, split.train)
    D = _deltas(data, M)
    allmean = np.mean(list(D.values()), axis=0)
    ctrl = _controls_for(data, split, rng)
    Xc = data.rows(ctrl)
    shift, fb = {}, []
    for p in np.unique(data.pert[split.test]):
        ds = [d for (c, q), d in D.items() if q == p]
        shift[p] = np.mean(ds, axis=0) if ds else allmean
        if not ds:
            fb.append(data.pert_names[p])
    if fb:
        print(f"WARNING: perturbation_mean: no training context for {fb}: mean training delta used")
    Xhat = Xc + np.stack([shift[p] for p in data.pert[split.test]]).astype(np.float32)
    return _assemble(data, split, Xhat, ctrl)


def context_mean(data, split, seed=0):
    """Mean of the perturbed training cells of the target context (zero-shot: labelled fallback)."""
    M = group_means(data, split.train)
    ctl = data.control_code
    Xhat = np.empty((len(split.test), data.n_genes), np.float32)
    for c in np.unique(data.context[split.test]):
        m = data.context[split.test] == c
        ks = [(k, n) for k, n in M.items() if k[0] == c and k[1] != ctl]
        if ks:
            tot = sum(n for _, (_, n) in ks)
            mu = sum(v * n for _, (v, n) in ks) / tot
        else:  # zero-shot: ctrl mean of c* + mean training shift of perturbed vs control cells
            print(f"WARNING: context_mean: context '{data.context_names[c]}' has no perturbed "
                  "training cells: zero-shot fallback mu_ctrl(c*) + mean_c (mu_pert_c - mu_ctrl_c)")
            sh = []
            for cc in {k[0] for k in M if k[0] != c}:
                kk = [(v, n) for (c2, p), (v, n) in M.items() if c2 == cc and p != ctl]
                if kk and (cc, ctl) in M:
                    sh.append(sum(v * n for v, n in kk) / sum(n for _, n in kk) - M[(cc, ctl)][0])
            mu = M[(c, ctl)][0] + np.mean(sh, axis=0)
        Xhat[m] = mu
    return _assemble(data, split, Xhat, None)


def ridge2(G, Y, P, lam):
    """W = (G^T G + lam I)^-1 G^T Y P (P^T P + lam I)^-1 (SPEC 11; Y already centred by b)."""
    A = np.linalg.solve(G.T @ G + lam * np.eye(G.shape[1]), G.T @ Y)  # (d_g, K)
    return np.linalg.solve(P.T @ P + lam * np.eye(P.shape[1]), (A @ P).T).T  # (d_g, d_p)


def linear(data, split, seed=0, d=10, lams=(0.01, 0.1, 1.0, 10.0, 100.0)):
    """Linear low-rank ridge on perturbation deltas (one-hot perturbations, PCA gene embeddings)."""
    rng = np.random.default_rng(seed)
    ctl = data.control_code

    def Ymat(rows):
        M = group_means(data, rows)
        D = _deltas(data, M)
        # Y_p: cell-weighted mean over contexts of the per-context delta (= mean of x - mu_ctrl(c))
        Y = {}
        for (c, p), dl in D.items():
            s, n = Y.get(p, (0.0, 0))
            Y[p] = (s + dl * M[(c, p)][1], n + M[(c, p)][1])
        return {p: s / n for p, (s, n) in Y.items()}

    Ytr = Ymat(split.train)
    perts = sorted(Ytr)
    Y = np.stack([Ytr[p] for p in perts], 1)  # (G, K)
    b = Y.mean(1, keepdims=True)
    G = gene_pca(data, split.train, d, seed=seed)
    P = np.eye(len(perts))
    lam = lams[0]
    if len(split.val):
        Yv = Ymat(np.concatenate([split.val, split.train[data.pert[split.train] == ctl]]))
        cols = [i for i, p in enumerate(perts) if p in Yv]
        if cols:
            Yval = np.stack([Yv[perts[i]] for i in cols], 1)
            err = [np.mean((G @ ridge2(G, Y - b, P, l) @ P[cols].T + b - Yval) ** 2) for l in lams]
            lam = lams[int(np.argmin(err))]
    W = ridge2(G, Y - b, P, lam)
    fit = G @ W @ P.T + b  # (G, K)
    col = {p: i for i, p in enumerate(perts)}
    ctrl = _controls_for(data, split, rng)
    shift = np.stack([fit[:, col[p]] if p in col else b[:, 0] for p in data.pert[split.test]])
    print(f"linear: d={G.shape[1]} K={len(perts)} lambda={lam}")
    return _assemble(data, split, data.rows(ctrl) + shift.astype(np.float32), ctrl)


KINDS = ("pert_mean", "context_mean", "two_way", "auto", "additive", "crispr", "fold")


def _delta_grid(data, rows):
    """delta[c,p] as a dense (nC, nP, G) grid, its mask H and cell counts W; `rows` may be their
    group_means already."""
    M = rows if isinstance(rows, dict) else group_means(data, rows)
    nC, nP, G = len(data.context_names), len(data.pert_names), data.n_genes
    D = np.zeros((nC, nP, G))
    H = np.zeros((nC, nP))  # 1 where delta[c,p] exists
    W = np.zeros((nC, nP))  # cells of (c,p)
    for (c, p), d in _deltas(data, M).items():
        D[c, p], H[c, p], W[c, p] = d, 1.0, M[(c, p)][1]
    if not H.any():
        raise UserError("no perturbed training group with controls in its context: no shifts to learn from")
    return D, H, W


def shift_table(data, rows, kind="two_way", return_choice=False, sep="+"):
    """(n_contexts, n_perts, G) float32 mean shifts over control, for every (context, perturbation)
    pair, from the given (training) rows only (or their group_means, read once). Each pair's shift is
    what `kind` predicts for it as if that pair were held out (cross-fitted: a pair never sees its own
    cells), so a model anchored on the table learns, on training pairs, to correct the baseline's error
    on unseen pairs:
      pert_mean     alpha[c,p] = mean over other contexts c' of delta[c',p] (no other context: the mean
                    of all training deltas)
      context_mean  cell-weighted mean of delta[c,p'] over the other perturbations p' of c (none, as
                    zero-shot: the mean over the other contexts of their own context shift)
      two_way       alpha[c,p] + beta[c,p], beta = mean over the other perturbations p' of c of the
                    residual delta[c,p'] - alpha[c,p'] (none: 0); an additive context x perturbation model
      auto          per context, whichever of the three has the lowest cross-fitted mean squared error
                    on that context's own training perturbations (a context without any: two_way)
      additive      a combination 'A+B' (parts split on `sep`): delta[c,A] + delta[c,B] when every part
                    has a training delta in c (Norman et al.'s additive model); a single with a training
                    delta in c: that delta itself (so a model anchored here learns no correction for the
                    parts that it would add again on top of their sum in a double; only the doubles'
                    non-additive residual); anything else: two_way
      fold          pert_mean transferred as fold changes: each other context c' moves gene g from m' to
                    m' + delta[c',p]; in c (control mean m) that fold change of the (expm1) expression gives
                    log1p(expm1(m) * (expm1(m' + delta) + e) / (expm1(m') + e)) - m, e = 0.1, averaged over
                    c'. A gene silent in c's controls barely moves; zero-shot transfer gene by gene
      crispr        context_mean, with the target gene's own expression moved as perturbations move their
                    targets: a perturbation named after a measured gene g gets shift[c,p,g] = r * mu_ctrl[c,g],
                    r the mean on-target change delta[c',q,g_q] / mu_ctrl[c',g_q] of the OTHER perturbations
                    q with a measured, expressed target (cross-fitted by perturbation: what an unseen
                    perturbation gets). The anchor for unseen perturbations (a knockdown lowers its target)
    with delta[c,p] = mean(x | c,p) - mean(x | c, control). Controls get a zero shift.
    return_choice=True: (table, {context name: kind}) for auto, (table, None) for the others."""
    if kind not in KINDS:
        raise UserError(f"shift kind '{kind}' not one of {', '.join(KINDS)}")
    if not isinstance(rows, dict):  # read the rows once for every table below
        rows = group_means(data, rows)
    if kind == "additive":
        T = shift_table(data, rows, "two_way")
        D, H = _delta_grid(data, rows)[:2]
        code = {n: i for i, n in enumerate(data.pert_names)}
        n_add = 0
        for p, name in enumerate(data.pert_names):
            ps = [code.get(q) for q in parts_of(name, sep)]
            if len(ps) == 1 and p != data.control_code:  # a single: anchored on its own training delta
                T[:, p] = np.where(H[:, p, None] > 0, D[:, p], T[:, p])
                continue
            if len(ps) < 2 or None in ps:
                continue
            for c in range(len(data.context_names)):
                if H[c, ps].all():
                    T[c, p] = D[c, ps].sum(0)
                    n_add += 1
        print(f"additive: {n_add} (context, combination) pairs from their singles' deltas; the rest two_way")
        return (T, None) if return_choice else T
    if kind == "fold":
        D, H = _delta_grid(data, rows)[:2]
        ctl = data.control_code
        nC = len(data.context_names)
        mu = np.zeros((nC, data.n_genes))
        has = np.zeros(nC, bool)
        for c in range(nC):
            if (c, ctl) in rows:
                mu[c], has[c] = rows[(c, ctl)][0], True
        T = shift_table(data, rows, "pert_mean")  # the fallback where no other context has p
        e = 0.1
        for p in range(len(data.pert_names)):
            if p == ctl:
                continue
            for c in range(nC):
                src = [k for k in range(nC) if k != c and H[k, p] and has[k]]
                if not src or not has[c]:
                    continue
                fc = [(np.expm1(mu[k] + D[k, p]) + e) / (np.expm1(mu[k]) + e) for k in src]  # (G,) each
                T[c, p] = np.mean([np.log1p(np.maximum(np.expm1(mu[c]) * f + e * (f - 1), 0.0)) - mu[c]
                                   for f in fc], axis=0)
        T[:, ctl] = 0.0
        return (T.astype(np.float32), None) if return_choice else T.astype(np.float32)
    if kind == "crispr":
        T = shift_table(data, rows, "context_mean")
        D, H = _delta_grid(data, rows)[:2]
        M = rows
        ctl = data.control_code
        gene = {str(g).upper(): i for i, g in enumerate(data.genes)}
        nC = len(data.context_names)
        mu = np.zeros((nC, data.n_genes))
        for c in range(nC):
            if (c, ctl) in M:
                mu[c] = M[(c, ctl)][0]
        tgt = {p: gene.get(str(n).upper()) for p, n in enumerate(data.pert_names) if p != ctl}
        r = {}  # p -> on-target fractions over its training contexts
        for p, g in tgt.items():
            if g is None:
                continue
            cs = [c for c in range(nC) if H[c, p] and mu[c, g] > 0.1]  # expressed targets only
            if cs:
                r[p] = [D[c, p, g] / mu[c, g] for c in cs]
        n_set = 0
        for p, g in tgt.items():
            others = [v for q, vs in r.items() if q != p for v in vs]
            if g is None or not others:
                continue
            T[:, p, g] = float(np.mean(others)) * mu[:, g]
            n_set += 1
        print(f"crispr: on-target change {np.mean([v for vs in r.values() for v in vs]) if r else float('nan'):+.3f}"
              f" x control expression from {len(r)} perturbations with a measured target; applied to {n_set}")
        T[:, ctl] = 0.0
        return (T.astype(np.float32), None) if return_choice else T.astype(np.float32)
    if kind == "auto":
        Ts = {k: shift_table(data, rows, k) for k in KINDS[:3]}
        D, H = _delta_grid(data, rows)[:2]
        T, choice = Ts["two_way"].copy(), {}
        for c in range(len(data.context_names)):
            ps = np.flatnonzero(H[c])
            if len(ps):
                err = {k: float(np.mean((v[c, ps] - D[c, ps]) ** 2)) for k, v in Ts.items()}
                best = min(err, key=err.get)
                T[c] = Ts[best][c]
                choice[data.context_names[c]] = best
            else:
                choice[data.context_names[c]] = "two_way"
        return (T, choice) if return_choice else T
    D, H, W = _delta_grid(data, rows)
    nC = len(data.context_names)

    def loo(V, w, axis):
        """Weighted mean of V over `axis` leaving each entry itself out -> (values, has-any mask)."""
        tot, n = (V * w[..., None]).sum(axis, keepdims=True), w.sum(axis, keepdims=True)
        num, den = tot - V * w[..., None], n - w
        with np.errstate(invalid="ignore", divide="ignore"):
            return num / den[..., None], den > 0

    allmean = (D * H[..., None]).sum((0, 1)) / H.sum()
    alpha, ok = loo(D, H, 0)
    alpha = np.where(ok[..., None], alpha, allmean)
    if kind == "pert_mean":
        T = alpha
    elif kind == "context_mean":
        T, ok = loo(D, W, 1)
        full = (D * W[..., None]).sum(1) / np.maximum(W.sum(1), 1)[:, None]  # (nC, G) context shifts
        has = W.sum(1) > 0
        for c in range(nC):  # zero-shot context: the other contexts' mean shift
            others = has & (np.arange(nC) != c)
            fb = full[others].mean(0) if others.any() else allmean
            T[c] = np.where(ok[c][:, None], T[c], fb)
    else:
        beta, ok = loo((D - alpha) * H[..., None], H, 1)
        T = alpha + np.where(ok[..., None], beta, 0.0)
    T[:, data.control_code] = 0.0
    return (T.astype(np.float32), None) if return_choice else T.astype(np.float32)


def _shifted_controls(data, split, seed, kind):
    """Control cells of each test cell's context + shift_table(kind)[context, perturbation]."""
    rng = np.random.default_rng(seed)
    T = shift_table(data, split.train, kind)
    ctrl = _controls_for(data, split, rng)
    Xhat = data.rows(ctrl) + T[data.context[split.test], data.pert[split.test]]
    return _assemble(data, split, Xhat, ctrl)


def two_way(data, split, seed=0):
    """Control cells of the target context + alpha_p + beta_c (shift_table 'two_way'): the
    perturbation's mean effect in the other contexts plus the held-out context's mean residual over
    its support perturbations (zero-shot: alpha_p alone, i.e. the perturbation mean)."""
    return _shifted_controls(data, split, seed, "two_way")


def auto_shift(data, split, seed=0):
    """Control cells of the target context + the shift (pert_mean, context_mean or two_way) with the
    lowest cross-fitted error on that context's training perturbations (shift_table 'auto'; zero-shot:
    two_way). What `--anchor=auto` starts from."""
    return _shifted_controls(data, split, seed, "auto")


def additive(data, split, seed=0):
    """Control cells of the target context + delta_A + delta_B (+ ...) from the training singles of a
    combination (shift_table 'additive'; the split's combo separator, default '+'); singles and
    combinations with an unmeasured part: two_way. The baseline to beat on unseen combinations."""
    rng = np.random.default_rng(seed)
    T = shift_table(data, split.train, "additive", sep=getattr(split, "combo_sep", None) or "+")
    ctrl = _controls_for(data, split, rng)
    return _assemble(data, split, data.rows(ctrl) + T[data.context[split.test], data.pert[split.test]], ctrl)


def crispr_shift(data, split, seed=0):
    """Control cells of the target context + the context's mean shift, with the target gene moved as
    the other perturbations moved theirs (shift_table 'crispr'): the baseline for unseen perturbations
    that name a measured gene (the 'CRISPR-informed' context mean)."""
    return _shifted_controls(data, split, seed, "crispr")


def celleval_baseline(data, split, seed=0):
    """cell-eval `baseline`: mean of the per-perturbation pseudobulks of the TEST file (control
    included) for every perturbed cell; real controls appended. Built from test data."""
    X, obs = real_pair(data, split)
    lab = obs[data.pert_col]
    mu = np.mean([X[lab == p].astype(np.float64).mean(0) for p in np.unique(lab)], axis=0)
    n = len(split.test)
    return _assemble(data, split, np.broadcast_to(mu, (n, X.shape[1])), None)


# -----------------------------------------------------------------------------
# the registry: every baseline declared once; the report, `write --which`, the protocol's names and
# table labels (state/experiment.py) and the anchors ST can start from (STConfig.anchor) are read from it

@dataclass(frozen=True)
class Baseline:
    """One baseline; called as its function: BASELINES[name](data, split, seed) -> (X, obs)."""
    name: str                # --which, NAME_pred.h5ad, the keys of result files: never renamed
    fn: Callable
    short: str               # its label in the protocol's tables
    anchor: str = None       # the shift_table kind ST anchors on to start from it (--anchor=KIND)
    task: str = None         # built only for splits of this task type (combo, unseen); None: every split
    from_test: bool = False  # built from the TEST data (cell-eval's baseline): reported, never in the protocol

    def __call__(self, data, split, seed=0):
        return self.fn(data, split, seed=seed)

    def joins(self, split):
        """Is it built for `split`? A combination split is one with a combo separator; crispr_shift is
        for unseen perturbations only (for seen ones it is the context mean plus a guess the data can
        replace), and without combinations additive is two_way."""
        if self.task == "combo":
            return bool(getattr(split, "combo_sep", None))
        return self.task is None or getattr(split, "task", None) == self.task


BASELINES = {b.name: b for b in (
    Baseline("perturbation_mean", perturbation_mean, "pert-mean", anchor="pert_mean"),
    Baseline("context_mean", context_mean, "ctx-mean", anchor="context_mean"),
    Baseline("linear", linear, "linear"),
    Baseline("two_way", two_way, "two-way", anchor="two_way"),
    Baseline("auto_shift", auto_shift, "auto", anchor="auto"),
    Baseline("additive", additive, "additive", anchor="additive", task="combo"),
    Baseline("crispr_shift", crispr_shift, "crispr", anchor="crispr", task="unseen"),
    Baseline("celleval_baseline", celleval_baseline, "celleval", from_test=True),
)}
# what ST's output can be anchored on (STConfig.anchor, train.py --anchor): nothing, or a baseline's shift
ANCHORS = ("none",) + tuple(b.anchor for b in BASELINES.values() if b.anchor)


def write_pred(path, pair, data, source):
    """A method's (X, obs) pair, or real_pair's, as a pred/real file (state.h5ad.write_cells)."""
    X, obs = pair
    write_cells(path, X, data.genes, obs, (data.pert_col, data.control, data.context_col or "context"), source,
                [f"cell{i}" for i in range(len(X))])


# -----------------------------------------------------------------------------------------------
# report


def _mean_row(agg):
    i = list(agg["statistic"]).index("mean")
    return {c: (np.nan if agg[c][i] is None else float(agg[c][i])) for c in agg if c != "statistic"}


def table(results, models=()):
    """results: {name: agg Table}. Winner per metric marked '*' (baselines and models together);
    one 'model - best baseline' column per model."""
    names = list(results)
    base = [n for n in names if n not in models]
    rows = {n: _mean_row(a) for n, a in results.items()}
    metrics = [m for m in rows[names[0]]]
    w = max(12, *(len(n) for n in names))
    head = f"{'metric':<28s}" + "".join(f"{n[:w]:>{w + 2}s}" for n in names)
    head += "".join(f"{(m + '-best')[:w + 4]:>{w + 6}s}" for m in models)
    out = [head]
    for m in metrics:
        v = np.array([rows[n].get(m, np.nan) for n in names])
        best = BEST.get(m)
        win = np.zeros(len(v), bool)  # all methods equal to the best; none when all tie
        if best is not None and np.isfinite(v).any():
            bv = np.nanmax(v) if best == 1 else np.nanmin(v)
            win = v == bv
            if win.all():
                win[:] = False
        line = f"{m:<28s}"
        for i, x in enumerate(v):
            line += f"{('nan' if np.isnan(x) else f'{x:.4f}') + ('*' if win[i] else ' '):>{w + 2}s}"
        for mo in models:
            bv = np.array([rows[n].get(m, np.nan) for n in base])
            if best is None or not np.isfinite(bv).any():
                line += f"{'':>{w + 6}s}"
                continue
            bb = np.nanmax(bv) if best == 1 else np.nanmin(bv)
            line += f"{rows[mo][m] - bb:>+{w + 6}.4f}"
        out.append(line)
    if "celleval_baseline" in results:
        sc = {n: score(results[n], results["celleval_baseline"])[1] for n in names}
        out.append(f"{'vcc_score_vs_celleval_base':<28s}" +
                   "".join(f"{100 * sc[n]:>{w + 1}.2f} " for n in names))
    return "\n".join(out)


def report(data, split, preds=None, out=None, profile="full", seed=0):
    """Evaluate every baseline (and each pred file) on the split's test cells; -> table string."""
    from state.errors import UserError
    preds = preds or {}
    if not out:
        raise UserError("state.baselines report: no output folder; give --out=FOLDER")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"state.baselines report: --out={out} is a file; give a folder")
    for q in preds.values():
        if not os.path.isfile(q):
            raise UserError(f"state.baselines report: --pred {q}: no such file")
        if os.path.isdir(out) and any(os.path.exists(os.path.join(out, f)) and os.path.samefile(q, os.path.join(out, f))
                                      for f in os.listdir(out)):
            raise UserError(f"state.baselines report: --pred {q} is inside --out={out}, where the report "
                            "writes its files; choose another --out")
        with H5AD(q) as f:
            if list(f.var_names()) != list(data.genes):
                raise UserError(f"state.baselines report: --pred {q}: its genes differ from the prepared data's")
    output_folder(out, [], "state.baselines report")
    with staged_folder(out) as d:  # every file or none: a failure half-way leaves --out as it was
        return _report(data, split, preds, d, profile, seed)


def _report(data, split, preds, out, profile, seed):
    """report()'s work, into the staging folder `out`."""
    real = real_pair(data, split)
    realp = os.path.join(out, "real.h5ad")
    write_pred(realp, real, data, "real")
    ctxc = data.context_col or "context"
    results, notes = {}, []
    for name, b in BASELINES.items():
        if not b.joins(split):
            continue
        pair = b(data, split, seed=seed)
        pp = os.path.join(out, f"{name}_pred.h5ad")
        write_pred(pp, pair, data, name + (" (built from test data)" if b.from_test else ""))
        _, agg = evaluate(pp, realp, data.pert_col, data.control, ctxc, profile,
                          out=os.path.join(out, name))
        results[name] = agg
        # notes about the real data are the same for every method; those about a prediction are not
        notes += [f"{name}: {n}" if "predicted" in n else n for n in agg.notes]
    for name, path in preds.items():
        rp = os.path.join(os.path.dirname(os.path.abspath(path)), "real.h5ad")
        rp = rp if os.path.exists(rp) else realp
        _, agg = evaluate(path, rp, data.pert_col, data.control, ctxc, profile,
                          out=os.path.join(out, name))
        results[name] = agg
        notes += [f"{name}: {n}" if "predicted" in n else n for n in agg.notes]
    t = table(results, models=list(preds))
    extra = []
    for n, a in results.items():
        for c, inf in (a.info.items() if a.info and isinstance(next(iter(a.info.values())), dict)
                       else [(None, a.info)]):
            if "cross_pert_corr_pred" in inf:
                extra.append(f"{n}{'' if c is None else f' [{c}]'}: cross-perturbation corr of "
                             f"predicted deltas {inf['cross_pert_corr_pred']:.3f} "
                             f"(real {inf['cross_pert_corr_real']:.3f})")
    notes = sorted(set(notes))
    txt = "\n".join([t, "", *extra, *[f"NOTE: {n}" for n in notes],
                     "celleval_baseline is built from the TEST data (cell-eval's baseline command)."])
    with open(os.path.join(out, "report.txt"), "w") as f:
        f.write(txt + "\n")
    return txt


def main(argv=None):
    ap = Parser(prog="python -m state.baselines", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report")
    r.add_argument("--data", required=True)
    r.add_argument("--split", required=True)
    r.add_argument("--pred", nargs="*", default=[], help="model pred.h5ad files, PATH or NAME=PATH (default name: the parent dir)")
    r.add_argument("--out", default=None, help="folder for the baselines' files (default: baselines/ beside "
                   "the first --pred; required without --pred)")
    r.add_argument("--profile", default="full")
    r.add_argument("--seed", type=int, default=0)
    w = sub.add_parser("write")
    w.add_argument("--data", required=True)
    w.add_argument("--split", required=True)
    w.add_argument("--which", choices=list(BASELINES), required=True)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--out", required=True)
    a = ap.parse_args(dashes(argv))
    if a.cmd == "report" and not a.out:
        if not a.pred:
            raise UserError("state.baselines report: --out=FOLDER is required without --pred (the baselines' "
                            "files are written there)")
        first = a.pred[0].rpartition("=")[2] if "=" in a.pred[0] and not os.path.exists(a.pred[0]) else a.pred[0]
        a.out = os.path.join(os.path.dirname(os.path.abspath(first)), "baselines")
    data = Prepared(a.data)
    split = Split.load(a.split).validate(data)
    if a.cmd == "write":
        write_pred(a.out, BASELINES[a.which](data, split, seed=a.seed), data, a.which)
        print(f"wrote {a.out}")
        return 0
    preds = {}
    for p in a.pred:
        n, _, q = p.rpartition("=") if "=" in p and not os.path.exists(p) else ("", "", p)
        n = n or os.path.basename(os.path.dirname(os.path.abspath(q))) or q
        preds[n if n not in preds else q] = q
    print(report(data, split, preds, a.out, a.profile, a.seed))
    return 0


if __name__ == "__main__":
    from state.errors import run
    sys.exit(run("python -m state.baselines", main, None, __doc__))
