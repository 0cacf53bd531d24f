"""Data layer: scale detection, prepare (real + synthetic files), HVG, bad-input errors, SetSampler."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from state.data import Prepared, main
from state.h5ad import H5AD, H5ADError, write_h5ad
from state.prepare import prepare
from state.sampler import SetSampler
from state.scale import detect_scale, hvg_seurat
from state.synth import make_synthetic


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    truth = make_synthetic(d / "s.h5ad", n_cells=1500, n_genes=60, n_perts=6, n_contexts=3, n_batches=2, seed=0)
    data = prepare(d / "s.h5ad", d / "prep", batch_col="batch")
    return d, data, truth


def small(path, X, pert, ctx=None, genes=None, **obs):
    X = np.asarray(X, np.float32)
    o = {"perturbation": np.asarray(pert, object)}
    if ctx is not None:
        o["cell_type"] = np.asarray(ctx, object)
    o.update(obs)
    write_h5ad(path, X, [f"c{i}" for i in range(len(X))], genes or [f"g{j}" for j in range(X.shape[1])], obs=o)
    return path


def labels(n, k=2):
    return np.array((["control"] + [f"P{i}" for i in range(k)]) * (n // (k + 1)) + ["control"] * (n % (k + 1)))


# --- scale detection ------------------------------------------------------------------------------

def test_detect_scale_real(gbm_path, kang_path, papalexi_path):
    with H5AD(gbm_path) as h:
        s = detect_scale(h.matrix("X"))
        assert s.kind == "log1p" and s.target_sum is None  # no constant library size (README)
        assert detect_scale(h.matrix("counts_recovered")).kind == "counts"
    with H5AD(papalexi_path) as h:
        s = detect_scale(h.matrix("X"))
        assert s.kind == "log1p" and abs(s.target_sum - 1e4) < 1
    with H5AD(kang_path) as h:
        assert detect_scale(h.matrix("layers/counts")).kind == "counts"
        assert detect_scale(h.matrix("X")).kind == "log1p"


def test_scaled_and_normalized_refused(tmp_path):
    rng = np.random.default_rng(0)
    n = 30
    p = small(tmp_path / "z.h5ad", rng.normal(0, 1, (n, 5)), labels(n))
    with pytest.raises(H5ADError, match="layers/counts"):
        prepare(p, tmp_path / "o1")
    p = small(tmp_path / "n.h5ad", rng.uniform(0, 100, (n, 5)) + 0.5, labels(n))
    with pytest.raises(H5ADError, match="assume normalized"):
        prepare(p, tmp_path / "o2")
    d = prepare(p, tmp_path / "o3", assume="normalized")
    with H5AD(p) as h:
        x = h.matrix("X").block(0, n)
    i = np.flatnonzero(d.obs_names == "c0")[0]
    np.testing.assert_allclose(d.rows([i])[0], np.log1p(x[0]), rtol=1e-6)


def test_counts_normalised_once(tmp_path):
    rng = np.random.default_rng(1)
    n = 30
    C = rng.poisson(3, (n, 8)).astype(np.float32)
    p = small(tmp_path / "c.h5ad", C, labels(n))
    d = prepare(p, tmp_path / "o", target_sum=1e4)
    want = np.log1p(C / C.sum(1, keepdims=True) * 1e4)
    got = d.rows(np.arange(n))
    order = np.array([int(s[1:]) for s in d.obs_names])
    np.testing.assert_allclose(got, want[order], rtol=1e-5, atol=1e-5)
    assert d.index["recipe"]["target_sum"] == 1e4
    # median target by default
    d2 = prepare(p, tmp_path / "o2")
    assert d2.index["recipe"]["target_sum"] == pytest.approx(np.median(C.sum(1)))
    # prepared log1p output fed back in is detected as log1p and not logged again
    L = want.astype(np.float32)
    p2 = small(tmp_path / "l.h5ad", L, labels(n))
    d3 = prepare(p2, tmp_path / "o3", normalize="yes")
    np.testing.assert_allclose(d3.rows(np.arange(n)), L[np.array([int(s[1:]) for s in d3.obs_names])], rtol=1e-6)


# --- prepare on real files ------------------------------------------------------------------------

def test_prepare_gbm(gbm_path, tmp_path, capsys):
    d = prepare(gbm_path, tmp_path / "p", keep={"cell_type": ["A172", "T98G", "U87MG"]})
    out = capsys.readouterr().out
    assert "detected perturbation column 'perturbation'" in out and "detected control label 'control'" in out
    assert d.context_names == ["A172", "T98G", "U87MG"] and d.control == "control" and d.control_code == 0
    assert len(d.pert_names) == 10 and d.n_genes == 500
    # rows sorted by (context, pert, batch); groups are contiguous and cover every row once
    k = np.stack([d.context, d.pert, d.batch], 1).astype(np.int64)
    assert np.all(np.diff(k[:, 0] * 10**6 + k[:, 1] * 10**3 + k[:, 2]) >= 0)
    assert sum(g.stop - g.start for g in d.groups) == d.n_cells
    for g in d.groups:
        assert (d.pert[g.start:g.stop] == g.pert).all() and (d.context[g.start:g.stop] == g.context).all()
    # names, labels and values preserved end to end
    with H5AD(gbm_path) as h:
        names, genes = h.obs_names, h.var_names()
        pos = {n: i for i, n in enumerate(names)}
        rng = np.random.default_rng(0)
        pick = rng.choice(d.n_cells, 200, replace=False)
        src = np.array([pos[n] for n in d.obs_names[pick]])
        np.testing.assert_array_equal(d.rows(pick), h.matrix("X").rows(src))
        np.testing.assert_array_equal(d.label("pert", d.pert[pick]), h.column("perturbation")[src])
        np.testing.assert_array_equal(d.label("context", d.context[pick]), h.column("cell_type")[src])
    assert d.genes == genes.tolist()
    assert len(d.index["sources"][0]["md5"]) == 32 and d.index["sources"][0]["scale"]["kind"] == "log1p"


def test_modality_aliasing_warns(gbm_path, tmp_path, capsys):
    prepare(gbm_path, tmp_path / "p", keep={"cell_type": ["k562", "A172"]}, hvg=100)
    out = capsys.readouterr().out
    assert "modality aliasing" in out and "MAP2K3" in out
    d = prepare(gbm_path, tmp_path / "m", keep={"cell_type": ["k562", "A172"]}, modality=True)
    assert "CRISPRa:MAP2K3" in d.pert_names and "CRISPRi:MAP2K3" in d.pert_names and d.control == "control"
    a172 = d.context_names.index("A172")
    assert {d.pert_names[p].split(":")[0] for p in d.pert[(d.context == a172) & (d.pert != 0)]} == {"CRISPRi"}


def test_prepare_kang_counts_hvg_batch(kang_path, tmp_path):
    d = prepare(kang_path, tmp_path / "p", key="layers/counts", batch_col="donor", hvg=300, dtype="float16")
    assert d.n_genes == 300 and d.batch_names == ["101", "107"] and d.pert_names == ["control", "IFN-beta"]
    assert d.X.dtype == np.float16 and d.rows([0]).dtype == np.float32
    x = d.rows(np.arange(d.n_cells))
    assert np.isfinite(x).all() and x.min() >= 0 and x.max() < 15
    s = np.expm1(x.astype(np.float64))
    assert s.sum(1).max() <= d.index["recipe"]["target_sum"] * 1.01  # HVG subset of a normalised cell


def test_prepare_papalexi_bf16(papalexi_path, tmp_path):
    d = prepare(papalexi_path, tmp_path / "p", batch_col="bio_rep", dtype="bfloat16")
    assert d.pert_col == "target_gene" and d.control == "non-targeting" and d.context_names == ["THP-1"]
    assert len(d.pert_names) == 26 and d.batch_names == ["rep_1", "rep_2", "rep_3"]
    with H5AD(papalexi_path) as h:
        pos = {n: i for i, n in enumerate(h.obs_names)}
        src = np.array([pos[n] for n in d.obs_names[:300]])
        ref = h.matrix("X").rows(src)
    np.testing.assert_allclose(d.rows(np.arange(300)), ref, rtol=1 / 128, atol=1e-6)
    a, b = d.group_table[0, 3:5]  # group sums decode the stored bfloat16 rows
    np.testing.assert_allclose(d.sums[0], d.rows(np.arange(a, b)).sum(0, dtype=np.float64), rtol=1e-9, atol=1e-6)


@pytest.mark.slow
def test_hvg_scanpy_parity(kang_path, tmp_path):
    py = None
    try:
        import scanpy  # noqa: F401
        py = sys.executable
    except ImportError:  # or a python that has it, named by the environment (no machine path here)
        py = os.environ.get("NANOSTATE_SCANPY_PYTHON")
    if py is None:
        pytest.skip("scanpy not installed (or set NANOSTATE_SCANPY_PYTHON to a python that has it)")
    d = prepare(kang_path, tmp_path / "p", key="layers/counts", hvg=200, target_sum=1e4)
    code = ("import anndata as ad, scanpy as sc, sys\n"
            f"a = ad.read_h5ad({str(kang_path)!r}); a.X = a.layers['counts']\n"
            "sc.pp.normalize_total(a, target_sum=1e4); sc.pp.log1p(a)\n"
            "sc.pp.highly_variable_genes(a, n_top_genes=200, flavor='seurat')\n"
            "print('\\n'.join(a.var_names[a.var.highly_variable]))\n")
    r = subprocess.run([py, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert set(r.stdout.split()) == set(d.genes)


def test_hvg_shortfall(tmp_path):
    rng = np.random.default_rng(0)
    n, G = 40, 500
    X = np.log1p(rng.poisson(2, (n, G))).astype(np.float32)
    X[:, 438:] = 0.5  # 62 constant genes
    p = small(tmp_path / "h.h5ad", X, labels(n))
    with pytest.raises(ValueError, match="only 438 of 500 genes are non-constant"):
        prepare(p, tmp_path / "o", hvg=500)
    assert len(prepare(p, tmp_path / "o2", hvg=438).genes) == 438
    assert len(hvg_seurat(np.arange(1, 11.0), np.arange(1, 11.0) ** 1.5, 7)) == 7


# --- multiple files, genes ------------------------------------------------------------------------

def test_multi_file_alignment(syn, tmp_path):
    d0, data, _ = syn
    with H5AD(d0 / "s.h5ad") as h:
        X = h.matrix("X").block(0, 200)
        obs = {c: h.column(c)[:200] for c in ("perturbation", "cell_type", "batch")}
        genes = h.var_names()
    perm = np.random.default_rng(0).permutation(len(genes))
    names = [f"other{i}" for i in range(200)]
    (tmp_path / "in").mkdir()
    shutil.copy(d0 / "s.h5ad", tmp_path / "in" / "a.h5ad")
    write_h5ad(tmp_path / "in" / "b.h5ad", X[:, perm], names, genes[perm], obs=obs)
    d = prepare(str(tmp_path / "in" / "*.h5ad"), tmp_path / "o", batch_col="batch")  # a glob
    assert d.n_cells == data.n_cells + 200 and d.genes == genes.tolist()
    i = np.flatnonzero(d.obs_names == "other7")[0]
    np.testing.assert_array_equal(d.rows([i])[0], X[7])
    assert set(d.source.tolist()) == {0, 1}
    # genes missing from one file: an error naming them, or --intersect reporting the dropped ones
    write_h5ad(tmp_path / "c.h5ad", X[:, :50], names, genes[:50], obs=obs)
    with pytest.raises(H5ADError, match="lacks 10 genes.*GENE0050"):
        prepare([d0 / "s.h5ad", tmp_path / "c.h5ad"], tmp_path / "o2")
    d = prepare([d0 / "s.h5ad", tmp_path / "c.h5ad"], tmp_path / "o3", intersect=True)
    assert d.genes == genes[:50].tolist()
    # requested genes in a given order; unknown ones named
    d = prepare(d0 / "s.h5ad", tmp_path / "o4", genes=["GENE0003", "GENE0001"])
    assert d.genes == ["GENE0003", "GENE0001"]
    with pytest.raises(H5ADError, match="NOTAGENE"):
        prepare(d0 / "s.h5ad", tmp_path / "o5", genes=["GENE0003", "NOTAGENE"])
    with pytest.raises(H5ADError, match="mouse symbols"):
        prepare(d0 / "s.h5ad", tmp_path / "o6", genes=["Actb", "Gapdh"])


# --- bad input -> clear errors --------------------------------------------------------------------

def test_bad_input_errors(syn, tmp_path):
    d0 = syn[0]
    f = d0 / "s.h5ad"
    with pytest.raises(H5ADError, match="perturbation column 'nope' not in obs"):
        prepare(f, tmp_path / "a", pert_col="nope")
    with pytest.raises(H5ADError, match="control label 'DMSO' not found in obs column 'perturbation'"):
        prepare(f, tmp_path / "a", control="DMSO")
    with pytest.raises(H5ADError, match="context column 'line' not in obs"):
        prepare(f, tmp_path / "a", context_col="line")
    with pytest.raises(H5ADError, match="batch column 'plate' not in obs"):
        prepare(f, tmp_path / "a", batch_col="plate")
    with pytest.raises(H5ADError, match=r"--keep cell_type: value\(s\) \['ctxZ'\]"):
        prepare(f, tmp_path / "a", keep={"cell_type": ["ctxA", "ctxZ"]})
    n = 30
    rng = np.random.default_rng(0)
    X = np.log1p(rng.poisson(2, (n, 5))).astype(np.float32)
    ctx = np.array(["A"] * 15 + ["B"] * 15, object)
    pert = labels(n)
    pert[15:] = np.where(pert[15:] == "control", "P0", pert[15:])
    with pytest.raises(H5ADError, match="context 'B' .* has no control cells"):
        prepare(small(tmp_path / "nc.h5ad", X, pert, ctx), tmp_path / "a")
    Xn = X.copy()
    Xn[17, 2] = np.nan
    with pytest.raises(H5ADError, match="non-finite"):
        prepare(small(tmp_path / "nan.h5ad", Xn, labels(n)), tmp_path / "a")
    both = labels(n)
    both[1] = "ctrl"
    with pytest.raises(H5ADError, match="ambiguous control label"):
        prepare(small(tmp_path / "amb.h5ad", X, both), tmp_path / "a")
    with pytest.raises(H5ADError, match="ambiguous perturbation column"):
        prepare(small(tmp_path / "amb2.h5ad", X, labels(n), gene=np.array(labels(n, 4), object)), tmp_path / "a")
    with pytest.raises(H5ADError, match="no perturbation column found"):
        write_h5ad(tmp_path / "np.h5ad", X, [f"c{i}" for i in range(n)], list("abcde"), obs={"foo": labels(n)})
        prepare(tmp_path / "np.h5ad", tmp_path / "a")
    (tmp_path / "t.h5ad").write_text("not hdf5")
    with pytest.raises(H5ADError, match="t.h5ad: not an HDF5 file"):
        prepare(tmp_path / "t.h5ad", tmp_path / "a")
    import h5py
    with h5py.File(tmp_path / "plain.h5", "w") as g:
        g["x"] = np.zeros(3)
    with pytest.raises(H5ADError, match="plain.h5: not an AnnData file"):
        prepare(tmp_path / "plain.h5", tmp_path / "a")
    with pytest.raises(H5ADError, match="matches no .h5ad"):
        prepare(str(tmp_path / "none*.h5ad"), tmp_path / "a")
    with pytest.raises(H5ADError, match="not a prepared data folder"):
        Prepared(tmp_path / "nowhere")
    assert main(["prepare", str(f), str(tmp_path / "a"), "--pert-col", "nope"]) == 2


def test_layout_is_binary_and_old_folders_are_refused(syn, tmp_path):
    """index.json does not grow with the cells; per-row data lives in .npy/.bin files; a format-1
    folder (obs names and groups inside index.json) is refused with the command to re-run."""
    import json
    _, d, _ = syn
    ix = json.load(open(d.dir / "index.json"))
    assert "obs_names" not in ix and "groups" not in ix and ix["n_groups"] == len(d.group_table)
    assert np.load(d.dir / "codes.npy", mmap_mode="r").dtype == np.int32
    assert d.names([0, 5]).tolist() == [str(x) for x in d.obs_names[[0, 5]]]
    old = tmp_path / "old"
    shutil.copytree(d.dir, old)
    ix.update(format=1, obs_names=["a"], groups=[[0, 0, 0, 0, 1]])
    (old / "index.json").write_text(json.dumps(ix))
    with pytest.raises(H5ADError, match="older layout.*re-run python -m state.data prepare"):
        Prepared(old)


def test_group_sums_make_a_part_read_only_what_it_leaves_out(syn, monkeypatch, tmp_path):
    """sums.npy holds each group's row sums; the training part's group means (anchor table, mean
    baselines) are then its groups' sums minus the val cells: the same means from ~val_frac of the reads."""
    from state.baselines import group_means
    from state.splits import make_split
    _, d, _ = syn
    T = d.group_table
    direct = np.stack([d.rows(np.arange(a, b)).sum(0, dtype=np.float64) for a, b in T[:, 3:5]])
    np.testing.assert_allclose(d.sums, direct, rtol=1e-12, atol=1e-9)
    sp = make_split(d, task="fewshot", context=d.context_names[0], support=0.3, seed=0)
    tr = sp.part("train")
    reads, rows = [], d.rows
    monkeypatch.setattr(d, "rows", lambda idx: (reads.append(len(idx)), rows(idx))[1])
    fast = group_means(d, tr)
    n_fast = sum(reads)
    monkeypatch.setattr(Prepared, "sums", None)  # a folder prepared without sums.npy
    reads.clear()
    slow = group_means(d, tr)
    assert fast.keys() == slow.keys() and all(fast[k][1] == slow[k][1] for k in fast)
    for k in fast:
        np.testing.assert_allclose(fast[k][0], slow[k][0], rtol=1e-9, atol=1e-9)
    assert sum(reads) == len(tr) and n_fast == len(sp.part("val")) < len(tr) / 5, (n_fast, len(tr))
    monkeypatch.undo()
    bad = tmp_path / "bad"
    shutil.copytree(d.dir, bad)
    np.save(bad / "sums.npy", np.zeros((2, 3)))
    with pytest.raises(H5ADError, match="sums.npy: shape .* re-run prepare"):
        group_means(Prepared(bad), tr)


