"""Hostile data (Reliability III): prepared folders that lie, bad .h5ad inputs, the raw-counts recipe.

Every case here failed (silently or with a traceback) before: a killed re-prepare mixed two folders, the
checksum ignored --batch_col, Prepared opened truncated or mismatched files, corrupt CSR / string / linked
matrices reached numpy, and log1p data recorded no target sum. Tiny synthetic files; a few seconds each."""
import json
import os
import shutil

import h5py
import numpy as np
import pytest

import state.prepare as sd
from state.data import Prepared, main
from state.errors import UserError
from state.h5ad import H5AD, H5ADError, write_h5ad
from state.prepare import prepare
from state.scale import recipe_scaling
from state.synth import make_synthetic

RERUN = r"re-run prepare \(python -m state.data prepare\)"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    make_synthetic(d / "s.h5ad", n_cells=400, n_genes=30, n_perts=4, n_contexts=2, n_batches=2, seed=1)
    return d / "s.h5ad"


@pytest.fixture(scope="module")
def prep(src, tmp_path_factory):
    return prepare(src, tmp_path_factory.mktemp("p") / "prep")


def _forked(fn, env=None):
    """Run fn in a forked child that ends with os._exit (a kill: no cleanup runs); its exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        code = 0
        try:
            os.environ.update(env or {})
            fn()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _state(d):
    return d.checksum, np.array(d.X), d.batch_names


# --- A1: prepare is one commit ----------------------------------------------------------------------

def test_killed_reprepare_leaves_the_old_folder_or_the_new_one(src, tmp_path):
    """Re-preparing into an existing folder (with --batch_col) and being killed at any step leaves the
    old complete folder or the new complete one, never X.bin of one with index.json of the other; the
    next prepare removes the killed one's staging folder."""
    out = tmp_path / "out"
    old = _state(prepare(src, out))
    new = _state(prepare(src, tmp_path / "ref", batch_col="batch"))
    assert old[2] == ["all"] and new[2] == ["b0", "b1"] and not np.array_equal(old[1], new[1])
    again = lambda: prepare(src, out, batch_col="batch")

    def die_in_sums():  # a kill after X.bin is written, before the rest (old code: X.bin already replaced)
        sd._group_sums = lambda *a, **k: os._exit(9)
        again()

    assert _forked(die_in_sums) == 9
    got = _state(Prepared(out))
    assert got[0] == old[0] and np.array_equal(got[1], old[1]), "killed re-prepare changed the folder"
    for step in ("rows", "sums", "index"):
        assert _forked(again, {"NANOSTATE_PREPARE_FAULT": step}) == 75, step
        got = _state(Prepared(out))
        assert got[0] == old[0] and np.array_equal(got[1], old[1]) and got[2] == old[2], step
    assert any(n.startswith(".out.prepare-") for n in os.listdir(tmp_path))  # what the kills left
    assert _forked(again, {"NANOSTATE_PREPARE_FAULT": "swap"}) == 75
    got = _state(Prepared(out))
    assert got[0] == new[0] and np.array_equal(got[1], new[1]) and got[2] == new[2]
    prepare(src, out)  # the next prepare cleans the leftovers and switches back
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out.")]
    got = _state(Prepared(out))
    assert got[0] == old[0] and np.array_equal(got[1], old[1]) and old[0] != new[0]

    def no_exchange():  # a file system without an atomic exchange: two renames, killed between them
        sd._exchange = lambda a, b: False
        again()

    assert _forked(no_exchange, {"NANOSTATE_PREPARE_FAULT": "swap"}) == 75
    with pytest.raises(H5ADError, match=r"out: missing: a prepare was killed while switching folders; the "
                                        r"previous folder is .*\.out\.old-\d+"):
        Prepared(out)
    prepare(src, tmp_path / "other")  # unrelated folders are left alone
    assert [n for n in os.listdir(tmp_path) if n.startswith(".out.old-")]
    prepare(src, out, dtype="float16")  # the next prepare into it puts the old folder back, then replaces it
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out.")]
    assert Prepared(out).dtype == "float16"


