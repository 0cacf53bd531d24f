"""
Reading and writing `.h5ad` (AnnData on HDF5) with plain h5py: no anndata dependency.

What is read: CSR or dense `X`, `layers/<k>`, `raw/X`, `obsm/<k>`; `obs`/`var` columns stored as
categoricals (codes + categories, code -1 = missing), string arrays or numeric arrays; the obs/var
index. Rows are read in blocks, so nothing is ever densified whole.

What is written: a file that anndata >= 0.8 and scanpy read (encoding-type / encoding-version
attributes as in the anndata on-disk format), with a dense or CSR `X`, string obs columns as
categoricals, `var` with its index, `obsm` arrays and a nested `uns` dict.
"""

import os
import sys

import h5py
import numpy as np

from state.errors import UserError


class H5ADError(UserError):
    """Bad or unsupported input file; the message names the file, column or label at fault."""


def _decode(a):
    a = np.asarray(a)
    if a.dtype.kind in "SO":
        return np.array([x.decode() if isinstance(x, bytes) else str(x) for x in a], dtype=object)
    return a


class Matrix:
    """A cells x features matrix inside an open file (CSR group or dense dataset)."""

    def __init__(self, f, key, path):
        if key not in f:
            raise H5ADError(f"{path}: no matrix '{key}' in the file")
        node = f[key]
        self.key, self.path = key, path
        enc = node.attrs.get("encoding-type", "array" if isinstance(node, h5py.Dataset) else None)
        enc = enc.decode() if isinstance(enc, bytes) else enc
        if isinstance(node, h5py.Dataset):
            self.sparse = False
            self.d = node
            self.shape = tuple(node.shape)
            if len(self.shape) != 2:
                raise H5ADError(f"{path}: '{key}' is not a 2-d matrix (shape {self.shape})")
        elif enc == "csr_matrix":
            self.sparse = True
            self.shape = tuple(int(s) for s in node.attrs["shape"])
            self.data, self.indices = node["data"], node["indices"]
            self.indptr = node["indptr"]  # read per block (ptr(a, b)): never n_obs + 1 ints in memory
        elif enc == "csc_matrix":
            raise H5ADError(f"{path}: '{key}' is stored as CSC; re-save it as CSR "
                            "(adata.X = scipy.sparse.csr_matrix(adata.X)) so rows can be streamed")
        else:
            raise H5ADError(f"{path}: '{key}' has unsupported encoding '{enc}'")

    def block(self, start, stop):
        """Dense float32 rows [start, stop)."""
        if not self.sparse:
            return np.asarray(self.d[start:stop], dtype=np.float32)
        ip = self.ptr(start, stop)
        p0, p1 = ip[0], ip[-1]
        data = np.asarray(self.data[p0:p1], dtype=np.float32)
        idx = np.asarray(self.indices[p0:p1], dtype=np.int64)
        out = np.zeros((stop - start, self.shape[1]), np.float32)
        row = np.repeat(np.arange(stop - start), np.diff(ip))
        out[row, idx] = data  # one vectorised scatter per block
        return out

    def ptr(self, start, stop):
        """indptr[start:stop + 1] as int64 (CSR only)."""
        return np.asarray(self.indptr[start:stop + 1], np.int64)

    def rows(self, idx):
        """Dense float32 rows at arbitrary (any order) indices; reads each contiguous run once."""
        idx = np.asarray(idx, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        s = idx[order]
        out = np.empty((len(idx), self.shape[1]), np.float32)
        if len(s) == 0:
            return out
        # split sorted indices into runs of consecutive rows and read each run as a block
        brk = np.flatnonzero(np.diff(s) > 1) + 1
        for run in np.split(np.arange(len(s)), brk):
            a, b = s[run[0]], s[run[-1]] + 1
            blk = self.block(a, b)
            out[order[run]] = blk[s[run] - a]
        return out

    def chunks(self, chunk=8192):
        for a in range(0, self.shape[0], chunk):
            b = min(a + chunk, self.shape[0])
            yield a, b, self.block(a, b)


class H5AD:
    """A read-only handle on an `.h5ad` file. Use as a context manager or call `close()`."""

    def __init__(self, path):
        self.path = str(path)
        if not os.path.exists(self.path):
            raise H5ADError(f"{self.path}: no such file")
        try:
            self.f = h5py.File(self.path, "r")
        except OSError as e:
            raise H5ADError(f"{self.path}: not an HDF5 file, so not an .h5ad ({e})") from None
        enc = self.f.attrs.get("encoding-type")
        enc = enc.decode() if isinstance(enc, bytes) else enc
        if "obs" not in self.f or "var" not in self.f:
            self.f.close()
            raise H5ADError(f"{self.path}: not an AnnData file (no /obs and /var groups)")
        if enc is None:
            self.f.close()
            raise H5ADError(f"{self.path}: no 'encoding-type' attribute: written by a very old "
                            "anndata; re-save with anndata >= 0.8")
        if enc != "anndata":
            self.f.close()
            raise H5ADError(f"{self.path}: encoding-type '{enc}' is not 'anndata'")
        self._labels = {}  # (column, df) -> (categories, code reader, used): see labels()
        self.n_obs = self._index_node("obs").shape[0]  # the length only: no string per cell
        self.n_vars = self._index_node("var").shape[0]

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def close(self):
        self.f.close()

    # --- dataframes -----------------------------------------------------------------------------
    def _index_node(self, df):
        g = self.f[df]
        key = g.attrs.get("_index", "_index")
        return g[key.decode() if isinstance(key, bytes) else key]

    def _index(self, df):
        return _decode(self._index_node(df)[:])

    def obs_names_at(self, a, b):
        """Obs names of rows [a, b) (str array): the index read in one slice."""
        return _decode(self._index_node("obs")[a:b]).astype(str)

    def labels(self, name, df="obs", block=1 << 20):
        """One column as (categories (K,) str array, codes(a, b) -> int64 codes of rows [a, b)), never a
        string per cell: a categorical reads its codes; a plain string or numeric column is coded against
        its sorted unique values, found block by block. Missing values (code -1, None) are an error
        naming a cell. Read once per file and column (cached, with `used`: which categories have cells)."""
        if (name, df) in self._labels:
            return self._labels[(name, df)][:2]
        g = self.f[df]
        if name not in g:
            raise H5ADError(f"{self.path}: no {df} column '{name}'; available: {', '.join(self.columns(df))}")
        node = g[name]
        n = self.n_obs if df == "obs" else self.n_vars
        if isinstance(node, h5py.Group):  # categorical
            cats = _decode(node["categories"][:]).astype(str)
            read = lambda a, b: node["codes"][a:b].astype(np.int64)
        else:
            u = set()
            for a in range(0, n, block):
                u |= set(_decode(node[a:a + block]).tolist())
            vals = sorted(x for x in u if x is not None and x == x)  # None / NaN are missing
            cats = np.array([str(x) for x in vals])
            lut = {x: i for i, x in enumerate(vals)}
            read = lambda a, b: np.array([lut.get(x, -1) for x in _decode(node[a:b]).tolist()], np.int64)
        used = np.zeros(len(cats), bool)
        for a in range(0, n, block):  # missing values: name the first cell that has one
            c = read(a, min(a + block, n))
            if (c < 0).any():
                i = a + int(np.argmax(c < 0))
                raise H5ADError(f"{self.path}: {df} column '{name}' has {int((c < 0).sum())}+ missing values "
                                f"(e.g. cell '{self.obs_names_at(i, i + 1)[0]}'); fill or drop them")
            used[c] = True
        self._labels[(name, df)] = (cats, read, used)
        return cats, read

    def used(self, name, df="obs"):
        """Bool per category of labels(name): which have cells (a categorical may list unused ones)."""
        self.labels(name, df)
        return self._labels[(name, df)][2]

    def columns(self, df="obs"):
        g = self.f[df]
        idx = g.attrs.get("_index", "_index")
        return [k for k in g.keys() if k != idx and k != "__categories"]

    def column(self, name, df="obs"):
        """One obs/var column as a numpy array (strings as object, missing categories as None)."""
        g = self.f[df]
        if name not in g:
            raise H5ADError(f"{self.path}: no {df} column '{name}'; "
                            f"available: {', '.join(self.columns(df))}")
        node = g[name]
        if isinstance(node, h5py.Group):  # categorical
            cats = _decode(node["categories"][:])
            codes = node["codes"][:].astype(np.int64)
            out = np.empty(len(codes), dtype=object if cats.dtype.kind == "O" else cats.dtype)
            ok = codes >= 0
            out[ok] = cats[codes[ok]]
            if not ok.all():
                out = out.astype(object)
                out[~ok] = None
            return out
        return _decode(node[:])

    @property
    def obs_names(self):
        return self._index("obs")

    def var_names(self, col=None):
        return self._index("var") if col is None else self.column(col, "var").astype(str)

    def matrix(self, key="X"):
        """`X`, `raw/X`, `layers/<k>` (or just `<k>` if it names a layer), `obsm/<k>`."""
        if key not in ("X", "raw/X") and not key.startswith(("layers/", "obsm/")):
            if "layers" in self.f and key in self.f["layers"]:
                key = f"layers/{key}"
            elif "obsm" in self.f and key in self.f["obsm"]:
                key = f"obsm/{key}"
        return Matrix(self.f, key, self.path)

    def uns(self, key, default=None):
        return read_uns(self.f["uns"][key]) if "uns" in self.f and key in self.f["uns"] else default


def read_uns(node):
    if isinstance(node, h5py.Group):
        return {k: read_uns(v) for k, v in node.items()}
    v = node[()]
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray) and v.dtype.kind in "SO":
        return _decode(v).tolist()
    return v.tolist() if isinstance(v, np.ndarray) else v.item() if hasattr(v, "item") else v