def test_cli_prepare(syn, tmp_path, capsys):
    d0 = syn[0]
    assert main(["prepare", str(d0 / "s.h5ad"), str(tmp_path / "o"), "--pert-col", "perturbation", "--control",
                 "control", "--context-col", "cell_type", "--keep", "cell_type=ctxA,ctxB", "--dtype", "float16"]) == 0
    d = Prepared(tmp_path / "o")
    assert d.context_names == ["ctxA", "ctxB"] and d.dtype == "float16" and d.batch_names == ["all"]
    assert (d.batch == 0).all()


# --- SetSampler -----------------------------------------------------------------------------------

def test_sampler_train_batches(syn):
    _, d, _ = syn
    s = SetSampler(d, np.arange(d.n_cells), set_size=16, batch_size=4, seed=3)
    b = s.next()
    assert b["ctrl"].shape == b["tgt"].shape == (4, 16, d.n_genes) and b["ctrl"].dtype == torch.float32
    assert b["pert"].shape == (4,) and b["batch"].shape == (4, 16) and (b["lens"] == 16).all()
    seen_ctrl_set = False
    for _ in range(s.steps_per_epoch):
        t, c = b["tgt_idx"].numpy(), b["ctrl_idx"].numpy()
        assert (d.pert[t] == b["pert"].numpy()[:, None]).all()  # one perturbation per set
        assert (d.context[t] == b["context"].numpy()[:, None]).all()  # one context per set
        assert (d.pert[c] == d.control_code).all() and (d.context[c] == b["context"].numpy()[:, None]).all()
        np.testing.assert_array_equal(b["tgt"].numpy(), d.rows(t.ravel()).reshape(b["tgt"].shape))
        np.testing.assert_array_equal(b["ctrl"].numpy(), d.rows(c.ravel()).reshape(b["ctrl"].shape))
        seen_ctrl_set |= bool((b["pert"] == d.control_code).any())
        b = s.next()
    assert seen_ctrl_set  # control cells form their own sets
    # every group's cells are used in an epoch (pad only resamples the group)
    s2 = SetSampler(d, np.arange(d.n_cells), 16, 4, seed=3)
    used = np.concatenate([x["tgt_idx"].numpy().ravel() for x in s2])
    assert set(used.tolist()) == set(range(d.n_cells))
    s3 = SetSampler(d, np.arange(d.n_cells), 16, 4, seed=3, control_sets=False)
    assert all((x["pert"] != d.control_code).all() for x in s3)


