"""
prepare: .h5ad files in, one prepared folder out (the layout state/data.py reads and documents). Streamed
with memory bounded in the number of cells: the inputs are read, detected and checked and their rows
counted per (context, perturbation, batch) group in first passes (state/inputs.py); here the rows are
written to their sorted place in a second (a counting sort, positioned writes), every one checked against
the scale found, then the group sums and index.json.

A prepare is one commit: it writes into .OUT_DIR.prepare-PID next to OUT_DIR and switches it in at the end
(an atomic exchange where the system has one), so a kill leaves the old folder or the new one, and the
next prepare removes what a killed one left. The command is `python -m state.data prepare` (state/data.py).
"""

import errno
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from state.data import DTYPES, FORMAT, Prepared, _checksum, _sha, from_storage, to_storage
from state.errors import UserError
from state.h5ad import H5AD, H5ADError
from state.inputs import (Recipe, blocks, expand, gene_plan, local_codes, open_sources,
                          plan_groups, scale_plan, select_hvg)
from state.scale import say



def md5(path, blk=1 << 23):
    h = hashlib.md5()
    with open(path, "rb") as f:
        while b := f.read(blk):
            h.update(b)
    return h.hexdigest()


# -----------------------------------------------------------------------------
# the commit: a staging folder next to OUT_DIR, switched in whole

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
    paths = expand(inputs)
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


# -----------------------------------------------------------------------------
# the writer: the second pass, the group sums, index.json

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
            for rows, x in blocks(s, csize, f"write {Path(s['path']).name}"):
                a, b = int(rows[0]), int(rows[-1]) + 1
                g = s["lg"][np.searchsorted(s["lk"], local_codes(s, a, b)[rows - a])]
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
    srcs = open_sources(hs, r)
    gl = gene_plan(srcs, r)
    ts_given = r.target_sum
    csize = r.chunk or int(max(256, min(8192, 2 ** 26 // (4 * max(max(s["m"].shape[1] for s in srcs), 1)))))
    emb, logged = scale_plan(srcs, r, csize)
    if r.hvg:
        if emb or not logged:
            raise UserError("--hvg needs log1p expression data (not an embedding or raw counts); drop --hvg or "
                            "let prepare normalise the counts (--normalize auto)")
        gl = select_hvg(srcs, r, gl, csize)
    table, pert_names, context_names, batch_names, width = plan_groups(srcs, r, csize)
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