# --- writing ------------------------------------------------------------------------------------
_STR = h5py.string_dtype("utf-8")


def _attrs(node, enc, ver):
    node.attrs["encoding-type"] = enc
    node.attrs["encoding-version"] = ver


def _write_strings(g, name, values):
    d = g.create_dataset(name, data=np.asarray([str(v) for v in values], dtype=object), dtype=_STR)
    _attrs(d, "string-array", "0.2.0")
    return d


class Cat:
    """A categorical column given as codes (n,) into categories: written without a string per row."""

    def __init__(self, codes, categories):
        self.codes, self.categories = np.asarray(codes, np.int32), [str(c) for c in categories]

    def __len__(self):
        return len(self.codes)


class Stream:
    """Rows produced block by block, so a file of any size is written in bounded memory: `n` rows,
    `cols` {"X": width, "obsm/<key>": width} (float32) and "obs_names" (strings); `blocks` an iterable of
    dicts with one (m, width) array per matrix key and "obs_names" (m,), in row order. `progress`: a
    tqdm description (None: no bar)."""

    def __init__(self, n, cols, blocks, progress=None):
        self.n, self.cols, self.blocks, self.progress = int(n), dict(cols), blocks, progress


def _write_column(g, name, values):
    if isinstance(values, Cat):
        c = g.create_group(name)
        _attrs(c, "categorical", "0.2.0")
        c.attrs["ordered"] = False
        _write_strings(c, "categories", values.categories)
        _attrs(c.create_dataset("codes", data=values.codes), "array", "0.2.0")
        return
    values = np.asarray(values)
    if values.dtype.kind in "OUS":
        # strings -> categorical (what anndata writes for obs labels); None -> code -1
        vals = np.array([None if v is None else str(v) for v in values], dtype=object)
        ok = np.array([v is not None for v in vals])
        cats = sorted(set(vals[ok].tolist()))
        lut = {c: i for i, c in enumerate(cats)}
        codes = np.full(len(vals), -1, np.int32)
        codes[ok] = [lut[v] for v in vals[ok]]
        c = g.create_group(name)
        _attrs(c, "categorical", "0.2.0")
        c.attrs["ordered"] = False
        _write_strings(c, "categories", cats)
        _attrs(c.create_dataset("codes", data=codes), "array", "0.2.0")
    else:
        _attrs(g.create_dataset(name, data=values), "array", "0.2.0")