def test_interrupted_prepare_leaves_nothing_and_user_folders_are_never_replaced(src, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="mine: exists, is not empty and is not a prepared folder"):
        prepare(src, mine)
    assert (mine / "notes.txt").read_text() == "keep me" and len(os.listdir(mine)) == 1
    with pytest.raises(H5ADError, match="batch column 'plate' not in obs"):
        prepare(src, tmp_path / "new", batch_col="plate")
    assert os.listdir(tmp_path) == ["mine"]
    real = prepare(src, tmp_path / "real")
    os.symlink(tmp_path / "real", tmp_path / "link")
    d = prepare(src, tmp_path / "link", batch_col="batch")  # through a link: the folder it names is replaced
    assert os.path.islink(tmp_path / "link") and Prepared(tmp_path / "real").checksum == d.checksum != real.checksum
    assert sorted(os.listdir(tmp_path)) == ["link", "mine", "real"]


# --- A2: the checksum covers content and the whole recipe -------------------------------------------

def test_checksum_covers_the_recipe_and_the_content(src, prep, tmp_path):
    same = prepare(src, tmp_path / "same")
    assert same.checksum == prep.checksum  # deterministic: a re-prepare of the same recipe resumes
    batch = prepare(src, tmp_path / "batch", batch_col="batch")
    assert len(batch.group_table) > len(prep.group_table) and batch.checksum != prep.checksum
    f16 = prepare(src, tmp_path / "f16", dtype="float16")
    assert f16.checksum not in (prep.checksum, batch.checksum)
    assert set(prep.index["hashes"]) == {"X.bin", "codes.npy", "groups.npy", "sums.npy", "obs_names.npy"}
    assert prep.verify() is True
    # X.bin changed in place, same size: verify() names it (opening stays cheap and cannot see it)
    T, n = same.group_table, same.group_table[:, 4] - same.group_table[:, 3]
    g = [k for k in range(len(T)) if k not in (np.argmin(n), len(T) - 1)][0]  # a group open() does not read
    x = np.memmap(same.dir / "X.bin", np.float32, "r+", shape=same.shape)
    x[T[g, 3], 0] += 1.0
    x.flush()
    del x
    with pytest.raises(H5ADError, match=r"X.bin: its content differs .* " + RERUN):
        Prepared(same.dir).verify()
    # index.json edited (a recipe entry): its checksum no longer matches its content
    ix = json.load(open(batch.dir / "index.json"))
    ix["recipe"]["hvg"] = 7
    (batch.dir / "index.json").write_text(json.dumps(ix))
    with pytest.raises(H5ADError, match=r"index.json: its checksum .* does not match"):
        Prepared(batch.dir)


# --- A3: Prepared checks its files against each other when it opens them ---------------------------

def _broken(prep, tmp_path, name, fn):
    d = tmp_path / name
    shutil.copytree(prep.dir, d)
    fn(d)
    return d


def _index(d, **kw):
    ix = json.load(open(d / "index.json"))
    ix.update(kw)
    (d / "index.json").write_text(json.dumps(ix))


