"""
Data layer: read `.h5ad` files, detect their scale, prepare them once into a memory-mapped matrix whose
rows are sorted by (context, perturbation, batch), and sample cell sets with matched controls (SPEC 2, 5).

    python -m state.data prepare IN.h5ad [IN2.h5ad 'more/*.h5ad' DIR ...] OUT_DIR \\
        [--pert_col=target_gene] [--control=non-targeting] [--context_col=cell_type] [--batch_col=gem_group] \\
        [--key=X|layers/counts|raw/X|obsm/X_state] [--genes_key=X] [--gene_col=gene_symbol] \\
        [--genes=genes.txt] [--intersect] \\
        [--hvg=2000] [--normalize=auto|yes|no] [--target_sum=1e4] [--assume=normalized|log1p] \\
        [--dtype=float32|float16|bfloat16] [--keep=cell_type=A172,T98G,U87MG] [--modality]
    python -m state.data info OUT_DIR

Unset column names and the control label are detected (SPEC 2.2) and printed; `--pert-col ''` prepares
data without perturbations (every cell a control: atlas data for SE pre-training). The scale of the matrix is
detected from ~10k sampled rows (SPEC 2.3): counts are normalised (median library size, or --target-sum)
and log1p'd, log1p data is kept as is (never logged twice), scaled data and normalised-but-not-logged data
are refused with the reason.

OUT_DIR holds:
    X.bin       (n_cells, n_genes) raw row-major array (float32, float16, or bfloat16 stored as uint16)
    codes.npy   (n_cells, 4) int32: context, perturbation, batch, source-file codes
    G.bin       (n_cells, n_genes_out), only with --genes-key: gene-space rows of the same cells (decoder target)
    groups.npy  (n_groups, 5) int64: context, perturbation, batch, first row, end row (rows sorted by group)
    sums.npy    (n_groups, n_genes) float64: each group's sum of X rows (group means of a split part then
                read only the rows the part leaves out: the anchor table, the mean baselines)
    obs_names.npy (n_cells,) fixed-width utf-8 cell names (read only when predictions are written)
    index.json  genes, vocabularies, recipe, scale, sources, content hashes, checksum (nothing per cell)

A prepare is one commit: it writes into .OUT_DIR.prepare-PID next to OUT_DIR and switches it in at the end
(an existing prepared OUT_DIR is exchanged atomically), so a kill leaves the old folder or the new one.
The checksum (recorded by splits and runs) covers every file's content and the whole recipe. Opening a
folder checks its files against each other (sizes, headers, the groups table, sums.npy; `info --verify`
hashes everything). Recipe keys for raw counts given to a run later (predict.py simulate, embed.py
transform): target_sum (normalise to it, then log1p; None: log1p input only), target_sum_from
(given | median | detected | None) and libsize_genes (None: a cell's total was taken over exactly the
prepared genes in order; else the gene names it was summed over, e.g. all of the input file's genes).
"""

import argparse
import errno
import glob
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from state.config import dashes
from state.errors import Parser, UserError
from state.h5ad import H5AD, H5ADError, _hash_strings

PERT_COLS = ("target_gene", "perturbation", "condition", "gene", "drugname_drugconc", "drug")
CONTROLS = ("non-targeting", "control", "ctrl", "DMSO_TF", "PBS", "NT")
CONTEXT_COLS = ("cell_type", "cell_line", "celltype", "cell_line_id")
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}  # bf16 stored as raw bits
FORMAT = 2  # 1: obs names and groups inside index.json


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


@dataclass
class Recipe:
    """What prepare does to its inputs; recorded in index.json. Unset columns and the control label are
    detected in the first file and fixed for the rest.
      key         matrix to read: X | layers/<k> | raw/X | obsm/<k>
      genes_key   with an embedding key: also store this gene matrix of the same cells as G.bin
      hvg         keep this many highly variable genes (seurat flavour) of log1p data
      normalize   auto | yes | no: counts are normalised to target_sum (None: median library size), log1p'd
      assume      normalized | log1p: override the scale detector
      keep        {obs column: [values]}: keep only these cells
      intersect   align several files on their common genes (else differing gene sets are an error)
      genes       gene names to keep, in order; gene_col: var column holding gene names
      obsm_genes  gene names of an obsm key's columns (see obsm_names)
      modality    key labels 'type:label' when a perturbation_type column gives one label several types
      chunk       rows per streamed block (None: ~64 MB of float32)"""
    pert_col: str = None
    control: str = None
    context_col: str = None
    batch_col: str = None
    key: str = "X"
    genes_key: str = None
    hvg: int = None
    normalize: str = "auto"
    target_sum: float = None
    assume: str = None
    dtype: str = "float32"
    keep: dict = field(default_factory=dict)
    intersect: bool = False
    genes: list = None
    gene_col: str = None
    obsm_genes: list = None
    modality: bool = False
    chunk: int = None


def _resolve_cols(h, pert_col, control, context_col, batch_col):
    """Check or detect (pert_col, control, context_col, batch_col) in one file; prints what it detected.
    pert_col="" (--pert-col '' on the CLI): no perturbations, every cell is a control (e.g. SE atlas data)."""
    cols = h.columns("obs")
    have = ", ".join(cols)
    if pert_col == "":
        control = control or "control"
    elif pert_col is None:
        found = [c for c in PERT_COLS if c in cols]
        if not found:
            raise H5ADError(f"{h.path}: no perturbation column found (tried {', '.join(PERT_COLS)}); "
                            f"obs columns: {have}; pass --pert-col")
        if len(found) > 1:  # candidates must group the cells alike (their codes, never strings per cell)
            labs = {c: h.labels(c) for c in found}
            codes = {c: labs[c][1](0, h.n_obs) for c in found}
            differ = [c for c in found[1:] if not _same_partition(codes[found[0]], codes[c])
                      and any(k in set(labs[c][0].tolist()) for k in CONTROLS)]
            if differ:
                raise H5ADError(f"{h.path}: ambiguous perturbation column: '{found[0]}' and "
                                f"{', '.join(repr(c) for c in differ)} group the cells differently; pass --pert-col")
        pert_col = found[0]
        say(f"{h.path}: detected perturbation column '{pert_col}'"
            + (f" (same grouping as {', '.join(found[1:])})" if len(found) > 1 else ""))
    elif pert_col not in cols:
        raise H5ADError(f"{h.path}: perturbation column '{pert_col}' not in obs; available: {have}")
    if pert_col:
        labels = set(h.labels(pert_col)[0][h.used(pert_col)].tolist())  # labels with cells
    else:
        labels = {control}
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


def _row_sums(m, a, b):
    """Per-row sums of rows [a, b) of a Matrix (float64), without densifying a sparse block."""
    if m.sparse:
        ip = m.ptr(a, b)
        cs = np.concatenate([[0], np.cumsum(np.asarray(m.data[ip[0]:ip[-1]], np.float64))])
        return cs[ip[1:] - ip[0]] - cs[ip[:-1] - ip[0]]
    return m.block(a, b).sum(1, dtype=np.float64)


def _kept(s, a, b):
    """--keep mask of rows [a, b) of one source (bool)."""
    m = np.ones(b - a, bool)
    for ok, read in s["keep"]:
        m &= ok[read(a, b)]
    return m


def _blocks(src, chunk, desc):
    """Kept, transformed, gene-selected float32 blocks of one source: yields (kept_positions, (n, G)).
    Every row is checked against the detected scale (the detector only samples rows)."""
    from tqdm import tqdm
    m, N, h = src["m"], src["m"].shape[0], src["h"]
    name = lambda i: h.obs_names_at(i, i + 1)[0]
    for a in tqdm(range(0, N, chunk), desc=desc, unit="blk", file=sys.stderr, leave=False):
        b = min(a + chunk, N)
        sel = _kept(src, a, b)
        if not sel.any():
            continue
        rows = np.flatnonzero(sel) + a
        x = m.block(a, b)[sel]  # (n, G_file)
        kind = src["scale"].kind
        check = ("any" if kind == "embedding" else "counts" if src["tr"] == "normalize+log1p" and kind == "counts"
                 else "log1p" if src["tr"] == "none" and kind == "log1p" else "nonneg")
        check_rows(x, check, f"{src['path']}: '{m.key}'", lambda r: f"'{name(rows[r])}' (row {rows[r]})", top=20.0)
        ts = src["scale"].target_sum
        if src["tr"] == "none" and kind == "log1p" and ts and not src.get("ts_off"):
            tot = np.expm1(x).sum(1, dtype=np.float64)  # every row normalised to the detected total?
            off = (tot > 0) & (np.abs(tot / ts - 1) > 0.01)
            if off.any():
                i = int(np.argmax(off))
                src["ts_off"] = (name(rows[i]), float(tot[i]))
        if src["tr"] == "normalize+log1p":
            normalize_log1p(x, src["target_sum"])  # library size over all of the file's genes
        elif src["tr"] == "log1p":
            np.log1p(x, out=x)
        yield rows, x[:, src["cols"]]


def _fault(step):
    """Test hook: NANOSTATE_PREPARE_FAULT=<step> ends the process at that step (os._exit), as a kill would.
    Steps: rows (X.bin written), sums (sums.npy written), index (index.json written, before the switch),
    swap (the new folder is in place, the old one not yet removed)."""
    if os.environ.get("NANOSTATE_PREPARE_FAULT") == step:
        os._exit(75)


def _staging(out):
    """The names next to OUT_DIR that a prepare writes into (.NAME.prepare-PID) and moves an old folder
    aside to (.NAME.old-PID, only where an atomic exchange is not available)."""
    return out.parent / f".{out.name}.prepare-{os.getpid()}", out.parent / f".{out.name}.old-{os.getpid()}"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_leftovers(out):
    """Remove what killed prepares into OUT_DIR left next to it (their process is gone): staging folders,
    and an old folder moved aside, which is first put back when OUT_DIR is missing (a kill between the
    two renames of the non-atomic switch)."""
    if not out.parent.is_dir():
        return
    pre = f".{out.name}."
    found = []
    for n in os.listdir(out.parent):
        if not n.startswith(pre):
            continue
        kind, _, pid = n[len(pre):].rpartition("-")
        if kind in ("prepare", "old") and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            found.append((kind != "old", out.parent / n))  # old folders first
    for _, p in sorted(found):
        if p.name.startswith(pre + "old-") and not os.path.lexists(out) and (p / "index.json").exists():
            os.rename(p, out)
            say(f"{out}: restored the prepared folder a killed prepare had moved aside")
            continue
        shutil.rmtree(p, ignore_errors=True)
        say(f"removed {p} (left by a prepare that was killed)")


