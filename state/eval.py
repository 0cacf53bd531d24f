"""
Evaluation of predicted vs real perturbation responses: cell-eval 0.8.2's metrics, re-implemented
on numpy (+ torch for pairwise distances), with the same names, definitions and NaN conventions.

    python -m state.eval --pred=pred.h5ad --real=real.h5ad --pert_col=target_gene \
        --control=non-targeting [--context_col=cell_type] [--profile=full|minimal|vcc|pds|de|anndata] \
        [--baseline_agg=base/agg_results.csv] --out=eval_out

writes `results.csv` (one row per perturbation), `agg_results.csv` (polars `describe()` rows:
count, null_count, mean, std, min, 25%, 50%, 75%, max), `real_de.csv` / `pred_de.csv`
(target, feature, log2_fold_change, p_value, fdr), and prints a short report with the conventions
that change conclusions. With --context-col each context is evaluated on its own (cell-eval
`--celltype-col`): `<context>_results.csv` etc., plus the pooled `results.csv`.

Definitions (SPEC 10; verified against cell_eval/pdex source):
  DE (pdex 0.3.0, mode "ref"): per perturbation vs the control cells, per gene, two-sided
    Mann-Whitney U, asymptotic: U = max(U1, U2), z = (U - n1 n2/2 - 0.5) / s with the
    tie-corrected s^2 = n1 n2/12 ((n+1) - sum(t^3-t)/(n(n-1))), p = 2 Phi(-z) clipped to [0, 1]
    (p = 1 when s = 0). FDR: Benjamini-Hochberg within the perturbation (scipy's
    false_discovery_control). LFC = log2(expm1(mean x_pert) / expm1(mean x_ctrl)) on float32
    means, epsilon = 0, 0/0 -> 0, x/0 -> +-inf. cell-eval stores LFC and FDR as float32;
    a gene is significant when float32(fdr) < 0.05; genes rank by float32 |LFC|, ties in gene order.
  Delta = pseudobulk (mean of X) of a perturbation minus the SAME file's control pseudobulk.

Ranking trick (why this is fast): ranks are never materialised. Values become order-preserving
int64 keys gene << 33 | value << 1 | group bit (control 0, perturbation 1), so one sorted 1-D array
holds every gene. The control's keys are sorted once per context; per perturbation its columns are
sorted (float32) and the two key arrays merged (a stable sort of two runs). At equal values the
controls come first, so for each perturbation entry #(controls <= x) = its position minus the
perturbation entries before it, and U1 = sum_x #(y <= x) - (tied controls)/2. Zeros are one tie
run per gene counted analytically (log1p data is mostly zeros); the other tie runs are rare and
handled on their own, which also gives the tie term sum (t^3 - t). Bit-identical to pdex's numba
kernel on the parity data (tests/test_parity_celleval.py).

Metrics (cell-eval names): overlap_at_{N,50,100,200,500}, precision_at_*, de_spearman_sig,
de_direction_match, de_spearman_lfc_sig, de_sig_genes_recall, de_nsig_counts_{real,pred}, pr_auc,
roc_auc, pearson_delta, mse, mae, mse_delta, mae_delta, discrimination_score_{l1,l2,cosine},
pearson_edistance; plus pdisc_norm (paper: 1 - 2 PDisc on pseudobulks, L1). clustering_agreement
(Leiden) is not computed.
"""

import csv
import math
import os
import sys

import numpy as np
import torch

from state.config import dashes
from state.errors import Parser, UserError, output_folder, staged_folder
from state.h5ad import H5AD

FDR = 0.05
KS = (None, 50, 100, 200, 500)  # overlap_at_N, _50, ...
DE_METRICS = ([f"overlap_at_{k or 'N'}" for k in KS] + [f"precision_at_{k or 'N'}" for k in KS]
              + ["de_spearman_sig", "de_direction_match", "de_spearman_lfc_sig",
                 "de_sig_genes_recall", "de_nsig_counts", "pr_auc", "roc_auc"])
AD_METRICS = ["pearson_delta", "mse", "mae", "mse_delta", "mae_delta", "discrimination_score_l1",
              "discrimination_score_l2", "discrimination_score_cosine", "pearson_edistance"]
EXTRA = ["pdisc_norm"]  # the paper's normalised perturbation discrimination (not in cell-eval)
PROFILES = {
    "full": DE_METRICS + AD_METRICS + EXTRA,
    "minimal": ["overlap_at_N", "precision_at_N", "de_nsig_counts", "pearson_delta", "mse", "mae",
                "discrimination_score_l1"],
    "vcc": ["overlap_at_N", "mae", "discrimination_score_l1"],
    "pds": ["discrimination_score_l1"],
    "de": DE_METRICS,
    "anndata": AD_METRICS,
}
# best value per metric, as cell-eval's registry (used by the VCC score and the winner marks)
BEST = {m: 1 for m in PROFILES["full"]}
BEST.update(mse=0, mae=0, mse_delta=0, mae_delta=0)
BEST.update(de_nsig_counts_real=None, de_nsig_counts_pred=None)

# -----------------------------------------------------------------------------------------------
# Differential expression


