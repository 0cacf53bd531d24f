"""
Reading and writing `.h5ad` (AnnData on HDF5) with plain h5py: no anndata dependency.

What is read: CSR or dense `X`, `layers/<k>`, `raw/X`, `obsm/<k>`; `obs`/`var` columns stored as
categoricals (codes + categories, code -1 = missing), string arrays or numeric arrays; the obs/var
index. Rows are read in blocks, so nothing is ever densified whole.

What is written: a file that anndata >= 0.8 and scanpy read (encoding-type / encoding-version
attributes as in the anndata on-disk format), with a dense or CSR `X`, string obs columns as
categoricals, `var` with its index, `obsm` arrays and a nested `uns` dict; `write_cells` writes the
pred/real files the evaluator compares.
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


NUMERIC = "fiub"  # float, signed and unsigned integer, bool


def _numeric(path, what, dt, fix):
    """Refuse a stored dtype that is not a number (strings, objects, compounds): one line naming it."""
    if dt.kind not in NUMERIC:
        kind = {"S": "byte strings", "O": "strings (variable length)", "U": "strings", "V": "compound records"}
        raise H5ADError(f"{path}: {what} holds {kind.get(dt.kind, 'non-numbers')} (dtype {dt}), not numbers; {fix}")


def _get(g, name, path):
    """g[name], or an H5ADError naming a link that leads nowhere (an external link to a missing file, a
    dangling soft link) instead of h5py's KeyError."""
    try:
        node = g.get(name)
    except (KeyError, OSError, RuntimeError) as e:
        node, why = None, str(e)
    else:
        why = "it leads nowhere"
    if node is None:
        raise H5ADError(f"{path}: {_link_text(g, name)} cannot be opened ({why}); "
                        "copy the linked data into the file or restore the file it points to")
    return node


def _link_text(g, name):
    full = f"{g.name.rstrip('/')}/{name}"
    try:
        ln = g.get(name, getlink=True)
    except (KeyError, OSError, RuntimeError):
        ln = None
    if isinstance(ln, h5py.ExternalLink):
        return f"'{full}' is an HDF5 external link to '{ln.path}' in '{ln.filename}', which"
    if isinstance(ln, h5py.SoftLink):
        return f"'{full}' is an HDF5 soft link to '{ln.path}', which"
    return f"'{full}'"


def _check_links(f, path):
    """Every external or soft link in the file must lead somewhere (walks link names only: cheap)."""
    links = []

    def visit(name, ln):
        if isinstance(ln, (h5py.ExternalLink, h5py.SoftLink)):
            links.append(name)

    if hasattr(f, "visititems_links"):
        f.visititems_links(visit)
    else:  # h5py < 3.11: the top level only
        for name in list(f.keys()):
            visit(name, f.get(name, getlink=True))
    bad = []
    for name in links:
        try:
            ok = f.get(name) is not None
        except (KeyError, OSError, RuntimeError):
            ok = False
        if not ok:
            bad.append(name)
            break
    if bad:
        head, _, tail = bad[0].rpartition("/")
        raise H5ADError(f"{path}: {_link_text(f[head] if head else f, tail)} cannot be opened; copy the "
                        "linked data into the file (or restore the file it points to)")