def _exchange(a, b):
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if fn(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), RENAME_EXCHANGE) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(e, os.strerror(e), str(b))


def _sync(folder):
    """fsync every file of a folder and the folder itself: what the switch commits is on disk."""
    for n in os.listdir(folder):
        p = os.path.join(folder, n)
        if os.path.isfile(p):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _switch(stage, out, old):
    """Put the complete folder `stage` at `out` in one step: a rename when `out` is new, an atomic exchange
    when it holds a prepared folder (then the old one is removed); a kill at any moment leaves `out` the
    old complete folder or the new one."""
    _sync(stage)
    if not os.path.lexists(out):
        os.rename(stage, out)
        _fault("swap")
        return
    # the user's own entries in the old folder (a split.json the README puts there, notes, runs) come
    # along as hard links (no copy of the data): prepare replaces only its own files
    mine = set(os.listdir(stage))
    for e in os.listdir(out):
        if e in mine or e.startswith(".nanostate"):
            continue
        src, dst = os.path.join(out, e), os.path.join(stage, e)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)
    if _exchange(stage, out):
        _fault("swap")
        shutil.rmtree(stage)  # now the old folder
        return
    os.rename(out, old)  # no atomic exchange here: a kill between the renames is undone by the next prepare
    _fault("swap")
    os.rename(stage, out)
    shutil.rmtree(old)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:  # another file system, or no hard links there
        shutil.copy2(src, dst)


def _check_out(out):
    """OUT_DIR may be new, an empty folder, or a prepared folder (replaced whole at the end); anything else
    holds a user's files, which a prepare must never replace."""
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; give a new folder for the prepared data")
    if any(True for _ in out.iterdir()) and not (out / "index.json").exists():
        raise UserError(f"{out}: exists, is not empty and is not a prepared folder (no index.json); prepare "
                        "replaces only a prepared folder: give a new or empty folder")


def prepare(inputs, out_dir, **kw):
    """Convert one or more .h5ad files (paths, globs, folders) into OUT_DIR (see module docstring) and
    return Prepared(out_dir). Keyword arguments are Recipe fields. Memory is bounded in the number of
    cells: labels are read as codes block by block, rows are counted per group in a first pass and
    written to their sorted place in a second (a counting sort), with positioned writes.
    One commit: everything is written into a staging folder next to OUT_DIR (.NAME.prepare-PID) and
    switched in at the very end (an existing prepared OUT_DIR is replaced only then), so OUT_DIR is always
    the old complete folder or the new one; a killed prepare's leftovers are removed by the next one."""
    r = Recipe(**kw)
    paths = _expand(inputs)
    if r.dtype not in DTYPES:
        raise UserError(f"dtype '{r.dtype}' not one of {', '.join(DTYPES)}")
    r.normalize = {"yes": True, "no": False, "true": True, "false": False}.get(str(r.normalize).lower(), r.normalize)
    r.keep = r.keep or {}
    out_dir = Path(os.path.realpath(out_dir)) if os.path.islink(out_dir) else Path(out_dir)  # the folder, not a link
    _check_out(out_dir)
    hs = []
    try:
        for p in paths:
            hs.append(H5AD(p))
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(out_dir)
        stage, old = _staging(out_dir)
        shutil.rmtree(stage, ignore_errors=True)
        try:
            gt = None
            if r.genes_key:
                # the gene matrix first, into a scratch folder, with the same filters and labels: rows come
                # out in the same (context, pert, batch, file) order; _prepare checks that before adopting it
                rg = Recipe(**{**r.__dict__, "key": r.genes_key, "genes_key": None, "obsm_genes": None})
                gt = _prepare(hs, stage / ".genes", rg)
                r.pert_col, r.control = gt.pert_col, gt.control
                r.context_col, r.batch_col = gt.context_col or "", gt.batch_col or None
                if r.key.startswith("obsm/") and not r.key.endswith("X_hvg"):
                    # gene options belong to the gene matrix, not to the embedding
                    r.hvg, r.genes, r.gene_col, r.intersect, r.assume = None, None, None, False, None
            _prepare(hs, stage, r, gene_target=gt, dest=out_dir)
            if gt is not None:
                shutil.rmtree(gt.dir, ignore_errors=True)
            _fault("index")
            _switch(stage, out_dir, old)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)  # a refused or interrupted prepare leaves nothing
            raise
    finally:
        for h in hs:
            h.close()
    return Prepared(out_dir)


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


def _sources(hs, r):
    """One dict per input file: label readers (codes, never strings per cell), --keep masks."""
    srcs = []
    for h in hs:
        r.pert_col, r.control, r.context_col, r.batch_col = _resolve_cols(h, r.pert_col, r.control,
                                                                          r.context_col, r.batch_col)
        one = (np.array(["all"]), lambda a, b: np.zeros(b - a, np.int64))
        s = dict(path=h.path, h=h, n=h.n_obs, keep=[],
                 pert=h.labels(r.pert_col) if r.pert_col else (np.array([r.control]), one[1]),
                 ctx=h.labels(r.context_col) if r.context_col else one,
                 bat=h.labels(r.batch_col) if r.batch_col else one,
                 ptype=h.labels("perturbation_type") if "perturbation_type" in h.columns("obs") else None)
        for col, vals in r.keep.items():
            if col not in h.columns("obs"):
                raise H5ADError(f"{h.path}: --keep column '{col}' not in obs; available: {', '.join(h.columns('obs'))}")
            cats, read = h.labels(col)
            s["keep"].append((np.isin(cats, list(vals)), read))
        srcs.append(s)
    for col, vals in r.keep.items():
        seen = set().union(*[set(s["h"].labels(col)[0].tolist()) for s in srcs])
        bad = [v for v in vals if v not in seen]
        if bad:
            raise H5ADError(f"--keep {col}: value(s) {bad} not found in obs column '{col}' of "
                            f"{', '.join(s['path'] for s in srcs)}; values: {sorted(seen)[:20]}")
    return srcs


def _gene_plan(srcs, r):
    """The output gene list and, per source, the matrix and its columns in that order."""
    for s in srcs:
        h = s["h"]
        s["m"] = h.matrix(r.key)
        if s["m"].shape[0] != h.n_obs:
            raise H5ADError(f"{h.path}: '{r.key}' has {s['m'].shape[0]} rows but obs has {h.n_obs}")
        if s["m"].key.startswith("obsm/"):
            s["genes"] = obsm_names(h, s["m"].key[5:], s["m"].shape[1], r.obsm_genes)
        else:
            s["genes"] = h.var_names(r.gene_col).astype(str)
            if s["m"].key == "raw/X" and "raw" in h.f and "var" in h.f["raw"]:
                g = h.f["raw/var"]
                ik = g.attrs.get("_index", "_index")
                s["genes"] = np.array([x.decode() if isinstance(x, bytes) else str(x) for x in g[ik][:]])
            if len(s["genes"]) != s["m"].shape[1]:
                raise H5ADError(f"{h.path}: {len(s['genes'])} gene names for {s['m'].shape[1]} columns of '{r.key}'")
            u, n = np.unique(s["genes"], return_counts=True)
            if (n > 1).any():
                raise H5ADError(f"{h.path}: duplicate gene names in '{r.key}' ({', '.join(u[n > 1][:10])}"
                                f"{' ...' if (n > 1).sum() > 10 else ''}): a gene would take another column's "
                                "values; make var names unique (adata.var_names_make_unique()) or pass --gene-col")
    gl = list(srcs[0]["genes"])
    if len(srcs) > 1:
        sets = [set(s["genes"].tolist()) for s in srcs]
        common = set.intersection(*sets)
        if len(common) < len(set.union(*sets)):
            miss = {s["path"]: sorted(set.union(*sets) - st) for s, st in zip(srcs, sets) if set.union(*sets) - st}
            if not r.intersect:
                msg = "; ".join(f"{p} lacks {len(v)} genes (e.g. {', '.join(v[:10])})" for p, v in miss.items())
                raise H5ADError(f"gene sets differ between files: {msg}. Pass --intersect to keep the "
                                f"{len(common)} common genes")
            dropped = sorted(set.union(*sets) - common)
            say(f"--intersect: keeping {len(common)} common genes, dropping {len(dropped)} "
                f"(e.g. {', '.join(dropped[:10])})")
            gl = [g for g in gl if g in common]
            if not gl:
                raise H5ADError("the files share no gene names")
    if r.genes is not None:
        genes = [str(g) for g in r.genes]
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
    return gl


def _scale_plan(srcs, r, csize):
    """Detect each source's scale, choose its transform, fix target_sum; returns (emb, logged)."""
    emb = r.key.startswith("obsm/") or srcs[0]["m"].key.startswith("obsm/")
    for s in srcs:
        if emb:
            s["scale"], s["tr"] = Scale("embedding", None, {}), "none"
            say(f"{s['path']}: '{s['m'].key}' is an embedding: stored as is")
            continue
        sc = detect_scale(s["m"])
        s["scale"] = sc
        say(f"{s['path']}: '{s['m'].key}' looks like {sc}")
        kind = r.assume or sc.kind
        layers = list(s["h"].f["layers"].keys()) if "layers" in s["h"].f else []
        if kind == "scaled":
            raise H5ADError(f"{s['path']}: '{s['m'].key}' has negative values (min {sc.evidence['min']:.3g}): "
                            f"it looks scaled/centred, which cannot be un-done. Use the raw counts instead: "
                            f"--key layers/counts or --key raw/X (layers here: {layers or 'none'}"
                            f"{', raw/X' if 'raw' in s['h'].f else ''})")
        if kind == "normalized" and r.assume != "normalized":
            raise H5ADError(f"{s['path']}: '{s['m'].key}' is fractional with max {sc.evidence['max']:.3g} >= 15: "
                            "normalised but not log-transformed? Pass --assume normalized to log1p it, or "
                            f"--key layers/counts (layers here: {layers or 'none'})")
        if kind == "counts":
            s["tr"] = "normalize+log1p" if r.normalize in ("auto", True) else "none"
            if s["tr"] == "none":
                say(f"WARNING {s['path']}: keeping raw counts (--normalize no); models expect log1p")
        elif kind == "normalized":
            s["tr"] = "log1p"
        else:
            s["tr"] = "none"
            if r.normalize is True:
                say(f"{s['path']}: already log1p: not normalising or logging again")
    norm = [s for s in srcs if s["tr"] == "normalize+log1p"]
    if norm:
        if r.target_sum is None:  # the median library size of the kept cells: 4 bytes per cell, briefly
            tot = np.concatenate([_row_sums(s["m"], a, min(a + csize, s["n"]))[_kept(s, a, min(a + csize, s["n"]))]
                                  .astype(np.float32) for s in norm for a in range(0, s["n"], csize)])
            r.target_sum = float(np.median(tot))
            del tot
            say(f"normalising counts to the median library size {r.target_sum:g} (--target-sum 1e4 for the paper's)")
        else:
            say(f"normalising counts to target_sum {r.target_sum:g}")
        for s in norm:
            s["target_sum"] = float(r.target_sum)
    logged = all(s["tr"] != "none" or s["scale"].kind == "log1p" or (r.assume == "log1p") for s in srcs)
    return emb, logged


