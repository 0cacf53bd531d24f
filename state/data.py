"""
Data layer: read `.h5ad` files, detect their scale, prepare them once into a memory-mapped matrix whose
rows are sorted by (context, perturbation, batch), and sample cell sets with matched controls (SPEC 2, 5).

    python -m state.data prepare IN.h5ad [IN2.h5ad 'more/*.h5ad' DIR ...] OUT_DIR \\
        [--pert-col target_gene] [--control non-targeting] [--context-col cell_type] [--batch-col gem_group] \\
        [--key X|layers/counts|raw/X|obsm/X_state] [--genes-key X] [--gene-col gene_symbol] [--genes genes.txt] [--intersect] \\
        [--hvg 2000] [--normalize auto|yes|no] [--target-sum 1e4] [--assume normalized|log1p] \\
        [--dtype float32|float16|bfloat16] [--keep cell_type=A172,T98G,U87MG] [--modality]
    python -m state.data info OUT_DIR

Unset column names and the control label are detected (SPEC 2.2) and printed. The scale of the matrix is
detected from ~10k sampled rows (SPEC 2.3): counts are normalised (median library size, or --target-sum)
and log1p'd, log1p data is kept as is (never logged twice), scaled data and normalised-but-not-logged data
are refused with the reason.

OUT_DIR holds:
    X.bin       (n_cells, n_genes) raw row-major array (float32, float16, or bfloat16 stored as uint16)
    codes.npy   (n_cells, 4) int32: context, perturbation, batch, source-file codes
    G.bin       (n_cells, n_genes_out), only with --genes-key: gene-space rows of the same cells (decoder target)
    index.json  genes, obs names, vocabularies, groups (contiguous row ranges), recipe, scale, checksums
"""

import argparse
import glob
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from state.h5ad import H5AD, H5ADError

PERT_COLS = ("target_gene", "perturbation", "condition", "gene", "drugname_drugconc", "drug")
CONTROLS = ("non-targeting", "control", "ctrl", "DMSO_TF", "PBS", "NT")
CONTEXT_COLS = ("cell_type", "cell_line", "celltype", "cell_line_id")
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}  # bf16 stored as raw bits
FORMAT = 1


def say(*a):
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


def _sample(matrix, n, seed):
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
    x = _sample(matrix, n, seed)  # (n, G) float32
    where = f"{matrix.path}: '{matrix.key}'"
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
        raise ValueError(f"asked for {n_top} highly variable genes but only {int(ok.sum())} of "
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


# -----------------------------------------------------------------------------
# prepare

def _expand(inputs):
    out = []
    for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs):
        p = str(p)
        if os.path.isdir(p):
            hits = sorted(glob.glob(os.path.join(p, "*.h5ad")) + glob.glob(os.path.join(p, "*.h5")))
        elif any(ch in p for ch in "*?["):
            hits = sorted(glob.glob(p))
        else:
            hits = [p]
        if not hits:
            raise H5ADError(f"{p}: matches no .h5ad file")
        out += hits
    return out


def md5(path, blk=1 << 23):
    h = hashlib.md5()
    with open(path, "rb") as f:
        while b := f.read(blk):
            h.update(b)
    return h.hexdigest()


def _same_partition(a, b):
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    pairs = np.unique(ia.astype(np.int64) * (ib.max() + 1) + ib)
    return len(pairs) == ia.max() + 1 == ib.max() + 1


def _labels(h, col):
    v = h.column(col)
    miss = np.array([x is None for x in v]) if v.dtype == object else np.zeros(len(v), bool)
    if miss.any():
        raise H5ADError(f"{h.path}: obs column '{col}' has {int(miss.sum())} missing values "
                        f"(e.g. cell '{h.obs_names[np.argmax(miss)]}'); fill or drop them")
    return v.astype(str)


def _resolve_cols(h, pert_col, control, context_col, batch_col):
    """Check or detect (pert_col, control, context_col, batch_col) in one file; prints what it detected."""
    cols = h.columns("obs")
    have = ", ".join(cols)
    if pert_col is None:
        found = [c for c in PERT_COLS if c in cols]
        if not found:
            raise H5ADError(f"{h.path}: no perturbation column found (tried {', '.join(PERT_COLS)}); "
                            f"obs columns: {have}; pass --pert-col")
        labs = {c: _labels(h, c) for c in found}
        differ = [c for c in found[1:] if not _same_partition(labs[found[0]], labs[c])
                  and any(k in set(labs[c]) for k in CONTROLS)]
        if differ:
            raise H5ADError(f"{h.path}: ambiguous perturbation column: '{found[0]}' and "
                            f"{', '.join(repr(c) for c in differ)} group the cells differently; pass --pert-col")
        pert_col = found[0]
        say(f"{h.path}: detected perturbation column '{pert_col}'"
            + (f" (same grouping as {', '.join(found[1:])})" if len(found) > 1 else ""))
    elif pert_col not in cols:
        raise H5ADError(f"{h.path}: perturbation column '{pert_col}' not in obs; available: {have}")
    labels = set(_labels(h, pert_col).tolist())
    if control is None:
        found = [c for c in CONTROLS if c in labels]
        if len(found) > 1:
            raise H5ADError(f"{h.path}: ambiguous control label in '{pert_col}': {found}; pass --control")
        if not found:
            raise H5ADError(f"{h.path}: no control label in obs column '{pert_col}' (tried "
                            f"{', '.join(CONTROLS)}); labels include {sorted(labels)[:10]}; pass --control")
        control = found[0]
        say(f"{h.path}: detected control label '{control}' in '{pert_col}'")
    elif control not in labels:
        raise H5ADError(f"{h.path}: control label '{control}' not found in obs column '{pert_col}'; "
                        f"labels include {sorted(labels)[:10]}")
    if context_col is None:
        found = [c for c in CONTEXT_COLS if c in cols]
        context_col = found[0] if found else ""
        say(f"{h.path}: " + (f"detected context column '{context_col}'" if found else
                             "no context column (tried " + ", ".join(CONTEXT_COLS) + "): one context 'all'"))
    elif context_col and context_col not in cols:
        raise H5ADError(f"{h.path}: context column '{context_col}' not in obs; available: {have}")
    if batch_col and batch_col not in cols:
        raise H5ADError(f"{h.path}: batch column '{batch_col}' not in obs; available: {have}")
    return pert_col, control, context_col, batch_col or ""