def test_sampler_determinism_epochs_resume(syn):
    _, d, _ = syn
    mk = lambda seed=0: SetSampler(d, np.arange(d.n_cells), 8, 3, seed=seed)
    a, b = mk(), mk()
    n = a.steps_per_epoch
    xa = [a.next() for _ in range(n + 2)]
    xb = [b.next() for _ in range(n + 2)]
    for u, v in zip(xa, xb):
        for k in u:
            assert torch.equal(u[k], v[k])
    assert a.epoch == 1 and not torch.equal(xa[0]["tgt_idx"], xa[n]["tgt_idx"])  # reshuffled with seed+epoch
    assert not torch.equal(mk(1).next()["tgt_idx"], xa[0]["tgt_idx"])
    # resume: a fresh sampler loaded with a's state sees the same next batches
    sd = a.state_dict()
    c = mk()
    c.load_state_dict(sd)
    for _ in range(3):
        u, v = a.next(), c.next()
        assert torch.equal(u["tgt_idx"], v["tgt_idx"]) and torch.equal(u["ctrl_idx"], v["ctrl_idx"])
    with pytest.raises(ValueError, match="seed"):
        mk(5).load_state_dict(sd)


def test_sampler_sharding(syn):
    """StepSampler cuts one world-size-independent sequence: W ranks x k micro-batches per step see the
    same sets as one process x W*k, without overlap within an epoch."""
    from state.sampler import StepSampler
    _, d, _ = syn
    mk = lambda: SetSampler(d, np.arange(d.n_cells), 8, 5, seed=1)
    spe = mk().steps_per_epoch
    W, k = 3, 2
    ranks = [StepSampler(mk(), r, W, k) for r in range(W)]
    one = StepSampler(mk(), 0, 1, W * k)
    seen = []
    for _ in range(-(-spe // (W * k))):
        full = [b["tgt_idx"] for b in one.next()]
        parts = [b["tgt_idx"] for s in ranks for b in s.next()]
        assert all(torch.equal(u, v) for u, v in zip(full, parts))
        seen += parts
    first = torch.cat(seen[:spe]).numpy()  # one epoch: every cell appears, in sets of one group
    assert set(first.ravel().tolist()) == set(range(d.n_cells))


@pytest.mark.parametrize("workers", [1, 2])
def test_loader_processes_change_nothing(syn, workers):
    """Loader processes deliver the same batches in the same order as building them in the step, across
    epochs, a resume and grad accumulation (buffer ring reused many times over)."""
    from state.sampler import StepSampler
    _, d, _ = syn
    mk = lambda w: StepSampler(SetSampler(d, np.arange(d.n_cells), 8, 5, seed=2), 0, 1, 2, workers=w, prefetch=2)
    plain, par = mk(0), mk(workers)
    n = 3 * plain.s.steps_per_epoch // 2  # steps: crosses an epoch boundary
    for _ in range(n):
        for u, v in zip(plain.next(), par.next()):
            assert u.keys() == v.keys() and all(torch.equal(u[k], v[k]) for k in u)
    sd = plain.state_dict()
    par.next()  # ahead of the saved state, with batches queued: a resume drops them
    par.load_state_dict(sd)
    for _ in range(4):
        for u, v in zip(plain.next(), par.next()):
            assert all(torch.equal(u[k], v[k]) for k in u)
    par.close()


def test_sampler_eval_and_batch_mapping(syn):
    _, d, _ = syn
    rows = np.arange(d.n_cells)
    s = SetSampler(d, rows, 64, 4, train=False)
    lens, used = [], []
    for b in s:
        L = b["lens"].numpy()
        t = b["tgt_idx"].numpy()
        for i in range(len(L)):
            if b["valid"][i]:
                lens.append(L[i]); used.append(t[i, :L[i]])
            assert (t[i, L[i]:] == -1).all() and (b["tgt"][i, L[i]:] == 0).all() and (b["ctrl"][i, L[i]:] == 0).all()
    used = np.concatenate(used)
    assert len(used) == d.n_cells and len(set(used.tolist())) == d.n_cells  # each cell exactly once, unpadded
    assert min(lens) < 64
    bs = SetSampler(d, rows, 16, 4, seed=0, mapping="batch")
    for _ in range(5):
        b = bs.next()
        t, c = b["tgt_idx"].numpy(), b["ctrl_idx"].numpy()
        assert (d.batch[t] == d.batch[t[:, :1]]).all() and (d.batch[c] == d.batch[t[:, :1]]).all()
    nc = rows[~((d.context == 0) & (d.pert == d.control_code))]
    with pytest.raises(ValueError, match="context 'ctxA' has no control cells"):
        SetSampler(d, nc, 16, 4)
    with pytest.raises(ValueError, match="no rows"):
        SetSampler(d, [], 16, 4)


def test_synth_learnable(syn):
    """Perturbation effects are shared across contexts: per-context mean shifts correlate."""
    _, d, truth = syn
    x = d.rows(np.arange(d.n_cells))
    shift = np.zeros((len(d.context_names), len(d.pert_names), d.n_genes))
    for k in range(len(d.context_names)):
        ctl = x[(d.context == k) & (d.pert == 0)].mean(0)
        for p in range(1, len(d.pert_names)):
            shift[k, p] = x[(d.context == k) & (d.pert == p)].mean(0) - ctl
    r = np.corrcoef(shift[0, 1:].ravel(), shift[1, 1:].ravel())[0, 1]
    assert r > 0.5
    # the on-target gene goes down
    for p in range(1, len(d.pert_names)):
        g = d.genes.index(d.pert_names[p])
        assert shift[:, p, g].mean() < 0


def test_plain_strings_dense_obsm_gene_col(tmp_path):
    """obs as plain string arrays (not categoricals), dense X, an obsm key, gene names from a var column."""
    import h5py
    rng = np.random.default_rng(0)
    n = 30
    X = np.log1p(rng.poisson(2, (n, 6))).astype(np.float32)
    p = tmp_path / "p.h5ad"
    write_h5ad(p, X, [f"c{i}" for i in range(n)], [f"ENSG{i}" for i in range(6)],
               obs={"gene": labels(n)}, var={"symbol": np.array([f"S{i}" for i in range(6)], object)},
               obsm={"X_emb": rng.normal(0, 1, (n, 3)).astype(np.float32)})
    with h5py.File(p, "a") as f:
        del f["obs/gene"]
        f["obs"].create_dataset("gene", data=np.array(["NT" if v == "control" else v for v in labels(n)], object),
                                dtype=h5py.string_dtype("utf-8"))
    d = prepare(p, tmp_path / "o", gene_col="symbol")
    assert d.pert_col == "gene" and d.control == "NT" and d.genes == [f"S{i}" for i in range(6)]
    assert d.context_names == ["all"] and d.context_col is None
    i = np.flatnonzero(d.obs_names == "c4")[0]
    np.testing.assert_array_equal(d.rows([i])[0], X[4])
    e = prepare(p, tmp_path / "e", key="obsm/X_emb")
    assert e.genes == ["X_emb_0", "X_emb_1", "X_emb_2"] and e.index["sources"][0]["scale"]["kind"] == "embedding"
    with H5AD(p) as h:
        emb = h.matrix("obsm/X_emb").block(0, n)
    np.testing.assert_array_equal(e.rows([i])[0], emb[4])
    with pytest.raises(H5ADError, match="no obs column 'nope'|var column 'nope'"):
        prepare(p, tmp_path / "g", gene_col="nope")


def test_obsm_gene_names(tmp_path, capsys):
    """An obsm input that holds genes (scanpy's X_hvg) is named by gene: from var['highly_variable'],
    uns['X_hvg_var_names'] or --obsm-genes; unnamed gene-valued columns are warned about."""
    rng = np.random.default_rng(1)
    n = 24
    X = np.log1p(rng.poisson(2, (n, 6))).astype(np.float32)
    hv = np.array([True, False, True, True, False, False])
    genes = [f"G{i}" for i in range(6)]
    p = tmp_path / "hv.h5ad"
    write_h5ad(p, X, [f"c{i}" for i in range(n)], genes, obs={"gene": labels(n)}, var={"highly_variable": hv},
               obsm={"X_hvg": X[:, hv], "X_other": X[:, :2]})
    d = prepare(p, tmp_path / "a", key="obsm/X_hvg")
    assert d.genes == ["G0", "G2", "G3"]
    assert "no gene names" not in capsys.readouterr().out
    (tmp_path / "names.txt").write_text("A\nB\n")
    assert main(["prepare", str(p), str(tmp_path / "b"), "--key", "obsm/X_other",
                 "--obsm-genes", str(tmp_path / "names.txt")]) == 0
    from state.data import Prepared
    assert Prepared(tmp_path / "b").genes == ["A", "B"]
    e = prepare(p, tmp_path / "c", key="obsm/X_other")  # 2 columns, 3 highly variable: no names
    assert e.genes == ["X_other_0", "X_other_1"] and "no gene names" in capsys.readouterr().out
    with pytest.raises(H5ADError, match="lists 3 names for the 2 columns"):
        prepare(p, tmp_path / "d", key="obsm/X_other", obsm_genes=["A", "B", "C"])
    p2 = tmp_path / "u.h5ad"
    write_h5ad(p2, X, [f"c{i}" for i in range(n)], genes, obs={"gene": labels(n)},
               obsm={"X_hvg": X[:, :2]}, uns={"X_hvg_var_names": np.array(["G0", "G1"], object)})
    assert prepare(p2, tmp_path / "e", key="obsm/X_hvg").genes == ["G0", "G1"]


def test_synth_cli_counts(tmp_path):
    from state.synth import main as synth_main
    synth_main([str(tmp_path / "c.h5ad"), "--n-cells", "400", "--n-genes", "30", "--n-perts", "4",
                "--counts", "--compression", "gzip"])
    with H5AD(tmp_path / "c.h5ad") as h:
        assert h.n_vars == 30 and set(h.column("perturbation")) == {"control", "GENE0000", "GENE0001",
                                                                      "GENE0002", "GENE0003"}
        assert detect_scale(h.matrix("X")).kind == "counts"
    d = prepare(tmp_path / "c.h5ad", tmp_path / "o")
    assert d.index["sources"][0]["transform"] == "normalize+log1p"


# --- gene-space targets next to an embedding (prepare --genes-key; ST gene decoder) --------------

def add_fake_embedding(path, dim=8, seed=0, name="X_emb"):
    """obsm[name] = a fixed random projection of log1p(X) (a stand-in for X_state)."""
    import h5py
    with H5AD(path) as h:
        X = h.matrix("X").block(0, h.n_obs)
    E = (np.log1p(X) @ np.random.default_rng(seed).normal(0, 1, (X.shape[1], dim))).astype(np.float32)
    with h5py.File(path, "a") as f:
        g = f.require_group("obsm")
        g.attrs.setdefault("encoding-type", "dict")
        g.attrs.setdefault("encoding-version", "0.1.0")
        g.create_dataset(name, data=E)
    return E


def test_genes_key_targets(tmp_path):
    p = tmp_path / "c.h5ad"
    make_synthetic(p, n_cells=600, n_genes=40, n_perts=4, n_contexts=2, seed=1, counts=True)
    E = add_fake_embedding(p, dim=8)
    ref = prepare(p, tmp_path / "genes", hvg=12)  # the gene-space reference: same cells, same recipe
    d = prepare(p, tmp_path / "emb", key="obsm/X_emb", genes_key="X", hvg=12)
    assert d.n_genes == 8 and d.genes == [f"X_emb_{i}" for i in range(8)]
    assert d.genes_key == "X" and d.n_genes_out == 12 and d.gene_names_out == ref.genes
    assert d.G.shape == (d.n_cells, 12) and not any(x.name.startswith(".genes") for x in d.dir.iterdir())
    gt = d.index["gene_target"]
    assert gt["sources"][0]["transform"] == "normalize+log1p" and gt["recipe"]["hvg"] == 12
    # same rows, same order as the gene-only preparation; G holds the normalised log1p genes
    assert list(d.obs_names) == list(ref.obs_names)
    np.testing.assert_array_equal(d.pert, ref.pert)
    idx = np.array([5, 0, d.n_cells - 1, 17, 17])
    np.testing.assert_array_equal(d.rows_genes(idx), ref.rows(idx))
    with H5AD(p) as h:
        names = list(h.obs_names.astype(str))
    np.testing.assert_array_equal(d.rows(idx), E[[names.index(n) for n in d.obs_names[idx]]])
    plain = prepare(p, tmp_path / "plain", key="obsm/X_emb")
    assert plain.G is None and plain.n_genes_out == 0 and plain.checksum != d.checksum
    with pytest.raises(ValueError, match="genes-key"):
        plain.rows_genes([0])
    # sampler: tgt_genes are the gene rows of the very target cells; absent without gene targets
    for train in (True, False):
        b = SetSampler(d, np.arange(d.n_cells), set_size=16, batch_size=4, seed=0, train=train).batch(0, 0)
        assert b["tgt_genes"].shape == (4, 16, 12) and b["tgt"].shape == (4, 16, 8)
        t = b["tgt_idx"].numpy()
        ok = t >= 0
        np.testing.assert_array_equal(b["tgt_genes"].numpy()[ok], ref.rows(t[ok]))
        assert (b["tgt_genes"].numpy()[~ok] == 0).all()
    assert "tgt_genes" not in SetSampler(plain, np.arange(plain.n_cells), 16, 4).batch(0, 0)
    # CLI
    assert main(["prepare", str(p), str(tmp_path / "cli"), "--key", "obsm/X_emb", "--genes-key", "X",
                 "--hvg", "12"]) == 0
    c = Prepared(tmp_path / "cli")
    assert c.gene_names_out == ref.genes and c.checksum == d.checksum


def test_every_row_is_checked_not_a_sample(tmp_path):
    """The scale detector samples rows; the streaming write checks every row: a negative or fractional
    count in a row the sample missed is a named error (file, cell, row, column) and nothing is written.
    A duplicated gene name in one file and --assume log1p on z-scored data are errors too."""
    rng = np.random.default_rng(0)
    n, g = 12_000, 4
    X = rng.poisson(3, (n, g)).astype(np.float32)
    from state.scale import sample_rows as _sample

    class M:  # the detector's view of the matrix: which rows does it sample?
        shape = (n, g)

        def block(self, a, b):
            return np.arange(a, b)[:, None].astype(np.float32)
    seen = set(_sample(M(), 10_000, 0)[:, 0].astype(int).tolist())
    r = next(i for i in range(n) if i not in seen)
    names = [f"c{i}" for i in range(n)]
    for bad, msg in ((-3.0, "negative value -3"), (2.5, "fractional value 2.5")):
        Xb = X.copy()
        Xb[r, 1] = bad
        p = tmp_path / f"bad{bad}.h5ad"
        write_h5ad(p, Xb, names, [f"G{j}" for j in range(g)], obs={"gene": labels(n)})
        with H5AD(p) as h:
            assert detect_scale(h.matrix("X")).kind == "counts"  # the sample saw only clean rows
        with pytest.raises(H5ADError, match=msg) as e:
            prepare(p, tmp_path / "out")
        assert f"'c{r}'" in str(e.value) and f"row {r}" in str(e.value)
        assert not (tmp_path / "out").exists()
    p = tmp_path / "dup.h5ad"
    write_h5ad(p, X[:300], names[:300], ["G0", "G1", "G0", "G3"], obs={"gene": labels(300)})
    with pytest.raises(H5ADError, match="duplicate gene names.*G0"):
        prepare(p, tmp_path / "out")
    z = (X[:300] - X[:300].mean(0)) / X[:300].std(0)
    p = tmp_path / "z.h5ad"
    write_h5ad(p, z.astype(np.float32), names[:300], [f"G{j}" for j in range(g)], obs={"gene": labels(300)})
    with pytest.raises(H5ADError, match="negative value"):
        prepare(p, tmp_path / "out", assume="log1p")
    assert not (tmp_path / "out").exists()


def test_draw_controls_is_even():
    from state.sampler import draw_controls
    rng = np.random.default_rng(0)
    pool = np.arange(100, 137)
    for n in (5, 37, 80, 200):
        d = draw_controls(pool, n, rng)
        assert len(d) == n and set(d) <= set(pool)
        c = np.bincount(d - 100, minlength=len(pool))
        assert c.max() - c.min() <= 1 and c.max() == -(-n // len(pool))  # floor or ceil of n/k each
    a, b = draw_controls(pool, 50, np.random.default_rng(3)), draw_controls(pool, 50, np.random.default_rng(3))
    assert np.array_equal(a, b) and not np.array_equal(a, np.sort(a))  # seeded, and shuffled