def _hvg(srcs, r, gl, csize):
    """Select r.hvg genes in one streamed pass (per-gene mean and variance of expm1(x))."""
    s1 = np.zeros(len(gl)); s2 = np.zeros(len(gl)); n = 0
    for s in srcs:
        for _, x in _blocks(s, csize, f"hvg {Path(s['path']).name}"):
            e = np.expm1(x.astype(np.float64))
            s1 += e.sum(0); s2 += (e * e).sum(0); n += len(x)
    mean = s1 / n
    var = (s2 / n - mean ** 2) * n / max(n - 1, 1)
    top = hvg_seurat(mean, np.maximum(var, 0), int(r.hvg))
    say(f"selected {len(top)} highly variable genes (seurat flavour) of {len(gl)}")
    for s in srcs:
        s["cols"] = s["cols"][top]
    return [gl[i] for i in top]


def _local_codes(s, a, b):
    """File-local label codes of rows [a, b) as one int64 key per row (pert, ptype, context, batch)."""
    pc, cc, bc = s["pert"][1](a, b), s["ctx"][1](a, b), s["bat"][1](a, b)
    tc = s["ptype"][1](a, b) + 1 if s["ptype"] is not None else np.zeros(b - a, np.int64)
    nt = len(s["ptype"][0]) + 1 if s["ptype"] is not None else 1
    return ((pc * nt + tc) * len(s["ctx"][0]) + cc) * len(s["bat"][0]) + bc


def _unkey(s, k):
    """Local keys -> (pert label, ptype label or '?', context label, batch label) lists."""
    nb, nc = len(s["bat"][0]), len(s["ctx"][0])
    nt = len(s["ptype"][0]) + 1 if s["ptype"] is not None else 1
    bc, k = k % nb, k // nb
    cc, k = k % nc, k // nc
    tc, pc = k % nt, k // nt
    pt = np.concatenate([["?"], s["ptype"][0]]) if s["ptype"] is not None else np.array(["?"])
    return s["pert"][0][pc], pt[tc], s["ctx"][0][cc], s["bat"][0][bc]


def _unique_names(s, h, at):
    """Kept cells of one file must have distinct names (a prediction names its control cell by name):
    h the names' hashes, at their rows; two rows sharing a name are an H5ADError naming both."""
    o = np.argsort(h, kind="stable")
    for k in np.flatnonzero(h[o][1:] == h[o][:-1])[:1000]:
        i, j = sorted((int(at[o[k]]), int(at[o[k + 1]])))
        a, b = s["h"].obs_names_at(i, i + 1)[0], s["h"].obs_names_at(j, j + 1)[0]
        if a == b:
            raise H5ADError(f"{s['path']}: obs name '{a}' is used by rows {i} and {j}"
                            f"{' (and more)' if (h[o][1:] == h[o][:-1]).sum() > 1 else ''}: cells must have unique "
                            "names (a prediction names its control cell by name); make them unique "
                            "(adata.obs_names_make_unique()) and re-save, or drop the copies with --keep")


def _plan_groups(srcs, r, csize):
    """First pass over the labels only: cells per (context, pert, batch) group, the vocabularies, the
    group table (rows sorted by group; within a group, in file order) and the widest obs name."""
    width = 1
    hashes = []  # a 64-bit hash per kept cell name (8 bytes per cell, briefly): duplicate names
    for i, s in enumerate(srcs):
        cnt = {}
        hs, at = [], []
        for a in range(0, s["n"], csize):
            b = min(a + csize, s["n"])
            sel = _kept(s, a, b)
            u, n = np.unique(_local_codes(s, a, b)[sel], return_counts=True)
            for k, m in zip(u.tolist(), n.tolist()):
                cnt[k] = cnt.get(k, 0) + m
            if sel.any():
                names = s["h"].obs_names_at(a, b)[sel]
                width = max(width, np.char.encode(names, "utf-8").itemsize)
                hs.append(_hash_strings(names))
                at.append(np.flatnonzero(sel) + a)
        if hs:
            _unique_names(s, np.concatenate(hs), np.concatenate(at))
            hashes.append(np.unique(np.concatenate(hs)))
        s["lk"] = np.array(sorted(cnt), np.int64)
        s["ln"] = np.array([cnt[k] for k in s["lk"].tolist()], np.int64)
        s["lab"] = list(zip(*_unkey(s, s["lk"]))) if len(s["lk"]) else []
    if sum(int(s["ln"].sum()) for s in srcs) == 0:
        raise H5ADError("no cells left after --keep")
    if len(hashes) > 1:
        allh = np.concatenate(hashes)
        dup = len(allh) - len(np.unique(allh))
        if dup:
            say(f"WARNING: {dup} cell names occur in more than one input file (e.g. reused barcodes): a "
                "prediction's ctrl_cell_barcode may then name cells of several files")
    del hashes
    # modality aliasing (SPEC 2.2): one label, several perturbation_type values
    types = {}
    for s in srcs:
        for p_, t_, _, _ in s["lab"]:
            if p_ != r.control and s["ptype"] is not None:
                types.setdefault(p_, set()).add(t_)
    alias = sorted(p_ for p_, t_ in types.items() if len(t_) > 1)
    if alias and r.modality:
        say(f"modality: {len(alias)} labels occur with several perturbation_type values (e.g. {alias[0]}: "
            f"{sorted(types[alias[0]])}); perturbations keyed as 'type:label'")
    elif alias:
        say(f"WARNING modality aliasing: {len(alias)} perturbation labels occur with different "
            f"perturbation_type values (e.g. {', '.join(alias[:5])}: {sorted(types[alias[0]])}); they share "
            "one vocabulary entry. Keep one modality with --keep (e.g. --keep cell_type=...) or pass "
            "--modality to key them as 'type:label'")
    eff = lambda p_, t_: f"{t_}:{p_}" if r.modality and alias and p_ != r.control else p_
    perts = {eff(p_, t_) for s in srcs for p_, t_, _, _ in s["lab"]}
    pert_names = [r.control] + sorted(perts - {r.control})
    context_names = sorted({c_ for s in srcs for _, _, c_, _ in s["lab"]})
    batch_names = sorted({b_ for s in srcs for _, _, _, b_ in s["lab"]})
    lp, lc, lb = ({x: i for i, x in enumerate(v)} for v in (pert_names, context_names, batch_names))
    n_of = {}
    for s in srcs:  # local key -> (C, P, B)
        s["cpb"] = np.array([(lc[c_], lp[eff(p_, t_)], lb[b_]) for p_, t_, c_, b_ in s["lab"]], np.int64).reshape(-1, 3)
        for t, m in zip(map(tuple, s["cpb"].tolist()), s["ln"].tolist()):
            n_of[t] = n_of.get(t, 0) + m
    keys = sorted(n_of)
    n = np.array([n_of[k] for k in keys], np.int64)
    stop = np.cumsum(n)
    table = np.concatenate([np.array(keys, np.int64).reshape(-1, 3), (stop - n)[:, None], stop[:, None]], 1)
    gid = {k: i for i, k in enumerate(keys)}
    for s in srcs:
        s["lg"] = np.array([gid[tuple(t)] for t in s["cpb"].tolist()], np.int64)
    for k, name in enumerate(context_names):
        if not np.any((table[:, 0] == k) & (table[:, 1] == 0)):
            raise H5ADError(f"context '{name}' (obs column '{r.context_col or '-'}') has no control cells "
                            f"('{r.control}' in '{r.pert_col}'); drop it with --keep or fix the labels")
    return table, pert_names, context_names, batch_names, width


class _RowFile:
    """A row-major output file written with positioned writes of runs of consecutive rows: it is never
    memory-mapped, so written pages sit in the page cache and not in this process's memory."""

    def __init__(self, path, n_rows, dtype, row_shape=(), npy=False):
        self.path, self.dt = path, np.dtype(dtype)
        self.rb = self.dt.itemsize * int(np.prod(row_shape, dtype=np.int64))
        hdr = b""
        if npy:
            import io
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(self.dt),
                                                       "fortran_order": False, "shape": (n_rows, *row_shape)})
            hdr = buf.getvalue()
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, hdr, 0)
        self.off = len(hdr)
        os.ftruncate(self.fd, self.off + n_rows * self.rb)

    def put(self, dest, rows):
        """rows[i] -> row dest[i]; dest ascending."""
        buf = np.ascontiguousarray(rows, self.dt).view(np.uint8).reshape(-1)
        brk = np.flatnonzero(np.diff(dest) != 1) + 1
        for a, b in zip(np.concatenate([[0], brk]), np.concatenate([brk, [len(dest)]])):
            os.pwrite(self.fd, buf[a * self.rb:b * self.rb], self.off + int(dest[a]) * self.rb)

    def close(self):
        os.close(self.fd)