def _row_sums(m, chunk):
    """Per-row sums of a Matrix without densifying it whole. (N,) float64"""
    N = m.shape[0]
    if m.sparse:
        out = np.zeros(N, np.float64)
        for a in range(0, N, chunk):
            b = min(a + chunk, N)
            p0, p1 = m.indptr[a], m.indptr[b]
            d = np.asarray(m.data[p0:p1], np.float64)
            cs = np.concatenate([[0], np.cumsum(d)])
            out[a:b] = cs[m.indptr[a + 1:b + 1] - p0] - cs[m.indptr[a:b] - p0]
        return out
    return np.concatenate([m.block(a, min(a + chunk, N)).sum(1, dtype=np.float64) for a in range(0, N, chunk)])


def _blocks(src, chunk, desc):
    """Kept, transformed, gene-selected float32 blocks of one source: yields (kept_positions, (n, G))."""
    from tqdm import tqdm
    m, N = src["m"], src["m"].shape[0]
    for a in tqdm(range(0, N, chunk), desc=desc, unit="blk", file=sys.stderr, leave=False):
        b = min(a + chunk, N)
        sel = src["keep"][a:b]
        if not sel.any():
            continue
        x = m.block(a, b)[sel]  # (n, G_file)
        if not np.isfinite(x).all():
            r, c = np.argwhere(~np.isfinite(x))[0]
            raise H5ADError(f"{src['path']}: '{m.key}' has non-finite values (NaN or inf), e.g. cell "
                            f"'{src['names'][a + np.flatnonzero(sel)[r]]}' column {c}")
        # every row is checked against the detected scale (the detector only samples rows)
        kind = src["scale"].kind
        if kind != "embedding" and (x < 0).any():
            r, c = np.argwhere(x < 0)[0]
            raise H5ADError(f"{src['path']}: '{m.key}' has a negative value {x[r, c]:g} in cell "
                            f"'{src['names'][a + np.flatnonzero(sel)[r]]}' (row {a + np.flatnonzero(sel)[r]}), "
                            f"column {c}: expression values cannot be negative "
                            "(scaled/centred data? use the raw counts: --key layers/counts)")
        if src["tr"] == "normalize+log1p" and kind == "counts" and not np.array_equal(x, np.round(x)):
            r, c = np.argwhere(x != np.round(x))[0]
            raise H5ADError(f"{src['path']}: '{m.key}' looked like integer counts but cell "
                            f"'{src['names'][a + np.flatnonzero(sel)[r]]}' (row {a + np.flatnonzero(sel)[r]}) "
                            f"has the fractional value {x[r, c]:g} in column {c}: mixed scales in one matrix")
        if src["tr"] == "none" and kind == "log1p" and x.size and x.max() > 20:
            r, c = np.unravel_index(np.argmax(x), x.shape)
            raise H5ADError(f"{src['path']}: '{m.key}' looked like log1p data but cell "
                            f"'{src['names'][a + np.flatnonzero(sel)[r]]}' (row {a + np.flatnonzero(sel)[r]}) "
                            f"has the value {x[r, c]:g} (> 20, not a log1p expression): mixed scales in one matrix")
        if src["tr"] == "normalize+log1p":
            tot = src["totals"][a:b][sel]
            f = np.where(tot > 0, src["target_sum"] / np.maximum(tot, 1e-30), 0.0).astype(np.float32)
            x *= f[:, None]
            np.log1p(x, out=x)
        elif src["tr"] == "log1p":
            np.log1p(x, out=x)
        yield np.flatnonzero(sel) + a, x[:, src["cols"]]


def prepare(inputs, out_dir, pert_col=None, control=None, context_col=None, batch_col=None, key="X",
            hvg=None, normalize="auto", target_sum=None, dtype="float32", keep=None,
            intersect=False, genes=None, gene_col=None, assume=None, chunk=None, modality=False,
            genes_key=None, obsm_genes=None):
    """Convert one or more .h5ad files into OUT_DIR (see module docstring) and return Prepared(out_dir).
    Extra (additive) options: intersect (align multiple files on their common genes), genes (a list of
    gene names to keep, in order), gene_col (var column holding gene names), assume ('normalized' or
    'log1p' to override the scale detector), modality (key labels as 'type:label' when a
    perturbation_type column gives one label several types).

    genes_key ('X', 'layers/counts', ...): with an embedding `key` (obsm/X_state), also store the gene-space
    matrix of the same cells in the same row order as G.bin (the ST gene decoder's target, SPEC 3.3). The
    gene options (hvg, genes, gene_col, intersect, normalize, target_sum, assume) apply to it; its genes
    are Prepared.gene_names_out.

    obsm_genes: the gene names of an obsm input's columns (`--obsm-genes FILE`); without it they come
    from uns['<key>_var_names'] or from var where `highly_variable` marks exactly that many genes (see
    obsm_names), so a perturbed gene's own column can be left out of the discrimination score."""
    paths = _expand(inputs)
    if dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' not one of {', '.join(DTYPES)}")
    normalize = {"yes": True, "no": False, "true": True, "false": False}.get(str(normalize).lower(), normalize)
    hs = [H5AD(p) for p in paths]
    out_dir = Path(out_dir)
    try:
        gt = None
        if genes_key:
            # the gene matrix first, into a scratch folder, with the same filters and labels: rows come
            # out in the same (context, pert, batch, file) order; _prepare checks that before adopting it
            tmp = out_dir / f".genes.tmp{os.getpid()}"
            gt = _prepare(hs, tmp, pert_col, control, context_col, batch_col, genes_key, hvg, normalize,
                          target_sum, dtype, keep or {}, intersect, genes, gene_col, assume, chunk, modality)
            pert_col, control = gt.pert_col, gt.control
            context_col, batch_col = gt.context_col or "", gt.batch_col or None
            emb = key.startswith("obsm/") and not key.endswith("X_hvg")
            if emb:  # gene options belong to the gene matrix, not to the embedding
                hvg, genes, gene_col, intersect, assume = None, None, None, False, None
        try:
            return _prepare(hs, out_dir, pert_col, control, context_col, batch_col, key, hvg, normalize,
                            target_sum, dtype, keep or {}, intersect, genes, gene_col, assume, chunk, modality,
                            gene_target=gt, obsm_genes=obsm_genes)
        finally:
            if gt is not None:
                import shutil
                shutil.rmtree(gt.dir, ignore_errors=True)
    finally:
        for h in hs:
            h.close()


