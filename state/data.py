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

# The data layer, one module per job: state/scale.py (what a matrix holds), state/inputs.py (reads and
# checks a prepare's input files), state/prepare.py (writes a prepared folder), this file (reads one: the contract train.py, predict.py and the splits open, and the
# `python -m state.data` command), state/sampler.py (cell sets and steps drawn from it).

import glob
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from state.config import dashes
from state.errors import Parser, UserError
from state.h5ad import H5ADError

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}  # bf16 stored as raw bits
FORMAT = 2  # 1: obs names and groups inside index.json


def _sha(path, blk=1 << 23):
    """Content hash of a file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(blk):
            h.update(b)
    return h.hexdigest()[:32]


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
            # the writer imports this module (the format it writes); only this command calls the writer
            from state.prepare import prepare
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