def _write_df(f, name, index, columns, index_name="_index"):
    g = f.create_group(name)
    _attrs(g, "dataframe", "0.2.0")
    g.attrs["_index"] = index_name
    g.attrs.create("column-order", np.array(list(columns), dtype=object), dtype=_STR)
    if isinstance(index, int):  # filled later, block by block (Stream)
        _attrs(g.create_dataset(index_name, (index,), dtype=_STR), "string-array", "0.2.0")
    else:
        _write_strings(g, index_name, index)
    for k, v in columns.items():
        _write_column(g, k, v)


def _write_uns(g, d):
    for k, v in d.items():
        if isinstance(v, dict):
            s = g.create_group(k)
            _attrs(s, "dict", "0.1.0")
            _write_uns(s, v)
        elif isinstance(v, str):
            ds = g.create_dataset(k, data=v, dtype=_STR)
            _attrs(ds, "string", "0.2.0")
        elif isinstance(v, (list, tuple, np.ndarray)) and len(v) and isinstance(np.asarray(v).flat[0], str):
            _write_strings(g, k, v)
        elif isinstance(v, (list, tuple, np.ndarray)):
            _attrs(g.create_dataset(k, data=np.asarray(v)), "array", "0.2.0")
        elif isinstance(v, (bool, np.bool_, int, float, np.integer, np.floating)):
            _attrs(g.create_dataset(k, data=v), "numeric-scalar", "0.2.0")
        elif v is None:
            continue
        else:
            raise TypeError(f"uns['{k}']: cannot write {type(v).__name__}")