def test_prepared_refuses_files_that_disagree(prep, tmp_path, capsys):
    N, G = prep.shape
    T = prep.group_table
    cases = {
        "X.bin": lambda d: os.truncate(d / "X.bin", (N - 3) * G * 4),
        "index.json ": lambda d: _index(d, n_cells=N - 1),  # a short n_cells in index.json
        "sums.npy": lambda d: np.save(d / "sums.npy", np.zeros((len(T), G))),  # zeroed, right shape
        "codes.npy": lambda d: np.save(d / "codes.npy", np.zeros((N, 3), np.int32)),
        "codes.npy ": lambda d: np.save(d / "codes.npy", np.zeros((N - 1, 4), np.int32)),
        "obs_names.npy": lambda d: np.save(d / "obs_names.npy", np.array([b"a"] * (N + 2))),
        "groups.npy": lambda d: np.save(d / "groups.npy", np.concatenate([T[:, :4], T[:, 4:] - (T[:, 4:] == N)], 1)),
        "groups.npy ": lambda d: np.save(d / "groups.npy", T[::-1].copy()),
        "index.json": lambda d: (d / "index.json").write_text('{"format": 2, "n_cells": '),
    }
    for i, (name, fn) in enumerate(cases.items()):
        d = _broken(prep, tmp_path, f"b{i}", fn)
        with pytest.raises(H5ADError, match=f"{d / name.strip()}: .*{RERUN}"):
            Prepared(d)
        capsys.readouterr()
        assert main(["info", str(d)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"python -m state.data: {d / name.strip()}: "), err
    # old layout still refused with the command to re-run
    d = _broken(prep, tmp_path, "old", lambda d: _index(d, format=1))
    with pytest.raises(H5ADError, match="older layout.*re-run python -m state.data prepare"):
        Prepared(d)


def test_sums_from_another_prepare_are_caught_without_hashes(prep, tmp_path):
    """A folder written before content hashes (no 'hashes' in index.json) still has its sums.npy checked
    against X.bin rows of two groups."""
    def f(d):
        ix = json.load(open(d / "index.json"))
        del ix["hashes"]
        (d / "index.json").write_text(json.dumps(ix))
        S = np.load(d / "sums.npy")
        np.save(d / "sums.npy", S * 0.5)
    d = _broken(prep, tmp_path, "nohash", f)
    with pytest.raises(H5ADError, match=r"sums.npy: group .* X.bin and sums.npy are not from one prepare"):
        Prepared(d)


# --- B: hostile .h5ad inputs ---------------------------------------------------------------------------

def _csr_file(path, n=40, g=6, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.poisson(1.5, (n, g)).astype(np.float32)
    X[:, 0] += 1  # no empty rows
    ip = np.concatenate([[0], np.cumsum((X > 0).sum(1))]).astype(np.int64)
    idx = np.concatenate([np.flatnonzero(r) for r in X]).astype(np.int32)
    obs = {"perturbation": np.array((["control", "P1"] * n)[:n], object), "cell_type": np.array(["A"] * n, object)}
    write_h5ad(path, (X[X > 0], idx, ip), [f"c{i}" for i in range(n)], [f"g{j}" for j in range(g)], obs=obs)
    return path


def _edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)
    return path


def _set(f, name, values):
    attrs = dict(f[name].attrs)
    del f[name]
    d = f.create_dataset(name, data=values)
    d.attrs.update(attrs)


def test_hostile_h5ad_inputs_are_one_named_error(tmp_path, capsys):
    def strings(f):
        x = f["X"]
        X = np.zeros(tuple(int(s) for s in x.attrs["shape"]), np.float32)
        del f["X"]
        f.create_dataset("X", data=X.astype("S8")).attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})

    def link(f):
        del f["X"]
        f["X"] = h5py.ExternalLink("missing_counts.h5", "/X")

    def col(i, v):
        return lambda f: f["X/indices"].__setitem__(i, v)

    def indptr_rise(f):
        ip = f["X/indptr"][:]
        ip[20] = ip[25] + 1  # goes down after row 20
        f["X/indptr"][:] = ip

    def indptr_end(f):
        ip = f["X/indptr"][:]
        _set(f, "X/indptr", np.concatenate([ip[:-1], [ip[-1] - 2]]))

    def short_obs(f):
        c = f["obs/cell_type/codes"][:]
        _set(f, "obs/cell_type/codes", c[:-5])

    def long_var(f):
        _set(f, "var/_index", np.array([f"g{j}" for j in range(7)], dtype=object).astype(h5py.string_dtype()))

    def dup_names(f):
        names = f["obs/_index"][:]
        names[31] = names[4]
        f["obs/_index"][:] = names

    def bad_code(f):
        c = f["obs/perturbation/codes"][:]
        c[9] = 5
        f["obs/perturbation/codes"][:] = c

    cases = [
        (strings, r"'X' holds byte strings \(dtype \|S8\), not numbers"),
        (link, r"'/X' is an HDF5 external link to '/X' in 'missing_counts.h5', which cannot be opened"),
        (col(37, 6), r"'X' row \d+ has the column index 6, outside the 6 columns"),
        (col(11, -2), r"'X' row \d+ has the column index -2, outside the 6 columns"),
        (indptr_rise, r"'X/indptr' is not a CSR row pointer near row 20"),
        (indptr_end, r"'X/indptr' runs from 0 to \d+, but the matrix stores \d+ values"),
        (short_obs, r"obs column 'cell_type' has 35 values but /obs has 40 cells"),
        (long_var, r"'X' has 6 columns but var has 7 genes"),
        (dup_names, r"obs name 'c4' is used by rows 4 and 31"),
        (bad_code, r"obs column 'perturbation' has the category code 5 .* only 2 categories"),
    ]
    for i, (fn, msg) in enumerate(cases):
        p = _edit(_csr_file(tmp_path / f"in{i}.h5ad"), fn)
        out = tmp_path / f"out{i}"
        with pytest.raises(UserError, match=msg):
            prepare(p, out)
        assert not os.path.lexists(out) and not [n for n in os.listdir(tmp_path) if n.startswith(f".out{i}")]
        capsys.readouterr()
        assert main(["prepare", str(p), str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"python -m state.data: {p}: "), (msg, err)
    # the readers predict.py simulate / embed.py transform use: the same errors, every row checked
    p = _edit(_csr_file(tmp_path / "late.h5ad", n=3000), col(-1, 99))  # the very last stored value
    with H5AD(p) as h:
        m = h.matrix("X")
        m.block(0, 2000)  # rows before it read fine
        with pytest.raises(H5ADError, match="row 2999 has the column index 99"):
            list(m.chunks(512))
    # duplicate names for readers that pair cells by name (predict.py simulate): a streamed check
    p = _edit(_csr_file(tmp_path / "dups.h5ad", n=50), dup_names)
    with pytest.raises(UserError, match="obs name 'c4' is used by rows 4 and 31"):
        prepare(p, tmp_path / "dups", chunk=8)  # in different blocks of different name widths
    capsys.readouterr()
    prepare([_csr_file(tmp_path / "two1.h5ad"), _csr_file(tmp_path / "two2.h5ad", seed=1)], tmp_path / "two")
    assert "40 cell names occur in more than one input file" in capsys.readouterr().out  # a warning only
    with H5AD(p) as h:
        assert h.duplicate_obs_names(np.arange(10, 50)) is None  # rows 31 and 4: only one is asked about
        with pytest.raises(H5ADError, match="obs name 'c4' is used by rows 4 and 31"):
            h.duplicate_obs_names(block=7)
    # repeated column indices in a row add up (as scipy's toarray does), never silently overwrite
    p = _edit(_csr_file(tmp_path / "rep.h5ad"), col(1, 0))  # row 0's second value moves onto column 0
    with H5AD(p) as h, h5py.File(p) as f:
        d = f["X/data"][:]
        assert h.matrix("X").block(0, 1)[0, 0] == d[0] + d[1]


# --- C: the recipe for raw counts ------------------------------------------------------------------------

def test_recipe_records_libsize_genes_and_a_detected_target_sum(tmp_path):
    make_synthetic(tmp_path / "c.h5ad", n_cells=300, n_genes=30, n_perts=3, n_contexts=2, seed=2, counts=True)
    make_synthetic(tmp_path / "l.h5ad", n_cells=300, n_genes=30, n_perts=3, n_contexts=2, seed=2)  # log1p, 1e4
    with H5AD(tmp_path / "c.h5ad") as h:
        genes = list(h.var_names())
        C = h.matrix("X").block(0, h.n_obs)
    r = prepare(tmp_path / "c.h5ad", tmp_path / "c").index["recipe"]
    assert r["libsize_genes"] is None and r["target_sum_from"] == "median" and r["target_sum"] > 0
    r = prepare(tmp_path / "c.h5ad", tmp_path / "ch", hvg=10).index["recipe"]
    assert r["libsize_genes"] == genes and r["target_sum_from"] == "median"  # totals over all 30 genes
    r = prepare(tmp_path / "c.h5ad", tmp_path / "cg", genes=genes[::-1][:12], target_sum=1e4).index["recipe"]
    assert r["libsize_genes"] == genes and (r["target_sum"], r["target_sum_from"]) == (1e4, "given")
    d = prepare(tmp_path / "l.h5ad", tmp_path / "l")
    r = d.index["recipe"]
    assert (r["target_sum"], r["target_sum_from"], r["libsize_genes"]) == (1e4, "detected", None)
    # raw counts handed to a run on this data are normalised to it (before: "records no target sum")
    assert recipe_scaling(C[:50], r, "counts.h5ad") == 1e4
    r = prepare(tmp_path / "l.h5ad", tmp_path / "lh", hvg=8).index["recipe"]
    assert r["target_sum"] == 1e4 and r["libsize_genes"] == genes


def test_detected_target_sum_is_checked_on_every_row(tmp_path, capsys):
    """The detector samples ~10k rows; a row normalised to another total, outside what it saw or too few
    to move its CV, means no target sum is recorded (a warning names the cell)."""
    n, g = 10_600, 8
    rng = np.random.default_rng(0)
    P = rng.dirichlet(np.ones(g), n)
    P[n - 1] *= 1.05  # the last cell's total is 5% off
    X = np.log1p(P * 1e4).astype(np.float32)
    obs = {"perturbation": np.array((["control", "P1"] * n)[:n], object)}
    write_h5ad(tmp_path / "x.h5ad", X, [f"c{i}" for i in range(n)], [f"g{j}" for j in range(g)], obs=obs)
    r = prepare(tmp_path / "x.h5ad", tmp_path / "x").index["recipe"]
    assert r["target_sum"] is None and r["target_sum_from"] is None
    assert f"cell 'c{n - 1}' sums to" in capsys.readouterr().out
