"""
The inputs of a prepare (state/prepare.py): the .h5ad files read, detected and checked before anything is
written, in passes streamed with memory bounded in the number of cells. Labels are read as codes block by
block, never as strings per cell. The perturbation and context columns and the control label are detected
when not given (PERT_COLS, CONTROLS, CONTEXT_COLS); the files' genes are aligned (gene_plan); each file's
scale is detected and its transform chosen (scale_plan, state/scale.py's rules); highly variable genes are
selected in one pass (select_hvg); the cells are counted per (context, perturbation, batch) group in a
first pass over the labels (plan_groups), and `blocks` yields the kept, transformed rows for the writer,
every one checked against the scale found.
"""

import glob
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from state.h5ad import H5ADError, _hash_strings
from state.scale import Scale, check_rows, detect_scale, hvg_seurat, normalize_log1p, say

PERT_COLS = ("target_gene", "perturbation", "condition", "gene", "drugname_drugconc", "drug")
CONTROLS = ("non-targeting", "control", "ctrl", "DMSO_TF", "PBS", "NT")
CONTEXT_COLS = ("cell_type", "cell_line", "celltype", "cell_line_id")


def expand(inputs):
    """Paths, globs and folders (their .h5ad and .h5 files) -> the files, each entry's sorted."""
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


def blocks(src, chunk, desc):
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


def open_sources(hs, r):
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


def gene_plan(srcs, r):
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


def scale_plan(srcs, r, csize):
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


def select_hvg(srcs, r, gl, csize):
    """Select r.hvg genes in one streamed pass (per-gene mean and variance of expm1(x))."""
    s1 = np.zeros(len(gl)); s2 = np.zeros(len(gl)); n = 0
    for s in srcs:
        for _, x in blocks(s, csize, f"hvg {Path(s['path']).name}"):
            e = np.expm1(x.astype(np.float64))
            s1 += e.sum(0); s2 += (e * e).sum(0); n += len(x)
    mean = s1 / n
    var = (s2 / n - mean ** 2) * n / max(n - 1, 1)
    top = hvg_seurat(mean, np.maximum(var, 0), int(r.hvg))
    say(f"selected {len(top)} highly variable genes (seurat flavour) of {len(gl)}")
    for s in srcs:
        s["cols"] = s["cols"][top]
    return [gl[i] for i in top]


def local_codes(s, a, b):
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


def plan_groups(srcs, r, csize):
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
            u, n = np.unique(local_codes(s, a, b)[sel], return_counts=True)
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