def _write_rows(srcs, r, out, table, G, width, csize):
    """Second pass: every kept row to its sorted place in X.bin, codes.npy and obs_names.npy."""
    N = int(table[-1, 4])
    tmp = {k: out / f"{k}.tmp{os.getpid()}" for k in ("X.bin", "codes.npy", "obs_names.npy")}
    fx = _RowFile(tmp["X.bin"], N, DTYPES[r.dtype], (G,))
    fc = _RowFile(tmp["codes.npy"], N, np.int32, (4,), npy=True)
    fn = _RowFile(tmp["obs_names.npy"], N, f"S{width}", npy=True)
    cursor = table[:, 3].copy()  # next free row of each group
    try:
        for i, s in enumerate(srcs):
            for rows, x in _blocks(s, csize, f"write {Path(s['path']).name}"):
                a, b = int(rows[0]), int(rows[-1]) + 1
                g = s["lg"][np.searchsorted(s["lk"], _local_codes(s, a, b)[rows - a])]
                o = np.argsort(g, kind="stable")  # file order within a group
                gs = g[o]
                u, first, cnt = np.unique(gs, return_index=True, return_counts=True)
                dest = cursor[gs] + np.arange(len(gs)) - np.repeat(first, cnt)
                cursor[u] += cnt
                fx.put(dest, to_storage(x[o], r.dtype))
                fc.put(dest, np.concatenate([table[gs, :3], np.full((len(gs), 1), i)], 1).astype(np.int32))
                fn.put(dest, np.char.encode(s["h"].obs_names_at(a, b)[rows - a][o], "utf-8").astype(f"S{width}"))
        assert np.array_equal(cursor, table[:, 4]), "internal error: rows per group changed between passes"
    except BaseException:
        for f in (fx, fc, fn):
            f.close()
        for p in tmp.values():
            p.unlink(missing_ok=True)
        raise
    for f in (fx, fc, fn):
        f.close()
    for k, p in tmp.items():
        os.replace(p, out / k)


def _group_sums(out, table, G, dtype, csize):
    """sums.npy: (n_groups, G) float64 sum of each group's rows, from one sequential pass over X.bin read
    with positioned reads (never mapped: its pages would count in this process's memory), so memory is
    one block of rows and 4,096 groups' sums."""
    from tqdm import tqdm
    rb = G * np.dtype(DTYPES[dtype]).itemsize  # bytes per row
    fd = os.open(out / "X.bin", os.O_RDONLY)
    tmp = out / f"sums.npy.tmp{os.getpid()}"
    f = _RowFile(tmp, len(table), np.float64, (G,), npy=True)
    hx, seen = hashlib.sha256(), 0  # X.bin's content hash: the groups cover its rows in order
    try:
        buf, first = [], 0
        for g in tqdm(range(len(table)), desc="group sums", unit="group", file=sys.stderr, leave=False):
            acc, a0, a1 = np.zeros(G), int(table[g, 3]), int(table[g, 4])
            for a in range(a0, a1, csize):
                n = min(a1, a + csize) - a
                raw = os.pread(fd, n * rb, a * rb)
                assert a * rb == seen and len(raw) == n * rb, "internal error: X.bin shorter than its groups"
                hx.update(raw)
                seen += len(raw)
                x = np.frombuffer(raw, DTYPES[dtype]).reshape(n, G)
                acc += from_storage(x, dtype).sum(0, dtype=np.float64)
            buf.append(acc)
            if len(buf) == 4096 or g == len(table) - 1:
                f.put(np.arange(first, g + 1), np.stack(buf))
                first, buf = g + 1, []
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        f.close()
        os.close(fd)
    assert seen == os.path.getsize(out / "X.bin"), "internal error: X.bin longer than its groups"
    os.replace(tmp, out / "sums.npy")
    return hx.hexdigest()[:32]


def _sha(path, blk=1 << 23):
    """Content hash of a file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(blk):
            h.update(b)
    return h.hexdigest()[:32]


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot record {type(o).__name__} in index.json")


# what the data checksum covers: the content of every file (hashes), the whole recipe (options, detected
# columns, control, scale and transform of each source) and the vocabularies; runs and splits record it
CHECKSUM_KEYS = ("format", "n_cells", "n_genes", "dtype", "genes", "pert_col", "control", "context_col",
                 "batch_col", "pert_names", "context_names", "batch_names", "n_groups", "recipe", "hashes")


def _checksum(ix):
    """The data checksum of an index.json dict: 16 hex digits of a hash of CHECKSUM_KEYS, the sources (md5,
    scale, transform, cells kept) and the gene targets' own checksum."""
    core = {k: ix.get(k) for k in CHECKSUM_KEYS}
    core["sources"] = [{k: x.get(k) for k in ("md5", "n_obs", "kept", "scale", "transform", "libsize_genes")}
                       for x in ix.get("sources", [])]
    gt = ix.get("gene_target")
    core["gene_target"] = None if gt is None else [gt.get("checksum"), gt.get("hash")]
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def _libsize_recipe(srcs, r, gl, ts_given, emb):
    """(target_sum, where it came from, libsize_genes) for the recipe: the library size raw counts are to be
    normalised to, and the genes a cell's total counts were summed over (None: exactly the prepared genes
    in their order). Counts normalised here: r.target_sum (given, or the median library size) over each
    file's genes. Data that arrived log1p'd: the target sum its rows were normalised to, when every kept
    row's expm1 sum over the file's genes agrees with the one the detector found (checked while writing)."""
    if emb:
        return (ts_given, "given" if ts_given else None, None)
    norm = [s for s in srcs if s["tr"] == "normalize+log1p"]
    logs = [s for s in srcs if s["tr"] == "none" and s["scale"].kind == "log1p"]
    if norm:
        ts, frm, used = float(r.target_sum), "given" if ts_given is not None else "median", norm
    elif ts_given is not None:
        ts, frm, used = float(ts_given), "given", logs or srcs
    elif logs and len(logs) == len(srcs):
        det = [s["scale"].target_sum for s in logs]
        off = [s for s in logs if s.get("ts_off")]
        if any(d is None for d in det):
            return None, None, None
        if off:
            s = off[0]
            say(f"WARNING {s['path']}: log1p rows are normalised to differing totals (e.g. cell '{s['ts_off'][0]}' "
                f"sums to {s['ts_off'][1]:g}, not {s['scale'].target_sum:g}): no target sum recorded, so runs "
                "on this data take log1p input only")
            return None, None, None
        if max(det) / min(det) > 1.01:
            say(f"WARNING: the files are log1p of counts normalised to different totals ({sorted(set(det))}): "
                "no target sum recorded, so runs on this data take log1p input only")
            return None, None, None
        ts, frm, used = float(det[0]), "detected", logs
        say(f"recipe: log1p data normalised to {ts:g} (detected; every row checked): raw counts given to runs "
            "on this data are normalised to it")
    else:
        return (None, None, None)
    for s in used:
        s["libsize"] = True
    lists = [list(s["genes"]) for s in used]
    if all(x == gl for x in lists):
        return ts, frm, None
    if all(x == lists[0] for x in lists):
        return ts, frm, lists[0]
    common = set.intersection(*map(set, lists))
    return ts, frm, [g for g in lists[0] if g in common]