EMBEDDINGS = ("X_state", "X_pca", "X_umap", "X_tsne", "X_scvi", "X_uce", "X_scgpt", "X_geneformer")


def obsm_names(h, k, n, given=None):
    """Names of the n columns of obsm/<k>: `given` (a list, e.g. --obsm-genes FILE), else
    uns['<k>_var_names'], else the var names where var['highly_variable'] marks exactly n genes (scanpy's
    X_hvg layout), else '<k>_0..n-1'. Unnamed gene-valued columns are warned about: the perturbed gene's
    own column then stays in the discrimination score, unlike cell-eval on the same cells."""
    if given is not None:
        given = [str(g) for g in given]
        if len(given) != n:
            raise H5ADError(f"{h.path}: --obsm-genes lists {len(given)} names for the {n} columns of obsm/{k}")
        if len(set(given)) != n:
            raise H5ADError(f"{h.path}: --obsm-genes lists a gene twice")
        return np.array(given)
    u = h.uns(f"{k}_var_names")
    if u is not None and len(np.atleast_1d(u)) == n:
        say(f"{h.path}: obsm/{k} columns named from uns['{k}_var_names']")
        return np.array([x.decode() if isinstance(x, bytes) else str(x) for x in np.atleast_1d(u)])
    if "highly_variable" in h.columns("var"):
        hv = np.asarray(h.column("highly_variable", "var")).astype(bool)
        if hv.sum() == n:
            say(f"{h.path}: obsm/{k} columns named from var where highly_variable ({n} genes)")
            return h.var_names()[hv].astype(str)
    if k not in EMBEDDINGS:
        say(f"WARNING: {h.path}: obsm/{k} has no gene names (no uns['{k}_var_names'], no var['highly_variable'] "
            f"marking {n} genes): columns are named {k}_0..{k}_{n - 1}, so a perturbed gene's own column cannot "
            "be left out of discrimination scores; pass --obsm-genes FILE (one name per column)")
    return np.array([f"{k}_{i}" for i in range(n)])