class Matrix:
    """A cells x features matrix inside an open file (CSR group or dense dataset). Its structure is checked
    when it is opened (dtype, CSR lengths and end points) and every block as it is read (CSR column
    indices in range, indptr non-decreasing), so a corrupt file is one H5ADError, never a wrong matrix."""

    def __init__(self, f, key, path):
        if key not in f:
            raise H5ADError(f"{path}: no matrix '{key}' in the file")
        node = _get(f, key, path)
        self.key, self.path = key, path
        enc = node.attrs.get("encoding-type", "array" if isinstance(node, h5py.Dataset) else None)
        enc = enc.decode() if isinstance(enc, bytes) else enc
        resave = "store numbers (e.g. adata.X = adata.X.astype('float32')) and re-save the file"
        if isinstance(node, h5py.Dataset):
            self.sparse = False
            self.d = node
            self.shape = tuple(node.shape)
            if len(self.shape) != 2:
                raise H5ADError(f"{path}: '{key}' is not a 2-d matrix (shape {self.shape})")
            _numeric(path, f"'{key}'", node.dtype, resave)
        elif enc == "csr_matrix":
            self.sparse = True
            miss = [k for k in ("data", "indices", "indptr") if k not in node]
            if miss or "shape" not in node.attrs:
                raise H5ADError(f"{path}: '{key}' is a CSR matrix without its {', '.join(miss or ['shape attribute'])}; "
                                "re-save the file with anndata")
            self.shape = tuple(int(s) for s in np.asarray(node.attrs["shape"]).ravel())
            if len(self.shape) != 2:
                raise H5ADError(f"{path}: '{key}' has the CSR shape {self.shape}, not 2-d; re-save the file with anndata")
            self.data, self.indices = _get(node, "data", path), _get(node, "indices", path)
            self.indptr = _get(node, "indptr", path)  # read per block (ptr(a, b)): never n_obs + 1 ints in memory
            _numeric(path, f"'{key}/data'", self.data.dtype, resave)
            for k, d in (("indices", self.indices), ("indptr", self.indptr)):
                if d.dtype.kind not in "iu" or d.ndim != 1:
                    raise H5ADError(f"{path}: '{key}/{k}' is {d.dtype} of shape {d.shape}, not a 1-d integer array: "
                                    "not a CSR matrix; re-save the file with anndata")
            self.nnz = len(self.data)
            fix = "the CSR matrix is corrupt; re-save it (adata.X = scipy.sparse.csr_matrix(adata.X))"
            if len(self.indices) != self.nnz:
                raise H5ADError(f"{path}: '{key}' has {self.nnz} values but {len(self.indices)} column indices; {fix}")
            if len(self.indptr) != self.shape[0] + 1:
                raise H5ADError(f"{path}: '{key}/indptr' has {len(self.indptr)} entries for {self.shape[0]} rows "
                                f"(needs {self.shape[0] + 1}); {fix}")
            first, last = int(self.indptr[0]), int(self.indptr[-1])
            if first != 0 or last != self.nnz:
                raise H5ADError(f"{path}: '{key}/indptr' runs from {first} to {last}, but the matrix stores "
                                f"{self.nnz} values (it must run from 0 to {self.nnz}); {fix}")
        elif enc == "csc_matrix":
            raise H5ADError(f"{path}: '{key}' is stored as CSC; re-save it as CSR "
                            "(adata.X = scipy.sparse.csr_matrix(adata.X)) so rows can be streamed")
        else:
            raise H5ADError(f"{path}: '{key}' has unsupported encoding '{enc}'")

    def block(self, start, stop):
        """Dense float32 rows [start, stop). A CSR block's column indices are checked (every row read):
        one outside [0, n_cols) is an H5ADError naming the row; repeated indices in a row add up, as scipy's."""
        if not self.sparse:
            return np.asarray(self.d[start:stop], dtype=np.float32)
        ip = self.ptr(start, stop)
        p0, p1 = ip[0], ip[-1]
        data = np.asarray(self.data[p0:p1], dtype=np.float32)
        idx = np.asarray(self.indices[p0:p1], dtype=np.int64)
        out = np.zeros((stop - start, self.shape[1]), np.float32)
        if not len(idx):
            return out
        bad = (idx < 0) | (idx >= self.shape[1])
        if bad.any():
            j = int(np.argmax(bad))
            r = start + int(np.searchsorted(ip, p0 + j, "right")) - 1
            raise H5ADError(f"{self.path}: '{self.key}' row {r} has the column index {idx[j]}, outside the "
                            f"{self.shape[1]} columns [0, {self.shape[1]}): the CSR matrix is corrupt (or its shape "
                            "attribute is wrong); re-save it with anndata/scipy")
        row = np.repeat(np.arange(stop - start), np.diff(ip))
        d = np.diff(idx)
        if (d <= 0).any() and (d[row[1:] == row[:-1]] <= 0).any():  # unsorted or repeated within a row
            np.add.at(out, (row, idx), data)
        else:
            out[row, idx] = data  # one vectorised scatter per block
        return out

    def ptr(self, start, stop):
        """indptr[start:stop + 1] as int64 (CSR only), checked: non-decreasing and inside the stored values."""
        ip = np.asarray(self.indptr[start:stop + 1], np.int64)
        if len(ip) and ((ip[0] < 0) | (ip[-1] > self.nnz) or (np.diff(ip) < 0).any()):
            k = int(np.argmax(np.diff(ip) < 0)) if (np.diff(ip) < 0).any() else 0
            raise H5ADError(f"{self.path}: '{self.key}/indptr' is not a CSR row pointer near row {start + k} "
                            f"(values {ip[k]}, {ip[min(k + 1, len(ip) - 1)]}: it must rise from 0 to {self.nnz}); "
                            "the CSR matrix is corrupt; re-save it with anndata/scipy")
        return ip

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
        try:
            _check_links(self.f, self.path)
            self.n_obs = self._index_node("obs").shape[0]  # the length only: no string per cell
            self.n_vars = self._index_node("var").shape[0]
        except BaseException:
            self.f.close()
            raise

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
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in g or not isinstance(_get(g, key, self.path), h5py.Dataset) or g[key].ndim != 1:
            raise H5ADError(f"{self.path}: /{df} has no index of names ('{key}', named by its _index attribute); "
                            "re-save the file with anndata")
        return g[key]

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
        node = self._col_node(name, df)
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
                                f"(e.g. cell '{self._name_at(df, i)}'); fill or drop them")
            if (c >= len(cats)).any():
                i = a + int(np.argmax(c >= len(cats)))
                raise H5ADError(f"{self.path}: {df} column '{name}' has the category code {int(c.max())} at "
                                f"'{self._name_at(df, i)}' but only {len(cats)} categories: the column is corrupt; "
                                "re-save the file with anndata")
            used[c] = True
        self._labels[(name, df)] = (cats, read, used)
        return cats, read

    def used(self, name, df="obs"):
        """Bool per category of labels(name): which have cells (a categorical may list unused ones)."""
        self.labels(name, df)
        return self._labels[(name, df)][2]

    def _name_at(self, df, i):
        return _decode(self._index_node(df)[i:i + 1]).astype(str)[0]

    def _col_node(self, name, df):
        """The node of one obs/var column, checked: one value per row of the dataframe (a categorical's
        codes and categories present), else an H5ADError naming the column and both lengths."""
        node = _get(self.f[df], name, self.path)
        n = self.n_obs if df == "obs" else self.n_vars
        what = "cells" if df == "obs" else "genes"
        if isinstance(node, h5py.Group):
            miss = [k for k in ("codes", "categories") if k not in node]
            if miss:
                raise H5ADError(f"{self.path}: {df} column '{name}' is a group without '{miss[0]}' (not a "
                                "categorical); re-save the file with anndata")
            node["codes"], node["categories"]  # links inside it must open
            length = _get(node, "codes", self.path).shape
        else:
            length = node.shape
        if len(length) != 1 or length[0] != n:
            raise H5ADError(f"{self.path}: {df} column '{name}' has {length[0] if length else 1} values "
                            f"{'of shape ' + str(length) + ' ' if len(length) > 1 else ''}but /{df} has {n} {what} "
                            f"(its index): obs/var lengths disagree; re-save the file with anndata")
        return node

    def duplicate_obs_names(self, rows=None, block=1 << 18):
        """Check that the obs names of `rows` (bool mask or sorted indices; None: all) are unique, streaming
        block by block (a 64-bit hash per name, then the candidates compared as strings). Raises an H5ADError
        naming two rows that share a name; returns None."""
        n = self.n_obs
        mask = None
        if rows is not None:
            rows = np.asarray(rows)
            mask = rows if rows.dtype == bool else np.isin(np.arange(n), rows)
        hs, at = [], []
        for a in range(0, n, block):
            b = min(a + block, n)
            names = self.obs_names_at(a, b)
            sel = np.ones(b - a, bool) if mask is None else mask[a:b]
            if not sel.any():
                continue
            hs.append(_hash_strings(names[sel]))
            at.append(np.flatnonzero(sel) + a)
        if not hs:
            return None
        h, at = np.concatenate(hs), np.concatenate(at)
        o = np.argsort(h, kind="stable")
        same = np.flatnonzero(h[o][1:] == h[o][:-1])
        for k in same[:1000]:
            i, j = sorted((int(at[o[k]]), int(at[o[k + 1]])))
            a, b = self.obs_names_at(i, i + 1)[0], self.obs_names_at(j, j + 1)[0]
            if a == b:
                raise H5ADError(f"{self.path}: obs name '{a}' is used by rows {i} and {j} (and maybe more): "
                                "cells must have unique names (a control cell is referred to by its name); "
                                "make them unique (adata.obs_names_make_unique()) and re-save")
        return None

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
        node = self._col_node(name, df)
        if isinstance(node, h5py.Group):  # categorical
            cats = _decode(node["categories"][:])
            codes = node["codes"][:].astype(np.int64)
            if (codes >= len(cats)).any():
                raise H5ADError(f"{self.path}: {df} column '{name}' has the category code {int(codes.max())} but "
                                f"only {len(cats)} categories: the column is corrupt; re-save the file with anndata")
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
        m = Matrix(self.f, key, self.path)
        if m.shape[0] != self.n_obs:
            raise H5ADError(f"{self.path}: '{key}' has {m.shape[0]} rows but obs has {self.n_obs} cells: "
                            "obs and the matrix disagree; re-save the file with anndata")
        if key == "X" or key.startswith("layers/"):
            if m.shape[1] != self.n_vars:
                raise H5ADError(f"{self.path}: '{key}' has {m.shape[1]} columns but var has {self.n_vars} genes: "
                                "var and the matrix disagree; re-save the file with anndata")
        elif key == "raw/X" and "raw/var" in self.f:
            g = self.f["raw/var"]
            ik = g.attrs.get("_index", "_index")
            ik = ik.decode() if isinstance(ik, bytes) else str(ik)
            nv = _get(g, ik, self.path).shape[0] if ik in g else None
            if nv is not None and nv != m.shape[1]:
                raise H5ADError(f"{self.path}: 'raw/X' has {m.shape[1]} columns but raw/var has {nv} genes; "
                                "re-save the file with anndata")
        return m

    def uns(self, key, default=None):
        return read_uns(_get(self.f["uns"], key, self.path)) if "uns" in self.f and key in self.f["uns"] else default