def write_h5ad(path, X, obs_names, var_names, obs=None, var=None, obsm=None, uns=None,
               layers=None):
    """Write an AnnData-compatible file. X: dense (n, g) array, a (data, indices, indptr) CSR triple, or a
    Stream (then obs_names may be None: the stream's "obs_names" blocks; its "obsm/<k>" matrices join
    obsm)."""
    obs, var, obsm, uns, layers = obs or {}, var or {}, obsm or {}, uns or {}, layers or {}
    stream = X if isinstance(X, Stream) else None
    n, g = (stream.n if stream else len(obs_names)), len(var_names)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            _write_file(f, n, g, X, stream, obs_names, var_names, obs, var, obsm, uns, layers)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)  # atomic: a crashed write never leaves a half file at `path`


def _write_file(f, n, g, X, stream, obs_names, var_names, obs, var, obsm, uns, layers):
    _attrs(f, "anndata", "0.1.0")
    if stream is not None:
        if stream.cols.get("X") != g:
            raise ValueError(f"stream X width {stream.cols.get('X')} != {g} genes")
        X = None
    for name, M in ([("X", X)] if X is not None else []) + [(f"layers/{k}", v) for k, v in layers.items()]:
        if isinstance(M, tuple):
            data, indices, indptr = M
            m = f.create_group(name)
            _attrs(m, "csr_matrix", "0.1.0")
            m.attrs["shape"] = np.array([n, g], dtype=np.int64)
            m.create_dataset("data", data=np.asarray(data, np.float32))
            m.create_dataset("indices", data=np.asarray(indices, np.int32))
            m.create_dataset("indptr", data=np.asarray(indptr, np.int64))
        else:
            M = np.asarray(M)
            if M.shape != (n, g):
                raise ValueError(f"{name} shape {M.shape} != ({n}, {g})")
            _attrs(f.create_dataset(name, data=M), "array", "0.2.0")
    if "layers" not in f:
        _attrs(f.create_group("layers"), "dict", "0.1.0")
    else:
        _attrs(f["layers"], "dict", "0.1.0")
    for k, v in obs.items():
        if len(v) != n:
            raise ValueError(f"obs column '{k}' has {len(v)} values for {n} cells")
    _write_df(f, "obs", n if stream is not None and obs_names is None else obs_names, obs)
    _write_df(f, "var", var_names, var)
    m = f.create_group("obsm")
    _attrs(m, "dict", "0.1.0")
    for k, v in obsm.items():
        _attrs(m.create_dataset(k, data=np.asarray(v)), "array", "0.2.0")
    for k in ("varm", "obsp", "varp"):
        _attrs(f.create_group(k), "dict", "0.1.0")
    u = f.create_group("uns")
    _attrs(u, "dict", "0.1.0")
    _write_uns(u, uns)
    if stream is not None:
        _fill(f, stream, obs_names is None)


def _fill(f, s, names):
    """Create the stream's matrices and fill them, and the obs index when `names`, block by block."""
    from tqdm import tqdm
    ds = {}
    for k, w in s.cols.items():
        if k == "obs_names":
            continue
        chunk = (max(1, min(s.n, (1 << 20) // max(4 * w, 1))), w)  # ~1 MB chunks of whole rows
        ds[k] = f.create_dataset(k, (s.n, w), np.float32, chunks=chunk if s.n else None)
        _attrs(ds[k], "array", "0.2.0")
    idx = f["obs"][f["obs"].attrs["_index"]] if names else None
    a = 0
    bar = tqdm(total=s.n, desc=s.progress, unit="cell", file=sys.stderr, leave=False,
               disable=s.progress is None or not sys.stderr.isatty() and os.environ.get("TQDM", "") != "1")
    for blk in s.blocks:
        m = len(next(iter(blk.values())))
        for k, d in ds.items():
            d[a:a + m] = np.asarray(blk[k], np.float32)
        if names:
            idx[a:a + m] = np.asarray([str(v) for v in blk["obs_names"]], dtype=object)
        a += m
        bar.update(m)
    bar.close()
    if a != s.n:
        raise ValueError(f"stream gave {a} rows, expected {s.n}")