def _keys(X):
    """float32 -> int64 keys with the same order and equality (-0.0 == 0.0); NaN is rejected."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if np.isnan(X).any():
        raise UserError("expression contains NaN; the rank test needs finite values")
    i = X.view(np.int32).astype(np.int64)
    return np.where(i < 0, -(i & 0x7FFFFFFF), i)


class Ref:
    """A reference (control) group prepared once for many rank-sum tests against it: the sorted
    keys of its nonzero entries (gene-major) and its zero count per gene."""

    def __init__(self, Xc, sparse=None):
        self.Xc = Xc = np.asarray(Xc, np.float32)
        self.n, self.G = Xc.shape
        # zeros are one tie group handled analytically, unless there are negative values
        self.sparse = not (Xc < 0).any() if sparse is None else sparse
        self.k, cnt = _nzkeys(Xc, 0, self.sparse, self.G)
        self.z = self.n - cnt  # zeros per gene
        self.before = np.r_[0, np.cumsum(cnt)[:-1]]  # nonzero controls in earlier genes


def _nzkeys(X, bit, sparse, G):
    """Sorted int64 keys gene << 33 | (value key + 2^31) << 1 | bit of the (nonzero) entries,
    and the count of such entries per gene. Sorting the columns (fast, float32) and reading them
    gene-major gives the keys already sorted."""
    S = np.sort(X, axis=0).T  # (G, n) view, each row ascending
    if sparse:
        nz = S != 0
        cnt, v = nz.sum(1), S[nz]  # boolean indexing walks S row by row: gene-major
    else:
        cnt, v = np.full(G, S.shape[1]), S.ravel()
    g = np.repeat(np.arange(G, dtype=np.int64), cnt)
    return (g << 33) | ((_keys(v) + (1 << 31)) << 1) | bit, cnt


def _segsum(w, seg, G):
    """Sums of w over the runs of a non-decreasing segment id in [0, G) (cheaper than bincount)."""
    b = np.searchsorted(seg, np.arange(G + 1))
    c = np.r_[0.0, np.cumsum(w)]
    return c[b[1:]] - c[b[:-1]]


def _erfc(z):
    # math.erfc (libm), as numba_mwu's _ndtr, so p-values match to the last bit
    return np.frompyfunc(math.erfc, 1, 1)(z).astype(np.float64)


def mwu(Xp, ref):
    """Two-sided asymptotic Mann-Whitney U of each gene of Xp (n1, G) vs the Ref; -> (U1, p).

    One sort of the merged nonzero keys of both groups: in it, a tie group is a run of equal
    (gene, value); U1 = sum over pert entries of (#controls below + #controls tied / 2) and the tie
    term is sum over runs of t^3 - t, with the zeros of each gene as one more run."""
    Xp = np.asarray(Xp, np.float32)
    n1, n2, G = Xp.shape[0], ref.n, ref.G
    n = n1 + n2
    sparse = ref.sparse and not (Xp < 0).any()
    if sparse != ref.sparse:  # negative values in the perturbation: all entries take part
        ref = Ref(ref.Xc, sparse=False)
    kx, cx = _nzkeys(Xp, 1, sparse, G)
    k = np.concatenate([ref.k, kx])
    k.sort(kind="stable")  # two sorted runs: a merge; at equal values controls (bit 0) come first
    isx = k & 1
    csx = np.zeros(len(k) + 1, np.int64)  # csx[i] = perturbation entries before position i
    np.cumsum(isx, out=csx[1:])
    ix = np.flatnonzero(isx)  # perturbation entries, gene-major
    # controls at or below each perturbation entry, within its gene (ix - #x before = #y before)
    c = np.zeros(len(ix) + 1)
    np.cumsum(ix - csx[ix], out=c[1:])
    e = np.cumsum(cx)
    U1 = c[e] - c[e - cx] - cx * ref.before  # per gene: sum of #controls <= x over nonzero x
    U1 += cx * ref.z + (n1 - cx) * ref.z / 2.0  # zeros: below every nonzero x; ties among zeros
    # tie runs (equal value, any group): rare in continuous data, so handled on their own
    v = k >> 1
    dup = np.flatnonzero(v[1:] == v[:-1])  # position i+1 ties with i
    tie = np.zeros(G)
    if len(dup):
        first = np.r_[True, dup[1:] != dup[:-1] + 1]  # dup positions starting a new run
        rs = dup[first]  # run starts (the run spans rs .. re inclusive)
        re = np.r_[dup[np.flatnonzero(first)[1:] - 1], dup[-1]] + 1
        t = (re - rs + 1).astype(np.float64)
        nx = (csx[re + 1] - csx[rs]).astype(np.float64)
        gene = k[rs] >> 33
        np.add.at(U1, gene, -nx * (t - nx) / 2.0)  # le counted tied controls fully: take half back
        np.add.at(tie, gene, t ** 3 - t)
    tz = (n1 - cx + ref.z).astype(np.float64)
    tie += tz ** 3 - tz
    U = np.maximum(U1, n1 * n2 - U1)
    s2 = n1 * n2 / 12.0 * ((n + 1.0) - tie / (n * (n - 1.0)))
    ok = s2 > 0
    z = np.where(ok, (U - n1 * n2 / 2.0 - 0.5) / np.sqrt(np.where(ok, s2, 1.0)), 0.0)
    p = np.where(ok, np.clip(0.5 * _erfc(z / math.sqrt(2.0)) * 2.0, 0.0, 1.0), 1.0)
    return U1, p


def bh(p):
    """Benjamini-Hochberg along the last axis (scipy.stats.false_discovery_control, 'bh')."""
    p = np.asarray(p, dtype=np.float64)
    m = p.shape[-1]
    if m <= 1:
        return p.copy()
    order = np.argsort(p, axis=-1)
    ps = np.take_along_axis(p, order, -1) * (m / np.arange(1, m + 1, dtype=np.float64))
    ps = np.minimum.accumulate(ps[..., ::-1], axis=-1)[..., ::-1]
    out = np.empty_like(ps)
    np.put_along_axis(out, order, ps, -1)
    return np.clip(out, 0.0, 1.0)


def _expm1f():
    """expm1 in float32 exactly as numba/pdex computes it (glibc expm1f); numpy's otherwise."""
    try:
        import ctypes
        f = ctypes.CDLL("libm.so.6").expm1f
        f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
        uf = np.frompyfunc(lambda v: f(v), 1, 1)
        # one ctypes call per value (~0.5 us): past 2M values use numpy's (differs by an ulp at times)
        return lambda x: (uf(np.asarray(x, np.float32)).astype(np.float32) if np.size(x) <= 2_000_000
                          else np.expm1(np.asarray(x, np.float32)))
    except (OSError, AttributeError):
        return lambda x: np.expm1(np.asarray(x, np.float32))


expm1f = _expm1f()


def lfc(m_pert, m_ctrl):
    """log2 fold change of geometric-type means (pdex, epsilon 0) from float32 log1p means."""
    e_p, e_c = expm1f(m_pert).astype(np.float64), expm1f(m_ctrl).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        l = np.log2(e_p / e_c)
    l[np.isnan(l)] = 0.0
    return l


def _pseudo(X, k, rng):
    """k pseudo-replicates: means of a random partition of the rows into k parts."""
    k = max(1, min(k, len(X)))
    parts = np.array_split(rng.permutation(len(X)), k)
    return np.stack([X[i].astype(np.float64).mean(0) for i in parts]).astype(np.float32)


def de(X_pert, X_ctrl, pseudobulk=0, seed=0):
    """DE of one perturbation vs control: dict(lfc, p, fdr, U) per gene (float64 arrays).

    pseudobulk=k > 0 tests k pseudo-replicate means per side instead of cells (avoids the
    pseudoreplication of cell-level tests; much less power). LFC always uses all cells."""
    X_pert, X_ctrl = np.asarray(X_pert, np.float32), np.asarray(X_ctrl, np.float32)
    l = lfc(X_pert.mean(0), X_ctrl.mean(0))
    if pseudobulk:
        rng = np.random.default_rng(seed)
        X_pert, X_ctrl = _pseudo(X_pert, pseudobulk, rng), _pseudo(X_ctrl, pseudobulk, rng)
    U, p = mwu(X_pert, Ref(X_ctrl))
    return dict(lfc=l, p=p, fdr=bh(p), U=U)


def summarise(X, lab, allp, ci, de_on=True, ed_on=False, pseudobulk=0, seed=0):
    """One file, one context, one pass over its groups (no sorted copy of X is made):
    mu (groups, G) float64 pseudobulks; with de_on, DE of every non-control group vs the control
    (lfc, p, fdr as (P, G)); with ed_on, the energy distance of every group to the control."""
    code = np.searchsorted(allp, lab)
    order = np.argsort(code, kind="stable")  # within a group: original row order, as pdex
    st = np.r_[0, np.cumsum(np.bincount(code, minlength=len(allp)))]
    idx = [order[st[i]:st[i + 1]] for i in range(len(allp))]
    rng = np.random.default_rng(seed)
    C = X[idx[ci]]
    out = dict(mu=np.zeros((len(allp), X.shape[1])))
    if de_on:
        m32 = np.zeros((len(allp), X.shape[1]), np.float32)
        ref = Ref(_pseudo(C, pseudobulk, rng) if pseudobulk else C)
        ps = []
    if ed_on:
        sc, ed = _mean_pdist(C), []
    for i in range(len(allp)):
        Xi = C if i == ci else X[idx[i]]
        out["mu"][i] = Xi.sum(0, dtype=np.float64) / len(Xi)
        if de_on:
            m32[i] = Xi.mean(0)  # float32, as pdex
            if i != ci:
                ps.append(mwu(_pseudo(Xi, pseudobulk, rng) if pseudobulk else Xi, ref)[1])
        if ed_on and i != ci:  # float32 arithmetic, as cell-eval: 2 * delta - sigma_x - sigma_y
            ed.append(np.float32(2) * _mean_pdist(Xi, C) - _mean_pdist(Xi) - sc)
    keep = [i for i in range(len(allp)) if i != ci]
    if de_on:
        p = np.stack(ps) if ps else np.zeros((0, X.shape[1]))
        out.update(lfc=lfc(m32, m32[ci][None, :])[keep], p=p, fdr=bh(p))
    if ed_on:
        out["ed"] = np.array(ed, np.float64)
    return out


# -----------------------------------------------------------------------------------------------
# Small helpers with cell-eval's exact conventions


def _avg_rank(x):
    o = np.argsort(x, kind="stable")
    s = x[o]
    r = np.empty(len(x))
    new = np.r_[True, s[1:] != s[:-1]]
    gid = np.cumsum(new) - 1
    first = np.flatnonzero(new)
    cnt = np.diff(np.r_[first, len(x)])
    r[o] = first[gid] + (cnt[gid] + 1) / 2.0
    return r


def pearson(x, y):
    """Pearson r in float64; NaN for constant input or fewer than 2 points (scipy gives NaN)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or (x == x[0]).all() or (y == y[0]).all():
        return float("nan")
    xm, ym = x - x.mean(), y - y.mean()
    r = (xm * ym).sum() / math.sqrt((xm * xm).sum() * (ym * ym).sum())
    return float(min(1.0, max(-1.0, r)))


def spearman(x, y):
    """polars pl.corr(method='spearman'): Pearson of average ranks; NaN when degenerate."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2:
        return float("nan")
    return pearson(_avg_rank(x), _avg_rank(y))


def _clf_curve(y, s):
    o = np.argsort(s, kind="mergesort")[::-1]
    y, s = y[o], s[o]
    idx = np.r_[np.flatnonzero(np.diff(s)), len(y) - 1]
    tps = np.cumsum(y)[idx]
    return tps, 1 + idx - tps


def average_precision(y, s):
    """sklearn.metrics.average_precision_score for binary labels."""
    tps, fps = _clf_curve(y, s)
    prec, rec = tps / (tps + fps), tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, rec]) * prec))