def _prepare(hs, out, r, gene_target=None, dest=None):
    srcs = _sources(hs, r)
    gl = _gene_plan(srcs, r)
    ts_given = r.target_sum
    csize = r.chunk or int(max(256, min(8192, 2 ** 26 // (4 * max(max(s["m"].shape[1] for s in srcs), 1)))))
    emb, logged = _scale_plan(srcs, r, csize)
    if r.hvg:
        if emb or not logged:
            raise UserError("--hvg needs log1p expression data (not an embedding or raw counts); drop --hvg or "
                            "let prepare normalise the counts (--normalize auto)")
        gl = _hvg(srcs, r, gl, csize)
    table, pert_names, context_names, batch_names, width = _plan_groups(srcs, r, csize)
    out.mkdir(parents=True, exist_ok=True)  # a staging folder (prepare): removed whole on any error
    _write_rows(srcs, r, out, table, len(gl), width, csize)
    _fault("rows")
    np.save(out / "groups.npy", table)
    hx = _group_sums(out, table, len(gl), r.dtype, csize)
    _fault("sums")
    sources = [dict(path=os.path.abspath(s["path"]), md5=md5(s["path"]), n_obs=int(s["n"]), kept=int(s["ln"].sum()),
                    scale=dict(kind=s["scale"].kind, target_sum=s["scale"].target_sum, evidence=s["scale"].evidence),
                    transform=s["tr"], se=s["h"].uns("nanostate_se") if emb else None)  # SE provenance (embed.py)
               for s in srcs]
    se_hashes = {(x["se"] or {}).get("se_hash") for x in sources if x["se"]}
    if len(se_hashes) > 1:  # embeddings from different SE checkpoints live in different spaces
        raise H5ADError(f"'{r.key}' comes from different SE checkpoints {sorted(se_hashes)} across files; "
                        "re-embed them with one checkpoint (embed.py transform --ckpt=...)")
    se = sorted({(x["se"] or {}).get("se_hash") for x in sources if x["se"]} - {None})
    ts, ts_from, libsize = _libsize_recipe(srcs, r, gl, ts_given, emb)
    for x, s in zip(sources, srcs):
        x["libsize_genes"] = None if s.get("libsize") is None or list(s["genes"]) == gl else int(len(s["genes"]))
    recipe = dict(key=r.key, normalize=str(r.normalize), target_sum=ts, target_sum_from=ts_from,
                  libsize_genes=libsize, log1p=bool(logged and not emb),
                  hvg=int(r.hvg) if r.hvg else None, hvg_flavor="seurat" if r.hvg else None,
                  se_hash=se[0] if se else None, genes=None if r.genes is None else "requested list",
                  intersect=bool(r.intersect), keep=r.keep, dtype=r.dtype, assume=r.assume, gene_col=r.gene_col,
                  modality=bool(r.modality))
    gtx = None
    if gene_target is not None:  # the gene-space matrix of the same cells (prepare(genes_key=...))
        gx = gene_target.index
        if any(md5(gene_target.dir / f) != md5(out / f) for f in ("codes.npy", "obs_names.npy", "groups.npy")):
            raise H5ADError(f"--genes-key {gx['recipe']['key']}: its rows do not line up with '{r.key}' "
                            "(internal error: same filters should give the same order)")
        os.replace(gene_target.dir / "X.bin", out / "G.bin")
        gtx = dict(key=gx["recipe"]["key"], genes=gx["genes"], n_genes=gx["n_genes"], dtype=gx["dtype"],
                   recipe=gx["recipe"], checksum=gx["checksum"], hash=gx["hashes"]["X.bin"],
                   sources=[dict(path=x["path"], scale=x["scale"], transform=x["transform"]) for x in gx["sources"]])
        recipe["genes_key"] = gtx["key"]
    N = int(table[-1, 4])
    hashes = {"X.bin": hx, **{f: _sha(out / f) for f in ("codes.npy", "groups.npy", "sums.npy", "obs_names.npy")}}
    index = dict(format=FORMAT, n_cells=N, n_genes=len(gl), dtype=r.dtype, genes=gl, pert_col=r.pert_col,
                 control=r.control, context_col=r.context_col or None, batch_col=r.batch_col or None,
                 pert_names=pert_names, context_names=context_names, batch_names=batch_names,
                 n_groups=len(table), recipe=recipe, sources=sources, hashes=hashes,
                 files={"X.bin": f"({N}, {len(gl)}) {r.dtype} row-major", "codes.npy": "(N, 4) int32 context, "
                        "pert, batch, source", "groups.npy": "(n_groups, 5) int64 context, pert, batch, start, stop",
                        "sums.npy": f"(n_groups, {len(gl)}) float64 row sums per group",
                        "obs_names.npy": f"(N,) S{width} utf-8"})
    if gtx:
        index["gene_target"] = gtx
    index = json.loads(json.dumps(index, default=_jsonable))  # what a reader will see, then its checksum
    index["checksum"] = _checksum(index)
    with open(out / "index.json.tmp", "w") as f:
        json.dump(index, f)
    os.replace(out / "index.json.tmp", out / "index.json")
    say(f"wrote {dest or out}: {N} cells x {len(gl)} genes ({r.dtype}), {len(context_names)} contexts, "
        f"{len(pert_names) - 1} perturbations + control '{r.control}', {len(table)} groups"
        + (f"; gene targets G.bin from '{gtx['key']}': {gtx['n_genes']} genes" if gtx else ""))
    return Prepared(out)


def to_storage(x, dtype):
    """float32 (n, G) -> the stored dtype (bfloat16 as its raw uint16 bits)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return x.astype(DTYPES[dtype], copy=False)


def from_storage(x, dtype):
    """Stored rows -> float32 (the inverse of to_storage)."""
    if dtype == "bfloat16":
        x = np.ascontiguousarray(x)
        x = x if x.flags.writeable else x.copy()  # torch views only writable arrays (a memmap slice is not)
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).float().numpy()
    return np.asarray(x).astype(np.float32, copy=False)


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
    """A prepared folder (see module docstring). Opening one reads index.json and groups.npy only
    (O(groups)); X, G, the per-row codes and the obs names are memory-mapped and read where used, so a
    training rank never holds anything per cell."""

    def __init__(self, out_dir):
        self.dir = Path(out_dir)
        if not (self.dir / "index.json").exists():
            aside = sorted(self.dir.parent.glob(f".{glob.escape(self.dir.name)}.old-*")) \
                if not os.path.lexists(self.dir) and self.dir.parent.is_dir() else []
            if aside:  # a kill inside a non-atomic switch: the previous folder waits next to it
                raise H5ADError(f"{out_dir}: missing: a prepare was killed while switching folders; the previous "
                                f"folder is {aside[0]}: re-run the prepare (it puts that back first) or rename it")
            raise H5ADError(f"{out_dir}: not a prepared data folder (no index.json); "
                            "run python -m state.data prepare first")
        try:
            with open(self.dir / "index.json") as f:
                self.index = ix = json.load(f)
            if not isinstance(ix, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise self._bad("index.json", f"unreadable ({e})") from None
        if ix.get("format") != FORMAT:
            raise H5ADError(f"{out_dir}: prepared with an older layout (format {ix.get('format')}, obs names "
                            f"and groups inside index.json); this version reads format {FORMAT}: re-run "
                            "python -m state.data prepare on the same inputs")
        miss = [k for k in ("genes", "n_cells", "n_genes", "dtype", "pert_col", "context_col", "batch_col",
                            "pert_names", "context_names", "batch_names", "control", "checksum") if k not in ix]
        if miss:
            raise self._bad("index.json", f"lacks {', '.join(miss)}")
        self.genes = ix["genes"]
        self.n_cells, self.n_genes, self.dtype = ix["n_cells"], ix["n_genes"], ix["dtype"]
        self.pert_col, self.context_col, self.batch_col = ix["pert_col"], ix["context_col"], ix["batch_col"]
        self.pert_names, self.context_names, self.batch_names = ix["pert_names"], ix["context_names"], ix["batch_names"]
        self.control = ix["control"]
        if self.control not in self.pert_names:
            raise self._bad("index.json", f"the control '{self.control}' is not in its perturbation names")
        self.control_code = self.pert_names.index(self.control)
        self.checksum = ix["checksum"]
        self._maps = {}
        self._sums_ok = False
        # optional gene-space targets of the same rows (prepare(..., genes_key=...)): G.bin
        gt = ix.get("gene_target")
        self.genes_key = gt["key"] if gt else None
        self.gene_names_out = list(gt["genes"]) if gt else None
        self.n_genes_out = int(gt["n_genes"]) if gt else 0
        self._check()

    RERUN = "re-run prepare (python -m state.data prepare) on the inputs: the folder is damaged or mixes two prepares"

    def _bad(self, name, what):
        return H5ADError(f"{self.dir / name}: {what}; {self.RERUN}")

    def _header(self, name):
        """(shape, dtype, data offset) of a .npy file's header, or an H5ADError naming it."""
        path = self.dir / name
        if not path.exists():
            raise self._bad(name, "missing")
        try:
            with open(path, "rb") as f:
                v = np.lib.format.read_magic(f)
                rd = np.lib.format.read_array_header_2_0 if v == (2, 0) else np.lib.format.read_array_header_1_0
                sh, fortran, dt = rd(f)
                return tuple(sh), dt, f.tell(), fortran
        except (ValueError, OSError, EOFError) as e:
            raise self._bad(name, f"not a .npy file ({e})") from None

    def _npy(self, name, shape, kind):
        """Check a .npy file's header against the shape and dtype kind it must have, and its size against
        the header (a truncated file), reading the header only; returns the dtype."""
        path = self.dir / name
        sh, dt, off, fortran = self._header(name)
        if tuple(sh) != tuple(shape) or dt.kind not in kind or fortran:
            raise self._bad(name, f"shape {tuple(sh)} {dt}, but index.json describes {tuple(shape)}")
        want = off + int(np.prod(sh, dtype=np.int64)) * dt.itemsize
        if os.path.getsize(path) != want:
            raise self._bad(name, f"{os.path.getsize(path)} bytes, but its header describes {want} (truncated?)")
        return dt

    def _check(self):
        """The folder's files against each other and index.json, cheaply (headers, sizes, the O(groups)
        table, a content hash of sums.npy when it is small, two groups' sums against their X.bin rows;
        never a full read of X.bin). Each inconsistency is an H5ADError naming the file and saying to
        re-run prepare. `verify()` hashes every file in full."""
        ix, N, G = self.index, self.n_cells, self.n_genes
        if not (isinstance(N, int) and isinstance(G, int) and N > 0 and G > 0):
            raise self._bad("index.json", f"n_cells {N!r}, n_genes {G!r}")
        if len(self.genes) != G:
            raise self._bad("index.json", f"lists {len(self.genes)} genes but n_genes is {G}")
        if self.dtype not in DTYPES:
            raise self._bad("index.json", f"unknown dtype '{self.dtype}'")
        # n_cells of index.json against the per-row files when they agree with each other (index.json lies)
        rows = {f: self._header(f)[0][:1] for f in ("codes.npy", "obs_names.npy")}
        if len({r for r in rows.values()}) == 1 and rows["codes.npy"] and rows["codes.npy"][0] != N:
            raise self._bad("index.json", f"n_cells is {N}, but codes.npy and obs_names.npy hold "
                            f"{rows['codes.npy'][0]} cells")
        # the groups table: O(groups), read whole
        if ix.get("n_groups") is not None:
            self._npy("groups.npy", (ix["n_groups"], 5), "iu")
        try:
            T = np.load(self.dir / "groups.npy")
        except (ValueError, OSError) as e:
            raise self._bad("groups.npy", f"unreadable ({e})") from None
        if T.ndim != 2 or T.shape[1] != 5 or T.dtype.kind not in "iu" or not len(T):
            raise self._bad("groups.npy", f"shape {T.shape} {T.dtype}, not (n_groups, 5) integers")
        T = T.astype(np.int64)
        start, stop = T[:, 3], T[:, 4]
        gap = np.concatenate([[start[0] != 0], start[1:] != stop[:-1]]) | (stop <= start)
        if gap.any() or stop[-1] != N:
            k = int(np.argmax(gap)) if gap.any() else len(T) - 1
            raise self._bad("groups.npy", f"its row ranges do not cover the {N} cells of index.json one after "
                            f"another (group {k}: rows {T[k, 3]}..{T[k, 4]}; the last ends at {stop[-1]})")
        for j, (what, names) in enumerate((("context", self.context_names), ("perturbation", self.pert_names),
                                           ("batch", self.batch_names))):
            if T[:, j].min() < 0 or T[:, j].max() >= len(names):
                raise self._bad("groups.npy", f"a {what} code {int(T[:, j].max())} outside the {len(names)} "
                                "names of index.json")
        key = (T[:, 0] * len(self.pert_names) + T[:, 1]) * len(self.batch_names) + T[:, 2]
        if (np.diff(key) <= 0).any():
            raise self._bad("groups.npy", "groups not sorted by (context, perturbation, batch) or repeated")
        self.group_table = T  # (n_groups, 5) context, pert, batch, start, stop
        # per-row files: sizes and headers only
        isz = np.dtype(DTYPES[self.dtype]).itemsize
        for name, n_cols, dt in (("X.bin", G, self.dtype),) + (
                (("G.bin", self.n_genes_out, ix["gene_target"]["dtype"]),) if self.n_genes_out else ()):
            p = self.dir / name
            want = N * n_cols * np.dtype(DTYPES[dt]).itemsize
            if not p.exists():
                raise self._bad(name, "missing")
            if os.path.getsize(p) != want:
                raise self._bad(name, f"{os.path.getsize(p)} bytes, but index.json describes {N} cells x {n_cols} "
                                f"genes of {dt} ({want} bytes): truncated, or index.json belongs to another prepare")
        self._npy("codes.npy", (N, 4), "iu")
        self._npy("obs_names.npy", (N,), "S")
        self._check_codes()
        hashes = ix.get("hashes")
        if hashes is not None and _checksum(ix) != self.checksum:
            raise self._bad("index.json", f"its checksum {self.checksum} does not match its content (edited after "
                            "prepare?)")
        if (self.dir / "sums.npy").exists():  # optional: without it group means read the rows (.sums is None)
            self._npy("sums.npy", (len(T), G), "f")
            if hashes and os.path.getsize(self.dir / "sums.npy") <= 64 << 20:
                self._verify_sums()
            self._cross_check(isz)

    def _check_codes(self, budget=64 << 20):
        """Every row's (context, perturbation, batch) codes in codes.npy against its group's in groups.npy:
        all rows while the file is small (<= budget bytes: 4M cells), else each group's first and last row.
        A code out of range or a row in the wrong group would give predictions wrong labels silently."""
        T, C = self.group_table, self._map("codes.npy")
        n = T[:, 4] - T[:, 3]
        if C.nbytes <= budget:
            want = np.repeat(T[:, :3], n, axis=0)  # (N, 3) the group's codes for every row
            got = np.asarray(C[:, :3], np.int64)
        else:
            ends = np.concatenate([T[:, 3], T[:, 4] - 1])
            want, got = np.concatenate([T[:, :3], T[:, :3]]), np.asarray(C[ends, :3], np.int64)
        bad = (want != got).any(1)
        if bad.any():
            i = int(np.argmax(bad))
            raise self._bad("codes.npy", f"a row's codes {got[i].tolist()} (context, perturbation, batch) are not "
                            f"its group's {want[i].tolist()} in groups.npy")

    def _verify_sums(self):
        h = self.index.get("hashes") or {}
        if not self._sums_ok and "sums.npy" in h:
            if _sha(self.dir / "sums.npy") != h["sums.npy"]:
                raise self._bad("sums.npy", "its content differs from what prepare wrote (its hash in index.json)")
        self._sums_ok = True

    def _cross_check(self, isz, budget=8 << 20):
        """The smallest group's and the last group's sums in sums.npy against their rows in X.bin (when
        they fit in `budget` bytes): a sums.npy or X.bin from another prepare (or zeroed) is caught without
        hashes."""
        T = self.group_table
        n = T[:, 4] - T[:, 3]
        S = np.load(self.dir / "sums.npy", mmap_mode="r")
        for g in dict.fromkeys([int(np.argmin(n)), len(T) - 1]):
            if n[g] * self.n_genes * isz > budget:
                continue
            x = from_storage(np.asarray(self._map("X.bin")[T[g, 3]:T[g, 4]]), self.dtype).sum(0, dtype=np.float64)
            if not np.allclose(S[g], x, rtol=1e-5, atol=1e-6):
                j = int(np.argmax(np.abs(S[g] - x)))
                raise self._bad("sums.npy", f"group {g}'s sum of gene '{self.genes[j]}' is {S[g, j]:g} but its "
                                f"{int(n[g])} rows in X.bin sum to {x[j]:g}: X.bin and sums.npy are not from one prepare")

    def verify(self):
        """Hash every file in full against index.json's hashes (a full read): H5ADError naming the first
        that differs. Folders prepared before hashes existed have nothing to compare: returns False."""
        h = self.index.get("hashes")
        if not h:
            return False
        for name, want in h.items():
            if name == "sums.npy" and not (self.dir / name).exists():
                continue  # optional (see sums)
            if _sha(self.dir / name) != want:
                raise self._bad(name, "its content differs from what prepare wrote (its hash in index.json)")
        gt = self.index.get("gene_target")
        if gt and gt.get("hash") and _sha(self.dir / "G.bin") != gt["hash"]:
            raise self._bad("G.bin", "its content differs from what prepare wrote (its hash in index.json)")
        self._sums_ok = True
        return True

    def _map(self, name):
        """A memory map of one file, re-opened after a fork (each worker process gets its own)."""
        m = self._maps.get(name)
        if m is None or m[0] != os.getpid():
            if name == "X.bin":
                a = np.memmap(self.dir / name, dtype=DTYPES[self.dtype], mode="r", shape=(self.n_cells, self.n_genes))
            elif name == "G.bin":
                a = np.memmap(self.dir / name, dtype=DTYPES[self.index["gene_target"]["dtype"]], mode="r",
                              shape=(self.n_cells, self.n_genes_out))
            else:
                a = np.load(self.dir / name, mmap_mode="r")
            m = self._maps[name] = (os.getpid(), a)
        return m[1]

    shape = property(lambda self: (self.n_cells, self.n_genes))

    @property
    def X(self):
        """(n_cells, n_genes) memmap."""
        return self._map("X.bin")

    @property
    def sums(self):
        """(n_groups, n_genes) float64 memmap of each group's row sums, or None (a folder prepared
        before sums.npy existed)."""
        if not (self.dir / "sums.npy").exists():
            return None
        S = self._map("sums.npy")
        if S.shape != (len(self.group_table), self.n_genes):
            raise H5ADError(f"{self.dir / 'sums.npy'}: shape {S.shape}, but the folder has {len(self.group_table)} "
                            f"groups x {self.n_genes} genes (a file from another prepare?): re-run prepare")
        self._verify_sums()  # a large one is hashed on first use (a small one when the folder was opened)
        return S

    @property
    def G(self):
        """(n_cells, n_genes_out) memmap of the gene-space targets, or None without --genes-key."""
        return self._map("G.bin") if self.n_genes_out else None

    # per-row codes, memory-mapped columns of codes.npy (N, 4): read only where indexed
    context = property(lambda self: self._map("codes.npy")[:, 0])
    pert = property(lambda self: self._map("codes.npy")[:, 1])
    batch = property(lambda self: self._map("codes.npy")[:, 2])
    source = property(lambda self: self._map("codes.npy")[:, 3])

    @property
    def groups(self):
        """[Group] in row order: contiguous rows of one (context, pert, batch)."""
        return [Group(*map(int, g)) for g in self.group_table]

    def names(self, idx=None):
        """Obs names (str array) of rows idx (all rows when None), read from obs_names.npy."""
        a = self._map("obs_names.npy")
        a = a[:] if idx is None else a[np.asarray(idx, np.int64)]
        return np.char.decode(a, "utf-8")

    @property
    def obs_names(self):
        return self.names()

    def rows_genes(self, idx):
        """Dense float32 gene-space rows (len(idx), n_genes_out), any order (requires --genes-key)."""
        if self.G is None:
            raise UserError(f"{self.dir}: no gene-space targets (prepare with --genes-key X)")
        idx = np.asarray(idx, np.int64).ravel()
        order = np.argsort(idx, kind="stable")
        out = np.empty((len(idx), self.n_genes_out), np.float32)
        out[order] = self._read(idx[order], genes=True)
        return out

    def __getstate__(self):  # never pickle a memmap's pages into a worker
        d = self.__dict__.copy()
        d["_maps"] = {}
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

    def _read(self, idx, genes=False, out=None):
        """X[idx] (G[idx] with genes=True) as float32 (n, G), into `out` when given: for float32 one copy
        out of the page cache. np.take(mode="clip") skips the bounds check (the samplers' indices are
        valid) and releases the GIL; into a reused buffer it also skips the page faults of a fresh one."""
        src = np.asarray(self.G if genes else self.X)  # the mapping as a plain ndarray
        dt = self.index["gene_target"]["dtype"] if genes else self.dtype
        if dt == "float32":
            return np.take(src, idx, axis=0, out=out, mode="clip")
        x = from_storage(np.take(src, idx, axis=0, mode="clip"), dt)
        if out is None:
            return x
        out[...] = x
        return out

    def label(self, what, codes):
        """Names for codes: label('pert', data.pert[idx]) -> np str array."""
        v = {"pert": self.pert_names, "context": self.context_names, "batch": self.batch_names}[what]
        return np.asarray(v, dtype=object)[np.asarray(codes)]

    def __repr__(self):
        return (f"Prepared({self.dir}: {self.n_cells} cells x {self.n_genes} genes, "
                f"{len(self.context_names)} contexts, {len(self.pert_names)} perturbation labels)")


# -----------------------------------------------------------------------------
# seeded bijections and row sets that are never materialised

_U = np.uint64


def _mix(x):
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> _U(30))) * _U(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _U(27))) * _U(0x94D049BB133111EB)
    return x ^ (x >> _U(31))