def _hash_strings(names):
    """A 64-bit hash per string (vectorised over the utf-8 bytes; equal strings, equal hashes)."""
    b = np.char.encode(np.asarray(names, dtype=str), "utf-8")
    w = max(b.dtype.itemsize, 1)
    u = np.frombuffer(b.tobytes(), np.uint8).reshape(len(b), w) if len(b) else np.zeros((0, w), np.uint8)
    h = np.full(len(b), 0xCBF29CE484222325, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(w):  # FNV-1a over the bytes of each name (the zero padding of shorter names skipped,
            c = u[:, j].astype(np.uint64)  # so a hash does not depend on the block's widest name)
            h = np.where(c != 0, (h ^ c) * np.uint64(0x100000001B3), h)
    return h


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
        os.replace(tmp, path)  # atomic: a crashed write never leaves a half file at `path`
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_cells(path, X, genes, obs, labels, source, obs_names=None, **info):
    """A pred or real file of the evaluator's contract (predict.py test and simulate, the baselines):
    cells x `genes` (X: an array, or a Stream whose "obs_names" blocks name the cells), the obs columns
    (the perturbation and context labels, is_predicted, ctrl_cell_barcode) and uns['nanostate']: the
    label columns and the control label (`labels`: (pert_col, control, context_col); state.eval reads them
    from there), where the cells come from (`source`) and how they were predicted (`info`)."""
    pert_col, control, context_col = labels
    write_h5ad(path, X, obs_names, list(genes), obs=obs, uns={"nanostate": {
        "pert_col": pert_col, "control": control, "context_col": context_col, "source": source, **info}})


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