def roc_auc(y, s):
    """sklearn roc_curve + auc (trapezoid)."""
    tps, fps = _clf_curve(y, s)
    fpr, tpr = np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]
    return float(np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr))


def describe(col, null):
    """polars DataFrame.describe() of one float column (null = missing, NaN kept as a value)."""
    v = col[~null]
    n = len(v)
    out = [float(n), float(null.sum())]
    if n == 0:
        return out + [None] * 7
    out += [float(v.mean()), float(v.std(ddof=1)) if n > 1 else None]
    fin = v[~np.isnan(v)]
    out.append(float(fin.min()) if len(fin) else float("nan"))
    s = np.sort(v)  # NaN sorts last, as in polars
    out += [float(s[int(math.floor((n - 1) * q + 0.5))]) for q in (0.25, 0.5, 0.75)]
    out.append(float(fin.max()) if len(fin) else float("nan"))
    return out


STATS = ["count", "null_count", "mean", "std", "min", "25%", "50%", "75%", "max"]


class Table(dict):
    """Ordered columns name -> np.ndarray, plus `null` masks, `notes` and `info`."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.null, self.notes, self.info = {}, [], {}

    def write_csv(self, path):
        cols = list(self)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for i in range(len(self[cols[0]]) if cols else 0):
                row = []
                for c in cols:
                    v = self[c][i]
                    if c in self.null and self.null[c][i] or v is None:
                        row.append("")
                    elif isinstance(v, (float, np.floating)):
                        row.append("NaN" if np.isnan(v) else repr(float(v)))
                    else:
                        row.append(str(v))
                w.writerow(row)


def aggregate(per):
    """agg_results: describe() of every metric column (cell-eval's get_agg_results)."""
    agg = Table(statistic=np.array(STATS, dtype=object))
    for c, v in per.items():
        if c in ("perturbation", "context"):
            continue
        null = per.null.get(c, np.zeros(len(v), bool))
        agg[c] = np.array(describe(np.asarray(v, np.float64), null), dtype=object)
    return agg


def read_csv_table(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    t = Table()
    for j, c in enumerate(rows[0]):
        vals = [r[j] for r in rows[1:]]
        try:
            t[c] = np.array([float(v) if v != "" else np.nan for v in vals])
            t.null[c] = np.array([v == "" for v in vals])
        except ValueError:
            t[c] = np.array(vals, dtype=object)
    return t


def score(agg_user, agg_base):
    """cell-eval `score` (VCC 2025): mean over metrics of (u-b)/(1-b) (best 1) or 1-u/b (best 0),
    NaN -> 0, clipped at 0; only metrics cell-eval registers (pdisc_norm, counts excluded).
    Returns (dict metric -> normalised score, avg_score)."""
    def mean_row(t):
        i = list(t["statistic"]).index("mean")
        return {c: (np.nan if t[c][i] is None else float(t[c][i])) for c in t if c != "statistic"}
    u, b = mean_row(agg_user), mean_row(agg_base)
    if list(u) != list(b):
        raise UserError(f"columns differ: {list(u)} != {list(b)}")
    # cell-eval drops pearson_edistance (an error) with one perturbation; we keep it as NaN, so
    # leave it out of the score when it is NaN on both sides to get cell-eval's number
    skip = set(EXTRA) | {m for m in ("pearson_edistance",) if m in u and np.isnan(u[m]) and np.isnan(b[m])}
    zero = [m for m in u if BEST.get(m) == 0 and m not in skip]
    one = [m for m in u if BEST.get(m) == 1 and m not in skip]
    U0, B0 = np.array([u[m] for m in zero]), np.array([b[m] for m in zero])
    U1, B1 = np.array([u[m] for m in one]), np.array([b[m] for m in one])
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.concatenate([1.0 - U0 / B0, (U1 - B1) / (1.0 - B1)])
    s[np.isnan(s)] = 0.0
    s = np.clip(s, 0, None)
    out = dict(zip(zero + one, s.tolist()))
    return out, float(s.mean()) if len(s) else float("nan")


def group_spread(p, r, c):
    """One group's heterogeneity and magnitude diagnostics: pred (n,G), real (m,G), controls (k,G) ->
    (spread, shift, mae_mean, delta_r). spread = mean per-gene std of pred / of real (1 = same
    heterogeneity; a collapsed model gives ~0); shift = |mean(pred) - mean(ctrl)| / |mean(real) -
    mean(ctrl)| (1 = right magnitude); mae_mean = mean |mean(pred) - mean(real)|; delta_r = pearson of
    the two deltas."""
    mc = c.mean(0)
    dp, dr = p.mean(0) - mc, r.mean(0) - mc
    corr = np.corrcoef(dp, dr)[0, 1] if dp.std() > 0 and dr.std() > 0 else float("nan")
    return (p.std(0).mean() / max(r.std(0).mean(), 1e-12), np.linalg.norm(dp) / max(np.linalg.norm(dr), 1e-12),
            float(np.abs(p.mean(0) - r.mean(0)).mean()), corr)


def spread_stats(pred, real, pert_col, control, context_col=None):
    """Medians over (context, perturbation) groups of group_spread, for a pred/real pair (paths or
    (X, obs[, genes])); controls are the real file's control cells of the group's context."""
    lp, cp, _ = load_obs(pred, pert_col, context_col)
    lr, cr, _ = load_obs(real, pert_col, context_col)
    cp = np.zeros(len(lp), object) if cp is None else cp
    cr = np.zeros(len(lr), object) if cr is None else cr
    Xp, Xr = load_X(pred), load_X(real)
    rows = []
    for c in sorted(set(cr)):
        ctrl = Xr[(cr == c) & (lr == control)]
        for p in sorted(set(lr[cr == c]) - {control}):
            mp, mr = (cp == c) & (lp == p), (cr == c) & (lr == p)
            if mp.any() and mr.any() and len(ctrl):
                rows.append(group_spread(Xp[mp], Xr[mr], ctrl))
    med = np.nanmedian(np.array(rows, dtype=np.float64), 0) if rows else [np.nan] * 4
    return dict(zip(("spread", "shift", "mae_mean", "delta_r"), map(float, med)))


# -----------------------------------------------------------------------------------------------
# Loading


def normlog_if_counts(X, which, allow_discrete=False):
    """cell-eval's guard: integer data is normalize_total(median)+log1p'd; fractional data must be
    in [0, 15)."""
    frac = False  # any fractional entry (> 1e-3)? row blocks, stopping at the first one
    for i in range(0, len(X), 2048):
        b = X[i:i + 2048]
        if ((b - np.floor(b)) > 1e-3).any():
            frac = True
            break
    if not frac:
        if allow_discrete:
            return X
        print(f"WARNING: {which} looks like integer counts: normalising to the median library size "
              "and log1p (as cell-eval does; pass --allow-discrete to skip)")
        tot = X.sum(1, dtype=np.float64)
        tgt = np.median(tot[tot > 0])
        sc = np.where(tot > 0, tgt / np.where(tot > 0, tot, 1), 1.0).astype(np.float32)
        return np.log1p(X * sc[:, None])
    if X.min() < 0:
        raise UserError(f"{which}: negative values; expected log1p data")
    if X.max() >= 15 and not allow_discrete:
        raise UserError(f"{which}: max {X.max():.2f} >= 15, not log1p data")
    return X


# -----------------------------------------------------------------------------------------------
# Metrics of one context


def _topk_names(sig, key, k):
    """Genes (indices) of the top k of a significant set ranked by float32 |LFC| desc, stable."""
    idx = np.flatnonzero(sig)
    o = np.argsort(-key[idx], kind="stable")
    return idx[o[:k]]


def _dist(A, B, metric):
    """(len(A), len(B)) distances in float64."""
    A, B = torch.from_numpy(np.asarray(A, np.float64)), torch.from_numpy(np.asarray(B, np.float64))
    if metric == "l1":
        return torch.cdist(A, B, p=1).numpy()
    if metric == "l2":
        d2 = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2 * A @ B.T
        return d2.clamp_min(0).sqrt().numpy()
    na = A.norm(dim=1, keepdim=True)
    nb = B.norm(dim=1, keepdim=True)
    A, B = A / torch.where(na == 0, 1, na), B / torch.where(nb == 0, 1, nb)
    return (1 - A @ B.T).clamp(0, 2).numpy()


def _mean_pdist(A, B=None, chunk=1024, exact_max=64_000_000):
    """Mean Euclidean distance over all pairs (self-pairs included as zeros).

    Matches sklearn's pairwise_distances on float32 data bit for bit where possible: squared
    distances in float64 (-2 a.b + |a|^2 + |b|^2), stored as float32, clamped at 0, float32 sqrt,
    then numpy's float32 mean over the whole matrix. Past exact_max pairs it accumulates float64
    chunk sums instead (no n^2 matrix; differs from cell-eval in the 7th digit)."""
    A64 = torch.from_numpy(np.asarray(A, np.float64))
    B64 = A64 if B is None else torch.from_numpy(np.asarray(B, np.float64))
    xx, yy = (A64 * A64).sum(1), (B64 * B64).sum(1)
    big = len(A64) * len(B64) > exact_max
    D = None if big else np.empty((len(A64), len(B64)), np.float32)
    tot = 0.0
    for i in range(0, len(A64), chunk):
        d2 = -2 * (A64[i:i + chunk] @ B64.T)
        d2 += xx[i:i + chunk, None]
        d2 += yy[None, :]
        if big:
            if B is None:
                d2[torch.arange(len(d2)), torch.arange(i, i + len(d2))] = 0
            tot += float(d2.clamp_min(0).sqrt().sum())
        else:
            D[i:i + chunk] = d2.numpy()
    if big:
        return np.float32(tot / (len(A64) * len(B64)))
    np.maximum(D, 0, out=D)
    if B is None:
        np.fill_diagonal(D, 0)
    np.sqrt(D, out=D)
    return D.mean()


def discrimination(eff_pred, eff_real, genes, perts, metric):
    """cell-eval discrimination_score_<metric>: 1 - rank/T of the true perturbation among the real
    deltas sorted by distance to the predicted delta, the perturbation's own gene column excluded.
    The exclusion is applied to the all-column distances in closed form (no per-row recompute)."""
    P = np.asarray(eff_pred, np.float64)
    R = np.asarray(eff_real, np.float64)
    gi = {g: i for i, g in enumerate(genes)}
    rows = np.array([i for i, p in enumerate(perts) if p in gi], dtype=np.int64)
    col = np.array([gi[perts[i]] for i in rows], dtype=np.int64)
    if metric == "cosine":
        dot, npn, nrn = P @ R.T, (P * P).sum(1), (R * R).sum(1)
        npn = np.broadcast_to(npn[:, None], dot.shape).copy()
        nrn = np.broadcast_to(nrn[None, :], dot.shape).copy()
        if len(rows):  # drop column g_i from row i: dot, |pred_i|^2 and every |real_q|^2
            pc, rc = P[rows, col], R[:, col].T  # (r,), (r, T)
            dot[rows] -= pc[:, None] * rc
            npn[rows] -= (pc ** 2)[:, None]
            nrn[rows] -= rc ** 2
        npn, nrn = np.sqrt(np.clip(npn, 0, None)), np.sqrt(np.clip(nrn, 0, None))
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = dot / (np.where(npn == 0, 1, npn) * np.where(nrn == 0, 1, nrn))
        D = np.clip(1 - cos, 0, 2)
    else:
        D = _dist(P, R, metric)
        if len(rows):
            diff = P[rows, col][:, None] - R[:, col].T  # (r, T): the excluded column's term
            if metric == "l1":
                D[rows] -= np.abs(diff)
            else:
                D[rows] = np.sqrt(np.clip(D[rows] ** 2 - diff ** 2, 0, None))
    out = np.empty(len(perts))
    for i in range(len(perts)):
        rank = np.flatnonzero(np.argsort(D[i]) == i)[0]
        out[i] = 1.0 - rank / len(perts)
    return out


def _context_metrics(Sp, Sr, allp, ci, genes, metrics):
    """All requested metrics for one context from the two files' summaries.
    Returns (Table per perturbation, DE dicts, notes, info, perts)."""
    perts = np.array([p for p in allp if p != allp[ci]], dtype=object)
    T = len(perts)
    keep = [i for i in range(len(allp)) if i != ci]
    mu_r, mu_p = Sr["mu"], Sp["mu"]  # pseudobulks; deltas against each file's own control
    d_r, d_p = mu_r[keep] - mu_r[ci], mu_p[keep] - mu_p[ci]
    m_r, m_p = mu_r[keep], mu_p[keep]
    per = Table(perturbation=perts)
    notes, info = [], {}
    want = set(metrics)
    DE = None
    if want & set(DE_METRICS):
        DE = {k: dict(lfc=S["lfc"], p=S["p"], fdr=S["fdr"]) for k, S in (("real", Sr), ("pred", Sp))}
        f32 = {k: np.float32(v["fdr"]) for k, v in DE.items()}
        l32 = {k: np.float32(v["lfc"]) for k, v in DE.items()}
        sig = {k: f32[k] < FDR for k in DE}
        n_r, n_p = sig["real"].sum(1), sig["pred"].sum(1)
        key = {k: np.abs(l32[k]) for k in DE}
        none_r, none_p = n_r.sum() == 0, n_p.sum() == 0
        for kind in ("overlap", "precision"):
            for k in KS:
                name = f"{kind}_at_{k or 'N'}"
                if name not in want:
                    continue
                v = np.zeros(T)
                for i in range(T):
                    if none_r or none_p:
                        break  # cell-eval: no significant gene anywhere in one file -> all 0
                    n = n_r[i] if kind == "overlap" else n_p[i]
                    keff = min(k or n, n)
                    if keff == 0:
                        continue
                    a = _topk_names(sig["real"][i], key["real"][i], keff)
                    b = _topk_names(sig["pred"][i], key["pred"][i], keff)
                    v[i] = len(np.intersect1d(a, b)) / keff
                per[name] = v
        has = n_r > 0
        nullmask = ~has
        if "de_spearman_sig" in want:
            v = 1.0 if not has.any() else spearman(n_r[has], n_p[has])
            per["de_spearman_sig"] = np.full(T, v)
        if "de_direction_match" in want:
            v = np.full(T, np.nan)
            for i in np.flatnonzero(has):
                s = sig["real"][i]
                v[i] = np.mean(np.sign(l32["real"][i][s]) == np.sign(l32["pred"][i][s]))
            per["de_direction_match"], per.null["de_direction_match"] = v, nullmask
        if "de_spearman_lfc_sig" in want:
            v = np.full(T, np.nan)
            for i in np.flatnonzero(has):
                s = sig["real"][i]
                v[i] = spearman(l32["real"][i][s], l32["pred"][i][s])
            per["de_spearman_lfc_sig"], per.null["de_spearman_lfc_sig"] = v, nullmask
        if "de_sig_genes_recall" in want:
            v = np.full(T, np.nan)
            v[has] = (sig["real"] & sig["pred"]).sum(1)[has] / n_r[has]
            per["de_sig_genes_recall"], per.null["de_sig_genes_recall"] = v, nullmask
        if "de_nsig_counts" in want:
            per["de_nsig_counts_real"], per["de_nsig_counts_pred"] = n_r.astype(float), n_p.astype(float)
        for name, fn in (("pr_auc", average_precision), ("roc_auc", roc_auc)):
            if name in want:
                v = np.full(T, np.nan)
                sc = -np.log10(np.clip(f32["pred"], np.float32(1e-10), np.float32(1.0)))
                for i in range(T):
                    y = sig["real"][i].astype(np.float64)
                    if 0 < y.sum() < len(y):
                        v[i] = fn(y, sc[i].astype(np.float64))
                per[name] = v
        info["n_no_real_de"] = int((~has).sum())
        if (~has).any():
            notes.append(f"{int((~has).sum())}/{T} perturbations have no real DE gene (FDR<{FDR}): "
                         "cell-eval scores their overlap/precision 0 and leaves direction/recall/"
                         "lfc-spearman null")
        if not has.any():
            notes.append("no real DE gene anywhere: de_spearman_sig is set to 1.0 by convention")
    if "pearson_delta" in want:
        per["pearson_delta"] = np.array([pearson(d_p[i], d_r[i]) for i in range(T)])
    if "mse" in want:
        per["mse"] = ((m_p - m_r) ** 2).mean(1)
    if "mae" in want:
        per["mae"] = np.abs(m_p - m_r).mean(1)
    if "mse_delta" in want:
        per["mse_delta"] = ((d_p - d_r) ** 2).mean(1)
    if "mae_delta" in want:
        per["mae_delta"] = np.abs(d_p - d_r).mean(1)
    for m in ("l1", "l2", "cosine"):
        if f"discrimination_score_{m}" in want:
            per[f"discrimination_score_{m}"] = discrimination(d_p, d_r, genes, perts, m)
    if T == 1 and want & {"discrimination_score_l1", "discrimination_score_l2",
                          "discrimination_score_cosine"}:
        notes.append("one perturbation: discrimination scores are trivially 1")
    if "pearson_edistance" in want:
        if T < 2:
            per["pearson_edistance"] = np.full(T, np.nan)
            notes.append("pearson_edistance is NaN: a correlation over perturbations needs >= 2 "
                         "(cell-eval errors and drops the column)")
        else:
            ed = {"real": Sr["ed"], "pred": Sp["ed"]}
            per["pearson_edistance"] = np.full(T, pearson(ed["real"], ed["pred"]))
            e = ed["pred"]
            if np.ptp(e) <= 1e-5 * max(np.abs(e).max(), 1e-12):
                notes.append("predicted energy distances are constant across perturbations (e.g. "
                             "identical predicted cells): pearson_edistance is NaN or rounding noise")
            info["edistance_real"], info["edistance_pred"] = ed["real"], ed["pred"]
    if "pdisc_norm" in want:
        D = _dist(m_p, m_r, "l1")  # paper: pseudobulks, no column excluded
        per["pdisc_norm"] = 1 - 2 * (D < np.diag(D)[:, None]).sum(1) / T
    gone = [c for c in list(per) if c in per.null and per.null[c].all()]
    for c in gone:  # cell-eval emits no column for a metric without any value
        del per[c], per.null[c]
    if gone:
        notes.append(f"no value for {', '.join(gone)} (no perturbation with real DE): column "
                     "omitted, as cell-eval does")
    # mode-collapse check: mean off-diagonal correlation of predicted (and real) deltas
    if T >= 2:
        for k, d in (("pred", d_p), ("real", d_r)):
            c = np.corrcoef(d) if np.all(d.std(1) > 0) else None
            info[f"cross_pert_corr_{k}"] = (float(c[~np.eye(T, dtype=bool)].mean())
                                            if c is not None else float("nan"))
    return per, DE, notes, info, perts


def evaluate(pred, real, pert_col, control, context_col=None, profile="full", pseudobulk=0,
             allow_discrete=False, out=None, threads=1):
    """Evaluate pred vs real (paths or (X, obs[, genes])). Returns (per_pert, agg) Tables; with
    context_col each context is scored separately and per_pert gets a `context` column, agg pools
    all rows and `<context>_*.csv` hold the per-context files. Writes CSVs when out is set.
    threads: torch threads for the distance GEMMs (1 by default: on shared CPUs oversubscribed
    torch threads were 10x slower)."""
    nt = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _evaluate(pred, real, pert_col, control, context_col, profile, pseudobulk,
                         allow_discrete, out)
    finally:
        torch.set_num_threads(nt)


def load_obs(x, pert_col, context_col=None):
    """Labels (and contexts) of a path or an (X, obs[, genes]) pair, and the genes."""
    if isinstance(x, (str, os.PathLike)):
        with H5AD(x) as f:
            genes = np.asarray(f.var_names(), dtype=object)
            lab, ctx = f.column(pert_col), (f.column(context_col) if context_col else None)
    else:
        X, obs = x[0], x[1]
        genes = np.asarray(x[2] if len(x) > 2 else [str(i) for i in range(X.shape[1])], object)
        lab, ctx = np.asarray(obs[pert_col]), (np.asarray(obs[context_col]) if context_col else None)
    lab = np.array([str(v) for v in lab], dtype=object)
    ctx = None if ctx is None else np.array([str(v) for v in ctx], dtype=object)
    return lab, ctx, genes


def load_X(x):
    if isinstance(x, (str, os.PathLike)):
        with H5AD(x) as f:
            return f.matrix("X").block(0, f.n_obs)
    return np.asarray(x[0], dtype=np.float32)


def _evaluate(pred, real, pert_col, control, context_col, profile, pseudobulk, allow_discrete, out):
    metrics = PROFILES[profile] if isinstance(profile, str) else list(profile)
    lp, cp, gp = load_obs(pred, pert_col, context_col)
    lr, cr, gr = load_obs(real, pert_col, context_col)
    if len(gp) != len(gr) or not np.array_equal(gp, gr):
        raise UserError("pred and real must have identical var names in the same order")
    if context_col is not None and set(cp) != set(cr):
        raise UserError(f"contexts differ: pred {sorted(set(cp))} vs real {sorted(set(cr))}")
    ctxs = [None] if context_col is None else sorted(set(cr))
    plan = {}
    for c in ctxs:
        mp = np.ones(len(lp), bool) if c is None else cp == c
        mr = np.ones(len(lr), bool) if c is None else cr == c
        pr_, pp_ = np.unique(lr[mr]), np.unique(lp[mp])
        if not np.array_equal(pr_, pp_):
            raise UserError(f"perturbations differ{'' if c is None else f' in {c}'}: only real "
                             f"{sorted(set(pr_) - set(pp_))}, only pred {sorted(set(pp_) - set(pr_))}")
        if control not in pr_:
            raise UserError(f"control '{control}' not in the files{'' if c is None else f' ({c})'}")
        allp = pr_.astype(object)
        plan[c] = (mp, mr, allp, int(np.flatnonzero(allp == control)[0]))
    want = set(metrics)
    de_on, ed_on = bool(want & set(DE_METRICS)), "pearson_edistance" in want
    # one file at a time: only one expression matrix in memory
    S = {}
    for which, x, lab in (("real", real, lr), ("pred", pred, lp)):
        X = normlog_if_counts(load_X(x), which, allow_discrete)
        for c, (mp, mr, allp, ci) in plan.items():
            m = mr if which == "real" else mp
            S[which, c] = summarise(X[m] if c is not None else X, lab[m], allp, ci, de_on,
                                    ed_on and len(allp) > 2, pseudobulk)
        del X
    if out:
        os.makedirs(out, exist_ok=True)
    tabs, notes, infos = [], [], {}
    for c, (mp, mr, allp, ci) in plan.items():
        per, DE, nt, info, perts = _context_metrics(S["pred", c], S["real", c], allp, ci, gr, metrics)
        pre = "" if c is None else f"{str(c).replace('/', '-')}_"
        if out:
            per.write_csv(os.path.join(out, f"{pre}results.csv"))
            aggregate(per).write_csv(os.path.join(out, f"{pre}agg_results.csv"))
            if DE is not None:
                for k, d in DE.items():
                    write_de(os.path.join(out, f"{pre}{k}_de.csv"), d, perts, gr)
        if c is not None:
            notes += [f"[{c}] {n}" for n in nt]
            infos[c] = info
            t = Table(context=np.array([c] * len(per["perturbation"]), dtype=object), **per)
            t.null = per.null
            per = t
        else:
            notes += nt
            infos = info
        tabs.append(per)
    per = tabs[0] if len(tabs) == 1 else _concat(tabs)
    agg = aggregate(per)
    agg.notes, agg.info = notes, infos
    if out and context_col is not None:
        per.write_csv(os.path.join(out, "results.csv"))
        agg.write_csv(os.path.join(out, "agg_results.csv"))
    return per, agg


def _concat(tabs):
    t = Table()
    cols = []
    for x in tabs:
        cols += [c for c in x if c not in cols]
    for c in cols:
        n = [len(x["perturbation"]) for x in tabs]
        t[c] = np.concatenate([x[c] if c in x else np.full(k, np.nan) for x, k in zip(tabs, n)])
        t.null[c] = np.concatenate([x.null.get(c, np.zeros(k, bool)) if c in x else np.ones(k, bool)
                                    for x, k in zip(tabs, n)])
    return t


def write_de(path, d, perts, genes):
    """cell-eval's DE table schema: target, feature, log2_fold_change, p_value, fdr."""
    gq = [str(g) for g in genes]
    with open(path, "w") as f:
        f.write("target,feature,log2_fold_change,p_value,fdr\n")
        for i, p in enumerate(perts):
            cols = [map(repr, d[k][i].tolist()) for k in ("lfc", "p", "fdr")]
            f.write("".join(map(f"{p},{{}},{{}},{{}},{{}}\n".format, gq, *cols)))


# -----------------------------------------------------------------------------------------------
# Report and CLI


def fmt(v):
    return "nan" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.4f}"


def report(per, agg):
    """Human-readable summary: mean of each metric, notes on conventions, mode-collapse check."""
    i = list(agg["statistic"]).index("mean")
    lines = [f"{len(per['perturbation'])} perturbations"]
    lines += [f"  {c:<28s} {fmt(agg[c][i])}" for c in agg if c != "statistic"]
    info = agg.info
    for c, inf in (info.items() if info and isinstance(next(iter(info.values()), None), dict)
                   else [(None, info)]):
        tag = f"[{c}] " if c is not None else ""
        if "cross_pert_corr_pred" in inf:
            lines.append(f"{tag}cross-perturbation correlation of deltas: pred "
                         f"{fmt(inf['cross_pert_corr_pred'])}, real {fmt(inf['cross_pert_corr_real'])}"
                         " (pred >> real suggests mode collapse)")
        if "n_no_real_de" in inf:
            lines.append(f"{tag}perturbations with no real DE signal: {inf['n_no_real_de']}")
    for c in agg:
        if c != "statistic" and agg[c][i] is not None and np.isnan(agg[c][i]):
            v = np.asarray(per[c], np.float64)[~per.null.get(c, np.zeros(len(per[c]), bool))]
            if np.isfinite(v).any():
                lines.append(f"NOTE: {c} mean is NaN (cell-eval convention: NaN rows propagate); "
                             f"nanmean {np.nanmean(v):.4f} over {np.isfinite(v).sum()}/{len(v)} rows")
    lines += [f"NOTE: {n}" for n in agg.notes]
    return "\n".join(lines)


def plot(per, path):
    """Optional PNG: per-perturbation histograms of a few metrics (only if matplotlib imports)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ms = [m for m in ("pearson_delta", "mae", "discrimination_score_l1", "overlap_at_N") if m in per]
    fig, ax = plt.subplots(1, len(ms), figsize=(3.2 * len(ms), 2.6))
    for a, m in zip(np.atleast_1d(ax), ms):
        v = np.asarray(per[m], np.float64)
        a.hist(v[np.isfinite(v)], bins=20)
        a.set_title(m, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    ap = Parser(prog="python -m state.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pred", required=True)
    ap.add_argument("--real", required=True)
    ap.add_argument("--pert_col", default="target_gene")
    ap.add_argument("--control", default="non-targeting")
    ap.add_argument("--context_col", default=None)
    ap.add_argument("--profile", default="full", choices=list(PROFILES))
    ap.add_argument("--pseudobulk", type=int, default=0, help="DE on k pseudo-replicates per side")
    ap.add_argument("--allow_discrete", action="store_true")
    ap.add_argument("--baseline_agg", default=None, help="agg_results.csv of a baseline: VCC score")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="results folder (default: eval/ beside --pred)")
    a = ap.parse_args(dashes(argv))
    a.out = a.out or os.path.join(os.path.dirname(os.path.abspath(a.pred)), "eval")
    for f in (a.pred, a.real):
        if not os.path.isfile(f):
            raise UserError(f"python -m state.eval: {f}: no such file; check --pred/--real")
    output_folder(a.out, [os.path.dirname(os.path.abspath(a.pred))], "python -m state.eval")
    with staged_folder(a.out) as d:  # every file or none: a failure leaves --out as it was
        per, agg = evaluate(a.pred, a.real, a.pert_col, a.control, a.context_col, a.profile,
                            a.pseudobulk, a.allow_discrete, out=d, threads=a.threads)
        png = plot(per, os.path.join(d, "metrics.png"))
    print(report(per, agg))
    if a.baseline_agg:
        s, avg = score(agg, read_csv_table(a.baseline_agg))
        print(f"VCC-2025 score vs baseline: {100 * avg:.2f} " +
              " ".join(f"{k}={v:.3f}" for k, v in s.items()))
    print(f"wrote {a.out}/results.csv, agg_results.csv" + (", metrics.png" if png else ""))
    return per, agg


if __name__ == "__main__":
    from state.errors import run
    run("python -m state.eval", main, None, __doc__)
    sys.exit(0)