def hkey(*parts):
    """A uint64 key (array) from integers/arrays, e.g. hkey(seed, epoch, group)."""
    h = np.zeros(np.broadcast(*[np.asarray(p) for p in parts]).shape, np.uint64)
    for p in parts:
        h = _mix(h ^ (np.asarray(p).astype(np.int64).astype(np.uint64) + _U(0x9E3779B97F4A7C15)))
    return h


def permute(k, n, key, rounds=6):
    """perm_key(k): a seeded bijection of [0, n) applied to k (arrays broadcast; n, key per element).
    A Feistel network on the ceil(log2 n) bits covering n (unbalanced halves of a and b bits whose sizes
    swap every round, so an even number of rounds ends where it started), cycle-walked back into [0, n) (< 2 walks on
    average): O(1) memory per element, so an epoch's order over 10^9 sets is never stored. The round
    function takes the top bits of a 64-bit multiplicative hash (Knuth) of the half and a round key."""
    k, n, key = (np.array(a, np.uint64) for a in np.broadcast_arrays(k, n, key))
    bits = np.ceil(np.log2(np.maximum(n, 4).astype(np.float64))).astype(np.uint64)
    A = bits // _U(2)  # bits of the left half; the right half has bits - A
    rk = [_mix(key + _U((r + 1) * 0x9E3779B97F4A7C15 % 2 ** 64)) for r in range(rounds)]
    x, todo = k, np.arange(k.size)
    x, n, bits, A = x.reshape(-1), n.reshape(-1), bits.reshape(-1), A.reshape(-1)
    rk = [r.reshape(-1) for r in rk]
    with np.errstate(over="ignore"):
        while len(todo):
            xs, a = x[todo], A[todo]
            b = bits[todo] - a
            L, R = xs >> b, xs & ((_U(1) << b) - _U(1))
            for r in range(rounds):  # (L: a bits, R: b bits) -> (L: b bits, R: a bits)
                f = ((R ^ rk[r][todo]) * _U(0xD6E8FEB86659FD93)) >> (_U(64) - a)
                L, R = R, L ^ f
                a, b = b, a
            x[todo] = (L << b) | R
            todo = todo[x[todo] >= n[todo]]
    return x.reshape(k.shape).astype(np.int64)


