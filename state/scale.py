"""
Scale rules of expression matrices: what a matrix holds (raw counts, log1p, scaled, normalised but not
logged, SPEC 2.3), how counts reach log1p (normalize_log1p), how a user's rows reach the scale a run was
trained on (recipe_scaling), the every-row check behind the sampled detector (check_rows), and the seurat
flavour of highly variable genes (SPEC 2.4). prepare uses all of them; predict.py simulate and embed.py
transform use the same rules on a user's matrix, so training data and later inputs are judged alike.
"""

from dataclasses import dataclass, field

import numpy as np

from state.errors import UserError
from state.h5ad import H5ADError


def say(*a):
    """The data layer's log line: prepare and the scale rules speak as one ([data])."""
    print("[data]", *a, flush=True)


# -----------------------------------------------------------------------------
# scale detection (SPEC 2.3)

@dataclass
class Scale:
    kind: str  # counts | log1p | scaled | normalized
    target_sum: float = None  # library size of log1p data when expm1 row sums are constant
    evidence: dict = field(default_factory=dict)

    def __str__(self):
        e = self.evidence
        s = f"{self.kind} (rows sampled {e.get('rows')}, min {e.get('min'):.3g}, max {e.get('max'):.3g}"
        s += f", integer {e.get('integer')}"
        if "cv_expm1_sums" in e:
            s += f", CV of expm1 row sums {e['cv_expm1_sums']:.3g}"
        if self.target_sum:
            s += f", target_sum {self.target_sum:g}"
        if "median_total" in e:
            s += f", median total {e['median_total']:g}"
        return s + ")"


