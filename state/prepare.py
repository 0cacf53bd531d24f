"""
prepare: .h5ad files in, one prepared folder out (the layout state/data.py reads and documents). Streamed
with memory bounded in the number of cells: labels are read as codes block by block, rows are counted per
(context, perturbation, batch) group in a first pass and written to their sorted place in a second (a
counting sort, positioned writes). Columns, the control label and the scale are detected when not given
(state/scale.py's rules); every row written is checked against the scale found.

A prepare is one commit: it writes into .OUT_DIR.prepare-PID next to OUT_DIR and switches it in at the end
(an atomic exchange where the system has one), so a kill leaves the old folder or the new one, and the
next prepare removes what a killed one left. The command is `python -m state.data prepare` (state/data.py).
"""

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

from state.data import DTYPES, FORMAT, Prepared, _checksum, _sha, from_storage, to_storage
from state.errors import UserError
from state.h5ad import H5AD, H5ADError, _hash_strings
from state.scale import Scale, check_rows, detect_scale, hvg_seurat, normalize_log1p, say

PERT_COLS = ("target_gene", "perturbation", "condition", "gene", "drugname_drugconc", "drug")
CONTROLS = ("non-targeting", "control", "ctrl", "DMSO_TF", "PBS", "NT")
CONTEXT_COLS = ("cell_type", "cell_line", "celltype", "cell_line_id")


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


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot record {type(o).__name__} in index.json")


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