class Rows:
    """A set of prepared rows kept as segments, never as one index per row: segment s holds the rows
    start[s] + p_s(k) for k in [lo[s], hi[s]), p_s = permute(., n[s], key[s]) where shuf[s], else the
    identity. A split's train/val parts are the two ends [m, n) and [0, m) of one seeded permutation of
    each group, so they are disjoint and O(groups) to describe."""

    def __init__(self, start, n, lo, hi, key=None, shuf=None):
        self.start, self.n, self.lo, self.hi = (np.asarray(a, np.int64).reshape(-1) for a in (start, n, lo, hi))
        self.key = np.zeros(len(self.start), np.uint64) if key is None else np.asarray(key, np.uint64)
        self.shuf = np.zeros(len(self.start), bool) if shuf is None else np.asarray(shuf, bool)
        keep = self.hi > self.lo
        if not keep.all():
            for k in ("start", "n", "lo", "hi", "key", "shuf"):
                setattr(self, k, getattr(self, k)[keep])

    @classmethod
    def of(cls, rows):
        """From an index array: its runs of consecutive rows, identity order."""
        r = np.unique(np.asarray(rows, np.int64))
        brk = np.flatnonzero(np.diff(r) != 1) + 1
        a = r[np.concatenate([[0], brk])] if len(r) else r
        n = np.diff(np.concatenate([[0], brk, [len(r)]])) if len(r) else r
        return cls(a, n, np.zeros(len(a)), n)

    def __len__(self):
        return int((self.hi - self.lo).sum())

    def __add__(self, other):
        """The segments of both (disjoint row sets)."""
        return Rows(*(np.concatenate([getattr(self, k), getattr(other, k)])
                      for k in ("start", "n", "lo", "hi", "key", "shuf")))

    def at(self, s, k):
        """Rows of segments s at offsets k in [0, hi - lo) (arrays of one shape)."""
        s, k = np.asarray(s, np.int64), np.asarray(k, np.int64)
        j = self.lo[s] + k
        sh = self.shuf[s]
        if sh.any():
            j = j.copy()
            j[sh] = permute(j[sh], self.n[s][sh], self.key[s][sh])
        return self.start[s] + j

    def array(self):
        """Every row, sorted (materialised: O(rows); for the evaluation parts and small data)."""
        m = self.hi - self.lo
        s = np.repeat(np.arange(len(m)), m)
        k = np.arange(len(s)) - np.repeat(np.cumsum(m) - m, m)
        return np.sort(self.at(s, k))

    def cut(self, data):
        """The same rows with every segment inside one prepared group; returns (Rows, group index per
        segment). Permuted segments are whole groups already; identity runs are cut at group starts."""
        gs = data.group_table[:, 3]
        parts = []
        ident = ~self.shuf
        a, b = self.start[ident] + self.lo[ident], self.start[ident] + self.hi[ident]
        if len(a):  # identity runs (disjoint): cut at every group start inside one
            o = np.argsort(a)
            a, b = a[o], b[o]
            cuts = np.unique(np.concatenate([a, b, gs]))
            lo_, hi_ = cuts[:-1], cuts[1:]
            i = np.searchsorted(a, lo_, "right") - 1  # the run starting at or before lo_
            ok = (i >= 0) & (lo_ < b[np.maximum(i, 0)])  # pieces in the gaps between runs go
            lo_, hi_ = lo_[ok], hi_[ok]
            parts.append(Rows(lo_, hi_ - lo_, np.zeros(len(lo_)), hi_ - lo_))
        if self.shuf.any():
            sh = self.shuf
            parts.append(Rows(self.start[sh], self.n[sh], self.lo[sh], self.hi[sh], self.key[sh], sh[sh]))
        out = Rows(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("start", "n", "lo", "hi", "key", "shuf")))
        o = np.argsort(out.start + out.lo, kind="stable")  # row order = (context, pert, batch) order
        out = Rows(*(getattr(out, k)[o] for k in ("start", "n", "lo", "hi", "key", "shuf")))
        return out, np.searchsorted(gs, out.start, "right") - 1


def draw_controls(pool, n, rng):
    """n control rows from `pool`, spread as evenly as possible: whole random permutations of the pool,
    then a random subset without replacement for the rest, shuffled (each control is used floor(n/k) or
    ceil(n/k) times). Draws with replacement add sampling noise to a predicted pseudobulk, and a weak
    effect (a few hundredths of a log unit) drowns in it; every predictor (ST and baselines) uses this."""
    pool = np.asarray(pool)
    reps, rest = divmod(int(n), len(pool))
    parts = [rng.permutation(pool) for _ in range(reps)] + [rng.choice(pool, rest, replace=False)]
    return rng.permutation(np.concatenate(parts))


# -----------------------------------------------------------------------------
# cell sets with matched controls (SPEC 5)