def sample_rows(matrix, n, seed):
    """About n rows as 20 contiguous blocks at random places (random single rows are slow in gzip)."""
    N, G = matrix.shape
    n = int(min(n, max(500, 5e7 // max(G, 1)), N))  # bound the sample to ~200 MB of float32
    if n >= N:
        return matrix.block(0, N)
    k = min(20, n)
    size = n // k
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(N - size + 1, size=k, replace=False))
    return np.concatenate([matrix.block(int(s), int(s) + size) for s in starts])


def detect_scale(matrix, n=10_000, seed=0):
    """Classify a Matrix as counts / log1p / scaled / normalized from ~n sampled rows; returns Scale."""
    return classify(sample_rows(matrix, n, seed), f"{matrix.path}: '{matrix.key}'")


def classify(x, where):
    """Scale of the rows x (n, G) float32 (see Scale); `where` names them in errors."""
    if not np.isfinite(x).all():
        r, c = np.argwhere(~np.isfinite(x))[0]
        raise H5ADError(f"{where} has non-finite values (NaN or inf), e.g. in sampled row {r}, column {c}")
    mn, mx = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    integer = bool(np.all(x == np.round(x)))
    ev = dict(rows=len(x), min=mn, max=mx, integer=integer)
    if mn < 0:
        return Scale("scaled", None, ev)
    if integer:
        tot = x.sum(1, dtype=np.float64)
        ev["median_total"] = float(np.median(tot))
        return Scale("counts", None, ev)
    if mx < 15:
        s = np.expm1(x.astype(np.float64)).sum(1)
        s = s[s > 0]
        cv = float(s.std() / s.mean()) if len(s) else float("nan")
        ev["cv_expm1_sums"] = cv
        ts = float(np.round(s.mean())) if cv < 0.01 else None
        return Scale("log1p", ts, ev)
    return Scale("normalized", None, ev)


def normalize_log1p(x, target_sum):
    """log1p of each row of float32 x scaled to sum to target_sum (rows summing to 0 stay 0), in place."""
    tot = x.sum(1, dtype=np.float64)
    x *= np.where(tot > 0, target_sum / np.maximum(tot, 1e-30), 0.0).astype(np.float32)[:, None]
    return np.log1p(x, out=x)


def recipe_scaling(x, recipe, where, who="the run"):
    """How rows x of a user's matrix reach the scale a prepare `recipe` gave the training data: the target
    sum to normalise raw counts to (then log1p, normalize_log1p), or None to take them as they are (log1p
    values; a recipe that kept values unlogged). Any other scale is a ValueError naming what was found
    and what `who` expects. Used by predict.py simulate and embed.py transform."""
    if not recipe.get("log1p", True):
        return None
    ts = recipe.get("target_sum")
    want = f"log1p of counts normalised to {ts:g}" if ts else "log1p values"
    sc = classify(x, where)
    if sc.kind == "log1p":
        if ts and sc.target_sum and abs(sc.target_sum / ts - 1) > 0.05:
            say(f"WARNING: {where} is log1p of counts normalised to {sc.target_sum:g}; {who}'s data used {ts:g}: "
                f"expression levels are shifted by log({sc.target_sum / ts:.3g})")
        return None
    if sc.kind == "counts" and ts:
        return float(ts)
    if sc.kind == "counts":
        raise UserError(f"{where} holds raw counts but {who}'s recipe records no target sum (it was prepared "
                         f"from {want}); give log1p values")
    raise UserError(f"{where} looks {sc} but {who} expects {want} (or raw counts, which are normalised to it); "
                     "give raw counts (e.g. --key=layers/counts) or log1p values")


def check_rows(x, kind, where, name=None, top=15.0):
    """Every row of a block x (n, G) of a user's matrix against the scale found for the matrix (the
    detector only samples rows): always finite; kind "nonneg": and >= 0; "counts": and integers; "log1p":
    and below `top`; "any": finite only. A row that is not is an H5ADError (a UserError) naming the cell,
    `name(i)` for block row i. prepare checks every row it writes with it; predict.py simulate and
    embed.py transform every row they read."""
    name = name or (lambda i: f"row {i}")
    bad = ~np.isfinite(x)
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        raise H5ADError(f"{where} has non-finite values (NaN/Inf), e.g. cell {name(r)} column {c}; fix or drop it")
    if kind == "any" or not x.size:
        return
    if float(x.min()) < 0:
        r, c = (int(v) for v in np.argwhere(x < 0)[0])
        raise H5ADError(f"{where} has a negative value {x[r, c]:g} in cell {name(r)}, column {c}: expression "
                        "values cannot be negative (scaled/centred data? use the raw counts: --key layers/counts)")
    if kind == "counts" and not np.array_equal(x, np.round(x)):
        r, c = (int(v) for v in np.argwhere(x != np.round(x))[0])
        raise H5ADError(f"{where} looked like integer counts but cell {name(r)} has the fractional value "
                        f"{x[r, c]:g} in column {c}: mixed scales in one matrix")
    if kind == "log1p" and float(x.max()) >= top:
        r, c = np.unravel_index(int(np.argmax(x)), x.shape)
        raise H5ADError(f"{where} looked like log1p data but cell {name(r)} has the value {x[r, c]:g} (>= {top:g}, "
                        "not a log1p expression): mixed scales in one matrix")


# -----------------------------------------------------------------------------
# highly variable genes, seurat flavour (SPEC 2.4; scanpy's documented algorithm)

def hvg_seurat(mean, var, n_top, genes=None):
    """Indices (ascending, i.e. in the matrix's gene order) of the n_top genes with the highest dispersion
    z-scored within 20 bins of log1p(mean). mean, var: per-gene mean and (ddof=1) variance of expm1(x)."""
    mean = np.asarray(mean, np.float64).copy()
    var = np.asarray(var, np.float64)
    mean[mean == 0] = 1e-12
    disp = var / mean
    disp[disp == 0] = np.nan  # constant genes have no dispersion: never selected
    disp = np.log(disp)
    lm = np.log1p(mean)
    ok = ~np.isnan(disp)
    if n_top > ok.sum():
        raise UserError(f"asked for {n_top} highly variable genes but only {int(ok.sum())} of "
                         f"{len(mean)} genes are non-constant; ask for at most {int(ok.sum())}")
    # pd.cut(lm, 20): equal-width bins over [min, max], the left edge pushed out by 0.1% of the range
    lo, hi = lm.min(), lm.max()
    edges = np.linspace(lo, hi, 21)
    edges[0] -= (hi - lo) * 0.001 if hi > lo else 0.001
    b = np.clip(np.searchsorted(edges, lm, side="left") - 1, 0, 19)
    z = np.full(len(mean), np.nan)
    for k in np.unique(b):
        m = (b == k) & ok
        if m.sum() == 0:
            continue
        d = disp[m]
        mu = d.mean()
        sd = d.std(ddof=1) if m.sum() > 1 else np.nan
        if m.sum() == 1:  # scanpy: a one-gene bin gets normalised dispersion 1
            mu, sd = 0.0, d[0]
        with np.errstate(invalid="ignore", divide="ignore"):
            z[m] = np.nan_to_num((d - mu) / sd)  # sd 0 (all equal) -> 0, as scanpy's nan_to_num
    z = np.where(np.isnan(z), -np.inf, z)  # constant genes last
    top = np.argsort(-z, kind="stable")[:n_top]
    return np.sort(top)