def _prepare(hs, out, pert_col, control, context_col, batch_col, key, hvg, normalize, target_sum, dtype,
             keep, intersect, genes, gene_col, assume, chunk, modality, gene_target=None, obsm_genes=None):
    # --- columns, labels, keep filter ---
    srcs = []
    for h in hs:
        pc, ctl, cc, bc = _resolve_cols(h, pert_col, control, context_col, batch_col)
        pert_col, control, context_col, batch_col = pc, ctl, cc, bc  # the first file fixes them for the rest
        N = h.n_obs
        s = dict(path=h.path, h=h, names=h.obs_names.astype(str), pert=_labels(h, pc),
                 ctx=_labels(h, cc) if cc else np.full(N, "all", object),
                 bat=_labels(h, bc) if bc else np.full(N, "all", object), keep=np.ones(N, bool))
        for col, vals in keep.items():
            if col not in h.columns("obs"):
                raise H5ADError(f"{h.path}: --keep column '{col}' not in obs; available: {', '.join(h.columns('obs'))}")
            s["keep"] &= np.isin(_labels(h, col), list(vals))
        if "perturbation_type" in h.columns("obs"):
            s["ptype"] = _labels(h, "perturbation_type")
        srcs.append(s)
    for col, vals in keep.items():
        seen = set().union(*[set(_labels(s["h"], col).tolist()) for s in srcs])
        bad = [v for v in vals if v not in seen]
        if bad:
            raise H5ADError(f"--keep {col}: value(s) {bad} not found in obs column '{col}' of "
                            f"{', '.join(s['path'] for s in srcs)}; values: {sorted(seen)[:20]}")
    if sum(s["keep"].sum() for s in srcs) == 0:
        raise H5ADError("no cells left after --keep")

    # --- genes: names, alignment across files, requested list ---
    for s in srcs:
        h = s["h"]
        s["m"] = h.matrix(key)
        if s["m"].shape[0] != h.n_obs:
            raise H5ADError(f"{h.path}: '{key}' has {s['m'].shape[0]} rows but obs has {h.n_obs}")
        if s["m"].key.startswith("obsm/"):
            s["genes"] = obsm_names(h, s["m"].key[5:], s["m"].shape[1], obsm_genes)
        else:
            s["genes"] = h.var_names(gene_col).astype(str)
            if s["m"].key == "raw/X" and "raw" in h.f and "var" in h.f["raw"]:
                g = h.f["raw/var"]
                ik = g.attrs.get("_index", "_index")
                s["genes"] = np.array([x.decode() if isinstance(x, bytes) else str(x) for x in g[ik][:]])
            if len(s["genes"]) != s["m"].shape[1]:
                raise H5ADError(f"{h.path}: {len(s['genes'])} gene names for {s['m'].shape[1]} columns of '{key}'")
            u, n = np.unique(s["genes"], return_counts=True)
            if (n > 1).any():
                raise H5ADError(f"{h.path}: duplicate gene names in '{key}' ({', '.join(u[n > 1][:10])}"
                                f"{' ...' if (n > 1).sum() > 10 else ''}): a gene would take another column's "
                                "values; make var names unique (adata.var_names_make_unique()) or pass --gene-col")
    gl = list(srcs[0]["genes"])
    if len(srcs) > 1:
        sets = [set(s["genes"].tolist()) for s in srcs]
        for s, st in zip(srcs, sets):
            if len(st) != len(s["genes"]):
                raise H5ADError(f"{s['path']}: duplicate gene names; cannot align files by gene name")
        common = set.intersection(*sets)
        if len(common) < len(set.union(*sets)):
            miss = {s["path"]: sorted(set.union(*sets) - st) for s, st in zip(srcs, sets) if set.union(*sets) - st}
            if not intersect:
                msg = "; ".join(f"{p} lacks {len(v)} genes (e.g. {', '.join(v[:10])})" for p, v in miss.items())
                raise H5ADError(f"gene sets differ between files: {msg}. Pass --intersect to keep the "
                                f"{len(common)} common genes")
            dropped = sorted(set.union(*sets) - common)
            say(f"--intersect: keeping {len(common)} common genes, dropping {len(dropped)} "
                f"(e.g. {', '.join(dropped[:10])})")
            gl = [g for g in gl if g in common]
            if not gl:
                raise H5ADError("the files share no gene names")
    if genes is not None:
        genes = [str(g) for g in genes]
        have = set(gl)
        unknown = [g for g in genes if g not in have]
        if unknown:
            mouse = sum(g[:1].isupper() and g[1:].islower() for g in unknown) > len(unknown) / 2 and \
                sum(g.isupper() for g in gl) > len(gl) / 2
            raise H5ADError(f"{len(unknown)} requested genes not in {srcs[0]['path']}"
                            f"{' (after alignment)' if len(srcs) > 1 else ''}: {', '.join(unknown[:20])}"
                            + (" (they look like mouse symbols, e.g. Actb; the file has human upper-case "
                               "symbols, which do not match)" if mouse else ""))
        gl = genes
    for s in srcs:
        pos = {g: i for i, g in enumerate(s["genes"].tolist())}
        s["cols"] = np.array([pos[g] for g in gl], np.int64)

    # --- scale and recipe ---
    emb = key.startswith("obsm/") or srcs[0]["m"].key.startswith("obsm/")
    for s in srcs:
        if emb:
            s["scale"], s["tr"] = Scale("embedding", None, {}), "none"
            say(f"{s['path']}: '{s['m'].key}' is an embedding: stored as is")
            continue
        sc = detect_scale(s["m"])
        s["scale"] = sc
        say(f"{s['path']}: '{s['m'].key}' looks like {sc}")
        kind = assume or sc.kind
        layers = list(s["h"].f["layers"].keys()) if "layers" in s["h"].f else []
        if kind == "scaled":
            raise H5ADError(f"{s['path']}: '{s['m'].key}' has negative values (min {sc.evidence['min']:.3g}): "
                            f"it looks scaled/centred, which cannot be un-done. Use the raw counts instead: "
                            f"--key layers/counts or --key raw/X (layers here: {layers or 'none'}"
                            f"{', raw/X' if 'raw' in s['h'].f else ''})")
        if kind == "normalized" and assume != "normalized":
            raise H5ADError(f"{s['path']}: '{s['m'].key}' is fractional with max {sc.evidence['max']:.3g} >= 15: "
                            "normalised but not log-transformed? Pass --assume normalized to log1p it, or "
                            f"--key layers/counts (layers here: {layers or 'none'})")
        if kind == "counts":
            s["tr"] = "normalize+log1p" if normalize in ("auto", True) else "none"
            if s["tr"] == "none":
                say(f"WARNING {s['path']}: keeping raw counts (--normalize no); models expect log1p")
        elif kind == "normalized":
            s["tr"] = "log1p"
        else:
            s["tr"] = "none"
            if normalize is True:
                say(f"{s['path']}: already log1p: not normalising or logging again")
    csize = chunk or int(max(256, min(8192, 2 ** 26 // (4 * max(max(s["m"].shape[1] for s in srcs), 1)))))
    if any(s["tr"] == "normalize+log1p" for s in srcs):
        for s in srcs:
            if s["tr"] == "normalize+log1p":
                s["totals"] = _row_sums(s["m"], csize)
        if target_sum is None:
            target_sum = float(np.median(np.concatenate([s["totals"][s["keep"]] for s in srcs
                                                         if s["tr"] == "normalize+log1p"])))
            say(f"normalising counts to the median library size {target_sum:g} (--target-sum 1e4 for the paper's)")
        else:
            say(f"normalising counts to target_sum {target_sum:g}")
        for s in srcs:
            s["target_sum"] = float(target_sum)
    logged = all(s["tr"] != "none" or s["scale"].kind == "log1p" or (assume == "log1p") for s in srcs)

    # --- HVGs (one streamed pass: per-gene mean and variance of expm1(x)) ---
    if hvg:
        if emb or not logged:
            raise ValueError("--hvg needs log1p expression data (not an embedding or raw counts)")
        s1 = np.zeros(len(gl)); s2 = np.zeros(len(gl)); n = 0
        for s in srcs:
            for _, x in _blocks(s, csize, f"hvg {Path(s['path']).name}"):
                e = np.expm1(x.astype(np.float64))
                s1 += e.sum(0); s2 += (e * e).sum(0); n += len(x)
        mean = s1 / n
        var = (s2 / n - mean ** 2) * n / max(n - 1, 1)
        top = hvg_seurat(mean, np.maximum(var, 0), int(hvg))
        say(f"selected {len(top)} highly variable genes (seurat flavour) of {len(gl)}")
        gl = [gl[i] for i in top]
        for s in srcs:
            s["cols"] = s["cols"][top]

    # --- vocabularies, sort order, groups ---
    cat = lambda k: np.concatenate([np.asarray(s[k], object)[s["keep"]] for s in srcs])
    pert, ctx, bat, names = cat("pert"), cat("ctx"), cat("bat"), cat("names")
    src = np.concatenate([np.full(int(s["keep"].sum()), i, np.int32) for i, s in enumerate(srcs)])
    if any("ptype" in s for s in srcs):  # modality aliasing (SPEC 2.2): same label, different perturbation_type
        pt = np.concatenate([s["ptype"][s["keep"]] if "ptype" in s else np.full(int(s["keep"].sum()), "?", object)
                             for s in srcs])
        types = {}
        for p_, t_ in set(zip(pert.tolist(), pt.tolist())):
            if p_ != control:
                types.setdefault(p_, set()).add(t_)
        alias = sorted(p_ for p_, t_ in types.items() if len(t_) > 1)
        if alias and modality:
            pert = np.where(pert == control, pert, pt.astype(object) + ":" + pert.astype(object))
            say(f"modality: {len(alias)} labels occur with several perturbation_type values (e.g. {alias[0]}: "
                f"{sorted(types[alias[0]])}); perturbations keyed as 'type:label'")
        elif alias:
            say(f"WARNING modality aliasing: {len(alias)} perturbation labels occur with different "
                f"perturbation_type values (e.g. {', '.join(alias[:5])}: {sorted(types[alias[0]])}); they share "
                "one vocabulary entry. Keep one modality with --keep (e.g. --keep cell_type=...) or pass "
                "--modality to key them as 'type:label'")
    pert_names = [control] + sorted(set(pert.tolist()) - {control})
    context_names = sorted(set(ctx.tolist()))
    batch_names = sorted(set(bat.tolist()))
    lut = lambda v: {x: i for i, x in enumerate(v)}
    lp, lc, lb = lut(pert_names), lut(context_names), lut(batch_names)
    P = np.array([lp[x] for x in pert], np.int32)
    C = np.array([lc[x] for x in ctx], np.int32)
    B = np.array([lb[x] for x in bat], np.int32)
    for k, name in enumerate(context_names):
        if not np.any((C == k) & (P == 0)):
            raise H5ADError(f"context '{name}' (obs column '{context_col or '-'}') has no control cells "
                            f"('{control}' in '{pert_col}'); drop it with --keep or fix the labels")
    n_dup = len(names) - len(set(names.tolist()))
    if n_dup:
        say(f"WARNING {n_dup} duplicate obs names across the inputs")
    order = np.lexsort((B, P, C))  # rows sorted by (context, pert, batch); stable = file order within a group
    dest = np.empty(len(order), np.int64)
    dest[order] = np.arange(len(order))
    codes = np.stack([C, P, B, src], 1)[order]  # (N, 4)
    kk = codes[:, :3].astype(np.int64)
    brk = np.flatnonzero(np.any(np.diff(kk, axis=0) != 0, axis=1)) + 1
    starts = np.concatenate([[0], brk]); stops = np.concatenate([brk, [len(kk)]])
    groups = [[int(kk[a, 0]), int(kk[a, 1]), int(kk[a, 2]), int(a), int(b)] for a, b in zip(starts, stops)]

    # --- write X.bin: stream each source in file order, scatter rows to their sorted position ---
    out.mkdir(parents=True, exist_ok=True)
    Ncell, G = len(order), len(gl)
    tmp = out / f"X.bin.tmp{os.getpid()}"
    X = np.memmap(tmp, dtype=DTYPES[dtype], mode="w+", shape=(Ncell, G))
    off = 0
    try:  # a bad row found while streaming leaves nothing behind
        for i, s in enumerate(srcs):
            pos = np.cumsum(s["keep"]) - 1 + off  # file row -> concatenated kept index
            for rows, x in _blocks(s, csize, f"write {Path(s['path']).name}"):
                d = dest[pos[rows]]
                X[d] = to_storage(x, dtype)
            off += int(s["keep"].sum())
        X.flush()
    except BaseException:
        tmp.unlink(missing_ok=True)
        if not any(out.iterdir()):
            out.rmdir()
        raise
    del X
    os.replace(tmp, out / "X.bin")
    np.save(out / "codes.npy", codes.astype(np.int32))
    sources = [dict(path=os.path.abspath(s["path"]), md5=md5(s["path"]), n_obs=int(len(s["keep"])),
                    kept=int(s["keep"].sum()), scale=dict(kind=s["scale"].kind, target_sum=s["scale"].target_sum,
                                                          evidence=s["scale"].evidence), transform=s["tr"],
                    se=s["h"].uns("nanostate_se") if emb else None)  # SE provenance of obsm/X_state (embed.py)
               for s in srcs]
    se_hashes = {(x["se"] or {}).get("se_hash") for x in sources if x["se"]}
    if len(se_hashes) > 1:  # embeddings from different SE checkpoints live in different spaces
        raise H5ADError(f"'{key}' comes from different SE checkpoints {sorted(se_hashes)} across files; "
                        "re-embed them with one checkpoint (embed.py transform --ckpt=...)")
    recipe = dict(key=key, normalize=str(normalize), target_sum=target_sum, log1p=bool(logged and not emb),
                  hvg=int(hvg) if hvg else None, genes=None if genes is None else "requested list",
                  intersect=bool(intersect), keep=keep, dtype=dtype, assume=assume, gene_col=gene_col,
                  modality=bool(modality))
    gtx = None
    if gene_target is not None:  # the gene-space matrix of the same cells (prepare(genes_key=...))
        gx = gene_target.index
        if gx["obs_names"] != names[order].tolist() or not np.array_equal(
                np.load(gene_target.dir / "codes.npy"), codes.astype(np.int32)):
            raise H5ADError(f"--genes-key {gx['recipe']['key']}: its rows do not line up with '{key}' "
                            "(internal error: same filters should give the same order)")
        os.replace(gene_target.dir / "X.bin", out / "G.bin")
        gtx = dict(key=gx["recipe"]["key"], genes=gx["genes"], n_genes=gx["n_genes"], dtype=gx["dtype"],
                   recipe=gx["recipe"], checksum=gx["checksum"],
                   sources=[dict(path=x["path"], scale=x["scale"], transform=x["transform"]) for x in gx["sources"]])
        recipe["genes_key"] = gtx["key"]
    cs = hashlib.sha256(json.dumps([[x["md5"] for x in sources], recipe, gl, context_names, pert_names]
                                   + ([gtx["checksum"]] if gtx else []),
                                   sort_keys=True).encode()).hexdigest()[:16]
    index = dict(format=FORMAT, n_cells=Ncell, n_genes=G, dtype=dtype, genes=gl, obs_names=names[order].tolist(),
                 pert_col=pert_col, control=control, context_col=context_col or None, batch_col=batch_col or None,
                 pert_names=pert_names, context_names=context_names, batch_names=batch_names, groups=groups,
                 recipe=recipe, sources=sources, checksum=cs)
    if gtx:
        index["gene_target"] = gtx
    with open(out / "index.json.tmp", "w") as f:
        json.dump(index, f)
    os.replace(out / "index.json.tmp", out / "index.json")
    say(f"wrote {out}: {Ncell} cells x {G} genes ({dtype}), {len(context_names)} contexts, "
        f"{len(pert_names) - 1} perturbations + control '{control}', {len(groups)} groups"
        + (f"; gene targets G.bin from '{gtx['key']}': {gtx['n_genes']} genes" if gtx else ""))
    return Prepared(out)


def to_storage(x, dtype):
    """float32 (n, G) -> the stored dtype (bfloat16 as its raw uint16 bits)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return x.astype(DTYPES[dtype], copy=False)


# -----------------------------------------------------------------------------
# the prepared dataset

@dataclass
class Group:
    context: int
    pert: int
    batch: int
    start: int
    stop: int


class Prepared:
    """A prepared folder: memory-mapped X plus per-row codes, vocabularies and groups (see module docstring)."""

    def __init__(self, out_dir):
        self.dir = Path(out_dir)
        if not (self.dir / "index.json").exists():
            raise H5ADError(f"{out_dir}: not a prepared data folder (no index.json); "
                            "run python -m state.data prepare first")
        with open(self.dir / "index.json") as f:
            self.index = ix = json.load(f)
        self.genes = ix["genes"]
        self.n_cells, self.n_genes, self.dtype = ix["n_cells"], ix["n_genes"], ix["dtype"]
        self.obs_names = np.array(ix["obs_names"])
        self.pert_col, self.context_col, self.batch_col = ix["pert_col"], ix["context_col"], ix["batch_col"]
        self.pert_names, self.context_names, self.batch_names = ix["pert_names"], ix["context_names"], ix["batch_names"]
        self.control = ix["control"]
        self.control_code = self.pert_names.index(self.control)
        codes = np.load(self.dir / "codes.npy")  # (N, 4)
        self.context, self.pert, self.batch, self.source = (np.ascontiguousarray(codes[:, i]) for i in range(4))
        self.groups = [Group(*g) for g in ix["groups"]]
        self.checksum = ix["checksum"]
        self._X, self._pid = None, None
        # optional gene-space targets of the same rows (prepare(..., genes_key=...)): G.bin
        gt = ix.get("gene_target")
        self.genes_key = gt["key"] if gt else None
        self.gene_names_out = list(gt["genes"]) if gt else None
        self.n_genes_out = int(gt["n_genes"]) if gt else 0
        self._G, self._gpid = None, None

    @property
    def X(self):
        """(n_cells, n_genes) memmap, re-opened after a fork (each worker gets its own)."""
        if self._X is None or self._pid != os.getpid():
            self._X = np.memmap(self.dir / "X.bin", dtype=DTYPES[self.dtype], mode="r",
                                shape=(self.n_cells, self.n_genes))
            self._pid = os.getpid()
        return self._X

    @property
    def G(self):
        """(n_cells, n_genes_out) memmap of the gene-space targets, or None without --genes-key."""
        if not self.n_genes_out:
            return None
        if self._G is None or self._gpid != os.getpid():
            gt = self.index["gene_target"]
            self._G = np.memmap(self.dir / "G.bin", dtype=DTYPES[gt["dtype"]], mode="r",
                                shape=(self.n_cells, self.n_genes_out))
            self._gpid = os.getpid()
        return self._G

    def rows_genes(self, idx):
        """Dense float32 gene-space rows (len(idx), n_genes_out), any order (requires --genes-key)."""
        if self.G is None:
            raise ValueError(f"{self.dir}: no gene-space targets (prepare with --genes-key X)")
        idx = np.asarray(idx, np.int64).ravel()
        order = np.argsort(idx, kind="stable")
        out = np.empty((len(idx), self.n_genes_out), np.float32)
        out[order] = self._read(idx[order], genes=True)
        return out

    def __getstate__(self):  # never pickle the memmap's pages into a worker
        d = self.__dict__.copy()
        d["_X"] = None
        d["_G"] = None
        return d

    def rows(self, idx):
        """Dense float32 rows (len(idx), G), any order: one sorted fancy read of the memmap."""
        idx = np.asarray(idx, np.int64).ravel()
        if len(idx) < 2 or np.all(idx[1:] >= idx[:-1]):
            return self._read(idx)
        order = np.argsort(idx, kind="stable")
        out = np.empty((len(idx), self.n_genes), np.float32)
        out[order] = self._read(idx[order])  # sorted reads walk the file forwards
        return out

    def _read(self, idx, genes=False):
        """X[idx] (G[idx] with genes=True) as float32: a single copy out of the page cache for float32."""
        x = (self.G if genes else self.X)[idx]  # (n, G) fancy read of the memmap
        if self.dtype == "bfloat16":
            return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).float().numpy()
        return x.astype(np.float32, copy=False)

    def label(self, what, codes):
        """Names for codes: label('pert', data.pert[idx]) -> np str array."""
        v = {"pert": self.pert_names, "context": self.context_names, "batch": self.batch_names}[what]
        return np.asarray(v, dtype=object)[np.asarray(codes)]

    def __repr__(self):
        return (f"Prepared({self.dir}: {self.n_cells} cells x {self.n_genes} genes, "
                f"{len(self.context_names)} contexts, {len(self.pert_names)} perturbation labels)")


# -----------------------------------------------------------------------------
# cell sets with matched controls (SPEC 5)

def draw_controls(pool, n, rng):
    """n control rows from `pool`, spread as evenly as possible: whole random permutations of the pool,
    then a random subset without replacement for the rest, shuffled (each control is used floor(n/k) or
    ceil(n/k) times). Draws with replacement add sampling noise to a predicted pseudobulk, and a weak
    effect (a few hundredths of a log unit) drowns in it; every predictor (ST and baselines) uses this."""
    pool = np.asarray(pool)
    reps, rest = divmod(int(n), len(pool))
    parts = [rng.permutation(pool) for _ in range(reps)] + [rng.choice(pool, rest, replace=False)]
    return rng.permutation(np.concatenate(parts))


class SetSampler:
    """Sets of `set_size` cells of one (context, pert[, batch]) group, each paired with control cells drawn
    with replacement from the same context (and batch under mapping="batch", falling back to the context).

    train=True: sets padded by resampling the group with replacement, set order reshuffled with seed+epoch,
    every rank gets the same number of steps (the set list wraps around). train=False: unpadded sets
    (lens < set_size, zero rows beyond), fixed order; padded duplicates for equal rank steps have valid=False.
    Batches are dicts of tensors: ctrl, tgt (B,S,G) float32; pert, context, lens (B,) int64; batch (B,S);
    tgt_idx, ctrl_idx (B,S) row indices (-1 = padding); valid (B,) bool; tgt_genes (B,S,G_out) float32 when
    the data has gene-space targets (prepare --genes-key)."""

    def __init__(self, data, rows, set_size, batch_size, seed=0, rank=0, world=1, train=True,
                 control_sets=True, mapping="random"):
        if mapping not in ("random", "batch"):
            raise ValueError(f"mapping '{mapping}' not one of random, batch")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} not in [0, {world})")
        self.data, self.S, self.B = data, int(set_size), int(batch_size)
        self.seed, self.rank, self.world, self.train = seed, rank, world, train
        self.control_sets, self.mapping = control_sets, mapping
        rows = np.unique(np.asarray(rows, np.int64))
        if len(rows) == 0:
            raise ValueError("SetSampler: no rows (empty split?)")
        c, p, b = (data.context[rows].astype(np.int64), data.pert[rows].astype(np.int64),
                   data.batch[rows].astype(np.int64))
        nb, npt = len(data.batch_names), len(data.pert_names)
        ctl = p == data.control_code
        # control pools: context, and (context, batch) under batch mapping
        pools, self.pool_of = [], {}
        for k in np.unique(c):
            m = ctl & (c == k)
            if m.any():
                self.pool_of[(int(k), -1)] = len(pools); pools.append(rows[m])
                if mapping == "batch":
                    for j in np.unique(b[m]):
                        self.pool_of[(int(k), int(j))] = len(pools); pools.append(rows[m & (b == j)])
        self.pool_rows = np.concatenate(pools)
        self.pool_len = np.array([len(x) for x in pools], np.int64)
        self.pool_off = np.concatenate([[0], np.cumsum(self.pool_len)[:-1]])
        # target groups: rows are sorted and the data is sorted by (context, pert, batch), so keys ascend
        key = (c * npt + p) * (nb if mapping == "batch" else 1) + (b if mapping == "batch" else 0)
        brk = np.flatnonzero(np.diff(key)) + 1
        self.groups = []  # (rows, context, pert, pool)
        for g in np.split(np.arange(len(rows)), brk):
            k, pp, bb = int(c[g[0]]), int(p[g[0]]), int(b[g[0]])
            if pp == data.control_code and not control_sets:
                continue
            pool = self.pool_of.get((k, bb if mapping == "batch" else -1), self.pool_of.get((k, -1)))
            if pool is None:
                raise ValueError(f"context '{data.context_names[k]}' has no control cells "
                                 f"('{data.control}') among the sampler's rows, so perturbation "
                                 f"'{data.pert_names[pp]}' cannot be paired with controls")
            self.groups.append((rows[g], k, pp, pool))
        if not self.groups:
            raise ValueError("SetSampler: no target groups (only controls and control_sets=False?)")
        n_sets = sum(-(-len(g[0]) // self.S) for g in self.groups)
        self.steps_per_epoch = -(-n_sets // (self.B * world))
        self.epoch, self.step, self._plan = 0, 0, None

    def __len__(self):
        return self.steps_per_epoch

    def plan(self, epoch):
        """This rank's sets for an epoch: (T (n,S) rows with -1 pad, lens (n,), group id (n,), valid (n,))."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        rng = np.random.default_rng([self.seed, epoch if self.train else 0])
        S, T, L, gid = self.S, [], [], []
        for i, (r, _, _, _) in enumerate(self.groups):
            n = len(r)
            k = -(-n // S)
            perm = rng.permutation(r)
            pad = k * S - n
            if self.train:
                perm = np.concatenate([perm, rng.choice(r, pad, replace=True)])
                L.append(np.full(k, S))
            else:
                perm = np.concatenate([perm, np.full(pad, -1)])
                L.append(np.minimum(S, n - S * np.arange(k)))
            # sort each set's rows (valid prefix; -1 padding stays last): same set, forward memmap reads
            T.append(np.sort(np.where(perm < 0, np.iinfo(np.int64).max, perm).reshape(k, S), axis=1))
            gid.append(np.full(k, i))
        T, L, gid = np.concatenate(T), np.concatenate(L), np.concatenate(gid)
        T[T == np.iinfo(np.int64).max] = -1
        if self.train:
            o = rng.permutation(len(T))
            T, L, gid = T[o], L[o], gid[o]
        per = self.steps_per_epoch * self.B
        w = np.arange(per * self.world) % len(T)  # wrap so every rank has the same number of steps
        valid = np.arange(per * self.world) < len(T)
        sl = slice(self.rank * per, (self.rank + 1) * per)  # contiguous, non-overlapping rank slices
        p = (T[w[sl]], L[w[sl]], gid[w[sl]], valid[sl])
        self._plan = (epoch, p)
        return p

    def indices(self, epoch, step):
        """Row indices of the batch at (epoch, step) of this rank, without reading X: target rows t and
        control rows ci (B,S) (-1 = padding), lens (B,), group ids g (B,), valid (B,).
        A pure function of (seed, epoch, rank, step)."""
        T, L, gid, valid = self.plan(epoch)
        sl = slice(step * self.B, (step + 1) * self.B)
        t, lens, g, v = T[sl], L[sl], gid[sl], valid[sl]  # (B,S) (B,) (B,) (B,)
        B, S = t.shape
        rng = np.random.default_rng([self.seed, epoch, self.rank, step, 1])
        pool = np.array([self.groups[i][3] for i in g])
        u = rng.random((B, S))
        ci = self.pool_rows[self.pool_off[pool][:, None] + (u * self.pool_len[pool][:, None]).astype(np.int64)]
        ci = np.sort(ci, axis=1)  # order within a set is arbitrary: sorted rows read the memmap forwards
        ci[t < 0] = -1
        return t, ci, lens, g, v

    def batch(self, epoch, step):
        """The batch (dict of tensors, see the class docstring) at (epoch, step) of this rank."""
        t, ci, lens, g, v = self.indices(epoch, step)
        B, S = t.shape
        pad = t < 0
        # one fancy read for targets and controls; padding reads the set's first row and is zeroed below
        x = self.data._read(np.concatenate([np.where(pad, t[:, :1], t).ravel(), np.where(pad, ci[:, :1], ci).ravel()]))
        x = torch.from_numpy(x).view(2, B, S, -1)
        if pad.any():
            x[:, torch.from_numpy(pad)] = 0
        extra = {}
        if self.data.G is not None:  # gene-space targets of the same target cells (gene decoder)
            tg = torch.from_numpy(self.data._read(np.where(pad, t[:, :1], t).ravel(), genes=True)).view(B, S, -1)
            if pad.any():
                tg[torch.from_numpy(pad)] = 0
            extra["tgt_genes"] = tg
        return dict(ctrl=x[1], tgt=x[0], **extra,
                    pert=torch.tensor([self.groups[i][2] for i in g], dtype=torch.int64),
                    context=torch.tensor([self.groups[i][1] for i in g], dtype=torch.int64),
                    batch=torch.from_numpy(np.where(pad, 0, self.data.batch[np.maximum(t, 0)]).astype(np.int64)),
                    lens=torch.from_numpy(lens.astype(np.int64)), valid=torch.from_numpy(v),
                    tgt_idx=torch.from_numpy(t.astype(np.int64)), ctrl_idx=torch.from_numpy(ci.astype(np.int64)))

    def next(self):
        """Next training batch; rolls over to the next epoch (reshuffled with seed+epoch) forever."""
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        b = self.batch(self.epoch, self.step)
        self.step += 1
        return b

    __next__ = next

    def __iter__(self):
        """train: the rest of the current epoch (advancing the state); eval: one full fixed pass."""
        if not self.train:
            for s in range(self.steps_per_epoch):
                yield self.batch(0, s)
            return
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        while self.step < self.steps_per_epoch:
            yield self.next()

    def state_dict(self):
        return dict(epoch=self.epoch, step=self.step, seed=self.seed, rank=self.rank, world=self.world,
                    set_size=self.S, batch_size=self.B, steps_per_epoch=self.steps_per_epoch)

    def load_state_dict(self, sd):
        for k in ("seed", "world", "set_size", "batch_size", "steps_per_epoch"):
            if sd[k] != self.state_dict()[k]:
                raise ValueError(f"sampler state has {k}={sd[k]} but this sampler has {self.state_dict()[k]}")
        self.epoch, self.step = int(sd["epoch"]), int(sd["step"])


# -----------------------------------------------------------------------------
# CLI

def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m state.data", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="convert .h5ad file(s) into a prepared folder")
    p.add_argument("paths", nargs="+", help="input .h5ad files, globs or folders, then OUT_DIR")
    p.add_argument("--pert-col"); p.add_argument("--control"); p.add_argument("--context-col")
    p.add_argument("--batch-col"); p.add_argument("--key", default="X"); p.add_argument("--gene-col")
    p.add_argument("--genes-key", help="with an embedding --key: also store this gene matrix (X, layers/..) "
                   "of the same cells as the gene decoder's target (G.bin)")
    p.add_argument("--genes", help="text file with one gene name per line to keep, in order")
    p.add_argument("--obsm-genes", help="text file with the gene name of each column of an obsm --key, in order")
    p.add_argument("--intersect", action="store_true", help="align files on their common genes")
    p.add_argument("--hvg", type=int); p.add_argument("--normalize", default="auto", choices=["auto", "yes", "no"])
    p.add_argument("--target-sum", type=float); p.add_argument("--assume", choices=["normalized", "log1p"])
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--keep", action="append", default=[], help="col=v1,v2 (repeatable): keep only these cells")
    p.add_argument("--modality", action="store_true", help="key labels 'type:label' by obs perturbation_type")
    i = sub.add_parser("info", help="summarise a prepared folder")
    i.add_argument("dir")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "prepare":
            if len(a.paths) < 2:
                ap.error("prepare needs at least one input and an OUT_DIR")
            keep = {}
            for kv in a.keep:
                if "=" not in kv:
                    ap.error(f"--keep '{kv}': expected col=v1,v2")
                k, v = kv.split("=", 1)
                keep[k] = v.split(",")
            genes = Path(a.genes).read_text().split() if a.genes else None
            d = prepare(a.paths[:-1], a.paths[-1], a.pert_col, a.control, a.context_col, a.batch_col, a.key,
                        a.hvg, a.normalize, a.target_sum, a.dtype, keep, a.intersect, genes, a.gene_col, a.assume,
                        modality=a.modality, genes_key=a.genes_key,
                        obsm_genes=Path(a.obsm_genes).read_text().split() if a.obsm_genes else None)
        else:
            d = Prepared(a.dir)
            for k, c in enumerate(d.context_names):
                m = d.context == k
                print(f"  {c}: {int(m.sum())} cells, {int((m & (d.pert == d.control_code)).sum())} controls, "
                      f"{len(set(d.pert[m].tolist()) - {d.control_code})} perturbations")
            print(f"  recipe {d.index['recipe']}")
            if d.n_genes_out:
                print(f"  gene targets (G.bin) from '{d.genes_key}': {d.n_genes_out} genes")
            for src in d.index["sources"]:
                print(f"  source {src['path']} md5 {src['md5']}: {src['scale']['kind']} -> {src['transform']}")
        print(d)
    except (H5ADError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