class SetSampler:
    """Sets of `set_size` cells of one (context, pert[, batch]) group, each paired with control cells drawn
    with replacement from the same context (and batch under mapping="batch", falling back to the context).
    `rows`: a Rows (a split part) or an index array.

    The batch at (epoch, step) is computed on demand from O(groups) tables: set ids are a seeded
    permutation (permute) of [0, n_sets) per epoch, a set is S consecutive positions of its group under a
    seeded per-(epoch, group) permutation, and positions map to rows through the segments. Nothing per
    cell or per set is stored. train=True: the last set of a group is padded by resampling the group, the
    order reshuffles every epoch. train=False: unpadded sets (lens < set_size, zero rows beyond) in group
    order; the last step's wrap-around sets have valid=False.
    Batches are dicts of tensors: ctrl, tgt (B,S,G) float32; pert, context, lens (B,) int64; batch (B,S);
    tgt_idx, ctrl_idx (B,S) row indices (-1 = padding); valid (B,) bool; tgt_genes (B,S,G_out) float32 when
    the data has gene-space targets (prepare --genes-key)."""

    def __init__(self, data, rows, set_size, batch_size, seed=0, train=True, control_sets=True, mapping="random"):
        if mapping not in ("random", "batch"):
            raise UserError(f"mapping '{mapping}' not one of random, batch")
        self.data, self.S, self.B = data, int(set_size), int(batch_size)
        self.seed, self.train, self.control_sets, self.mapping = seed, train, control_sets, mapping
        rows = rows if isinstance(rows, Rows) else Rows.of(rows)
        if len(rows) == 0:
            raise UserError("SetSampler: no rows (empty split?)")
        self.segs, gi = rows.cut(data)
        gt = data.group_table
        c, p, b = gt[gi, 0], gt[gi, 1], gt[gi, 2]  # codes per segment
        self.seg_batch = b
        m = self.segs.hi - self.segs.lo
        self.cum = np.concatenate([[0], np.cumsum(m)])  # segment s holds positions [cum[s], cum[s+1])
        ctl = p == data.control_code
        # control pools: runs of control segments of one context (and batch under batch mapping)
        pools, self.pool_of = [], {}
        for k in np.unique(c[ctl]):
            s = np.flatnonzero(ctl & (c == k))
            self.pool_of[(int(k), -1)] = len(pools); pools.append((s[0], s[-1] + 1))
            if mapping == "batch":
                for j in np.unique(b[s]):
                    t = s[b[s] == j]
                    self.pool_of[(int(k), int(j))] = len(pools); pools.append((t[0], t[-1] + 1))
        self.pools = np.array(pools, np.int64).reshape(-1, 2)  # (n_pools, 2) segment ranges
        # target groups: runs of segments with one (context, pert[, batch]) (segments are in row order)
        key = (c * len(data.pert_names) + p) * (len(data.batch_names) if mapping == "batch" else 1) \
            + (b if mapping == "batch" else 0)
        brk = np.concatenate([[0], np.flatnonzero(np.diff(key)) + 1, [len(key)]])
        gs = []  # (first segment, end segment, context, pert, pool)
        for x, y in zip(brk[:-1], brk[1:]):
            k, pp, bb = int(c[x]), int(p[x]), int(b[x])
            if pp == data.control_code and not control_sets:
                continue
            pool = self.pool_of.get((k, bb if mapping == "batch" else -1), self.pool_of.get((k, -1)))
            if pool is None:
                raise UserError(f"context '{data.context_names[k]}' has no control cells "
                                 f"('{data.control}') among the sampler's rows, so perturbation "
                                 f"'{data.pert_names[pp]}' cannot be paired with controls")
            gs.append((x, y, k, pp, pool))
        if not gs:
            raise UserError("SetSampler: no target groups (only controls and control_sets=False?)")
        self.g = np.array(gs, np.int64)  # (n_groups, 5)
        self.g_n = self.cum[self.g[:, 1]] - self.cum[self.g[:, 0]]  # cells per group
        k_sets = -(-self.g_n // self.S)
        self.set_base = np.concatenate([[0], np.cumsum(k_sets)])  # group g holds sets [base[g], base[g+1])
        self.n_sets = int(self.set_base[-1])
        self.steps_per_epoch = -(-self.n_sets // self.B)
        self.epoch, self.step = 0, 0

    def __len__(self):
        return self.steps_per_epoch

    def _rows_at(self, pos):
        """Global positions (any shape) -> row indices."""
        s = np.searchsorted(self.cum, pos, "right") - 1
        return self.segs.at(s, pos - self.cum[s]), s

    def indices(self, epoch, step):
        """Row indices of the batch at (epoch, step), without reading X: target rows t and control rows
        ci (B,S) (-1 = padding), lens (B,), group ids g (B,), valid (B,), target segments ts (B,S).
        A pure function of (seed, epoch, step)."""
        S, B = self.S, self.B
        j = step * B + np.arange(B)
        valid = j < self.n_sets
        j = j % self.n_sets  # the last step wraps around
        sid = permute(j, self.n_sets, hkey(self.seed, epoch, -1)) if self.train else j
        g = np.searchsorted(self.set_base, sid, "right") - 1  # (B,)
        n = self.g_n[g]
        i = (sid - self.set_base[g])[:, None] * S + np.arange(S)  # (B,S) positions in the group
        lens = np.minimum(S, n - i[:, 0]) if not self.train else np.full(B, S)
        inside = i < n[:, None]
        rng = np.random.default_rng([self.seed, epoch, step, 1])
        if self.train:
            # this epoch's order of the group's cells; the last set is padded by resampling the group
            pos = np.where(inside, permute(np.minimum(i, n[:, None] - 1), n[:, None],
                                           hkey(self.seed, epoch, g)[:, None]),
                           (rng.random((B, S)) * n[:, None]).astype(np.int64))
        else:
            pos = np.where(inside, i, 0)
        t, ts = self._rows_at(self.cum[self.g[g, 0]][:, None] + pos)
        pool = self.pools[self.g[g, 4]]  # (B, 2) segment range of each set's control pool
        a, z = self.cum[pool[:, 0]], self.cum[pool[:, 1]]
        ci, _ = self._rows_at(a[:, None] + (rng.random((B, S)) * (z - a)[:, None]).astype(np.int64))
        if not self.train:
            t, ci = np.where(inside, t, -1), np.where(inside, ci, -1)
        # order within a set is arbitrary: sorted rows read the memmap forwards (-1 padding stays last)
        big = np.iinfo(np.int64).max
        o = np.argsort(np.where(t < 0, big, t), axis=1, kind="stable")
        t, ts = np.take_along_axis(t, o, 1), np.take_along_axis(ts, o, 1)
        ci = np.sort(np.where(ci < 0, big, ci), axis=1)
        ci[ci == big] = -1
        return t, ci, lens, g, valid, ts

    def buffers(self):
        """Arrays that batch(out=...) fills in place (a loader reuses them instead of allocating): x, g
        for the expression rows, and one per small tensor of a batch."""
        B, S = self.B, self.S
        b = dict(x=np.empty((2 * B * S, self.data.n_genes), np.float32),
                 **{k: np.empty((B, S), np.int64) for k in ("batch", "tgt_idx", "ctrl_idx")},
                 **{k: np.empty(B, np.int64) for k in ("pert", "context", "lens")}, valid=np.empty(B, bool))
        if self.data.G is not None:
            b["g"] = np.empty((B * S, self.data.n_genes_out), np.float32)
        return b

    def from_buffers(self, buf):
        """The batch that batch(out=buf) wrote, as tensors viewing `buf` (a loader's shared ring)."""
        B, S = buf["tgt_idx"].shape
        x = torch.from_numpy(buf["x"]).view(2, B, S, -1)  # (2, B, S, G): targets, controls
        b = dict(ctrl=x[1], tgt=x[0], **{k: torch.from_numpy(v) for k, v in buf.items() if k not in ("x", "g")})
        if "g" in buf:
            b["tgt_genes"] = torch.from_numpy(buf["g"]).view(B, S, -1)
        return b

    def batch(self, epoch, step, out=None):
        """The batch (dict of tensors, see the class docstring) at (epoch, step); with out=buffers() its
        expression tensors are views of those arrays."""
        t, ci, lens, g, v, ts = self.indices(epoch, step)
        B, S = t.shape
        pad = t < 0
        out = out or {}
        # one read for targets and controls; padding reads the set's first row and is zeroed below
        x = self.data._read(np.concatenate([np.where(pad, t[:, :1], t).ravel(), np.where(pad, ci[:, :1], ci).ravel()]),
                            out=out.get("x"))
        x = torch.from_numpy(x).view(2, B, S, -1)
        if pad.any():
            x[:, torch.from_numpy(pad)] = 0
        extra = {}
        if self.data.G is not None:  # gene-space targets of the same target cells (gene decoder)
            tg = torch.from_numpy(self.data._read(np.where(pad, t[:, :1], t).ravel(), genes=True,
                                                  out=out.get("g"))).view(B, S, -1)
            if pad.any():
                tg[torch.from_numpy(pad)] = 0
            extra["tgt_genes"] = tg
        small = dict(pert=self.g[g, 3], context=self.g[g, 2], batch=np.where(pad, 0, self.seg_batch[ts]),
                     lens=lens.astype(np.int64), valid=v, tgt_idx=t, ctrl_idx=ci)
        for k, a in small.items():
            if k in out:
                np.copyto(out[k], a)
        return dict(ctrl=x[1], tgt=x[0], **extra,
                    **{k: torch.from_numpy(out[k] if k in out else np.ascontiguousarray(a)) for k, a in small.items()})

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
        return dict(epoch=self.epoch, step=self.step, seed=self.seed, set_size=self.S, batch_size=self.B,
                    steps_per_epoch=self.steps_per_epoch)

    def load_state_dict(self, sd):
        for k in ("seed", "set_size", "batch_size", "steps_per_epoch"):
            if sd[k] != self.state_dict()[k]:
                raise UserError(f"sampler state has {k}={sd[k]} but this sampler has {self.state_dict()[k]}")
        self.epoch, self.step = int(sd["epoch"]), int(sd["step"])


class CellSampler:
    """Single cells (not sets) from one or more prepared folders, for SE pre-training. Each folder keeps
    its first `val` cells of a seeded permutation out (val_rows); an epoch is a seeded permutation
    (permute) of all the other cells of all folders, cut into batches of B (a last partial batch is
    dropped). Folders may measure different genes: `to_vocab[f]` maps folder f's rows (n, G_f) into one
    (n, V) vocabulary. batch(epoch, step) -> x (B, V) float32, folder (B,), row (B,) the row in its
    folder. Nothing per cell is stored; used through state.dist.StepSampler like SetSampler (S = 1: a
    "set" is one cell), so the same global cursor, world-size independence and loader processes apply."""

    def __init__(self, datas, to_vocab, V, batch_size, seed=0, val=256):
        self.datas, self.to_vocab, self.V, self.B, self.S, self.seed = datas, to_vocab, int(V), int(batch_size), 1, seed
        self.n = np.array([d.n_cells for d in datas], np.int64)
        self.nv = np.minimum(int(val), self.n // 10)  # held-out cells per folder
        self.key = hkey(seed, np.arange(len(datas)), 99)  # each folder's fixed permutation
        self.cum = np.concatenate([[0], np.cumsum(self.n - self.nv)])  # training positions per folder
        if self.cum[-1] < self.B:
            raise UserError(f"only {int(self.cum[-1])} training cells for a batch of {self.B}")
        self.steps_per_epoch = int(self.cum[-1] // self.B)

    def val_rows(self, f):
        """Folder f's held-out rows (sorted)."""
        return np.sort(permute(np.arange(self.nv[f]), self.n[f], self.key[f]))

    def indices(self, epoch, step):
        """(folder (B,), row (B,)) of the batch at (epoch, step): a pure function of (seed, epoch, step)."""
        g = permute(step * self.B + np.arange(self.B), self.cum[-1], hkey(self.seed, epoch, -1))
        f = np.searchsorted(self.cum, g, "right") - 1
        return f, permute(self.nv[f] + g - self.cum[f], self.n[f], self.key[f])

    def buffers(self):
        return dict(x=np.empty((self.B, self.V), np.float32), folder=np.empty(self.B, np.int64),
                    row=np.empty(self.B, np.int64))

    def from_buffers(self, buf):
        return {k: torch.from_numpy(v) for k, v in buf.items()}

    def batch(self, epoch, step, out=None):
        f, r = self.indices(epoch, step)
        out = out or self.buffers()
        for k in np.unique(f):
            m = f == k
            out["x"][m] = self.to_vocab[k](self.datas[k].rows(r[m]))
        out["folder"][:], out["row"][:] = f, r
        return self.from_buffers(out)


# -----------------------------------------------------------------------------
# CLI

def main(argv=None):
    ap = Parser(prog="python -m state.data", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="convert .h5ad file(s) into a prepared folder")
    p.add_argument("paths", nargs="+", help="input .h5ad files, globs or folders, then OUT_DIR")
    p.add_argument("--pert_col"); p.add_argument("--control"); p.add_argument("--context_col")
    p.add_argument("--batch_col"); p.add_argument("--key", default="X"); p.add_argument("--gene_col")
    p.add_argument("--genes_key", help="with an embedding --key: also store this gene matrix (X, layers/..) "
                   "of the same cells as the gene decoder's target (G.bin)")
    p.add_argument("--genes", help="text file with one gene name per line to keep, in order")
    p.add_argument("--obsm_genes", help="text file with the gene name of each column of an obsm --key, in order")
    p.add_argument("--intersect", action="store_true", help="align files on their common genes")
    p.add_argument("--hvg", type=int); p.add_argument("--normalize", default="auto", choices=["auto", "yes", "no"])
    p.add_argument("--target_sum", type=float); p.add_argument("--assume", choices=["normalized", "log1p"])
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--keep", action="append", default=[], help="col=v1,v2 (repeatable): keep only these cells")
    p.add_argument("--modality", action="store_true", help="key labels 'type:label' by obs perturbation_type")
    i = sub.add_parser("info", help="summarise a prepared folder")
    i.add_argument("dir")
    i.add_argument("--verify", action="store_true", help="also hash every file against index.json (a full read)")
    a = ap.parse_args(dashes(argv))
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
            d = prepare(a.paths[:-1], a.paths[-1], pert_col=a.pert_col, control=a.control, context_col=a.context_col,
                        batch_col=a.batch_col, key=a.key, hvg=a.hvg, normalize=a.normalize, target_sum=a.target_sum,
                        dtype=a.dtype, keep=keep, intersect=a.intersect, genes=genes, gene_col=a.gene_col,
                        assume=a.assume, modality=a.modality, genes_key=a.genes_key,
                        obsm_genes=Path(a.obsm_genes).read_text().split() if a.obsm_genes else None)
        else:
            d = Prepared(a.dir)
            if a.verify:
                print(f"  verified: every file matches index.json's hashes" if d.verify()
                      else "  prepared before content hashes: nothing to verify (re-run prepare to add them)")
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
    except (UserError, OSError) as e:  # a user's mistake: one line, status 2 (anything else is our bug)
        from state.errors import message
        m = message(COMMAND, e)
        if m is None:
            raise
        print(m, file=sys.stderr, flush=True)
        return 2
    return 0


COMMAND = "python -m state.data"

if __name__ == "__main__":
    from state.errors import run
    sys.exit(run(COMMAND, main, None, __doc__))
