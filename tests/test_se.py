"""SE (issue 8): tokenisation, shapes, learning, transform == forward, resume, gene-table errors.
Budget: <= 45 s on 2 CPU cores."""
import json
import os
import sys

import h5py
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from state.h5ad import H5AD, write_h5ad  # noqa: E402
from state.se import (GeneMap, SEConfig, StateEmbedding, file_hash, load_gene_vectors,  # noqa: E402
                      load_model, pca_gene_vectors, task_genes, to_log1p, tokenize)

@pytest.fixture(autouse=True)
def _one_thread():
    # tiny matmuls: OpenMP threads only add spin-waits on a busy 2-core CI box (10x slower measured)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


MICRO = dict(d_model=16, ff=32, n_head=2, n_layer=1, d_out=12, pad_length=24, count_hidden=16, P=6, N=6, S=5)


def _model(V=40, E=8, seed=0, **kw):
    torch.manual_seed(seed)
    c = dict(MICRO, n_datasets=2)
    c.update(kw)
    return StateEmbedding(SEConfig(**c), torch.randn(V, E), [f"G{i}" for i in range(V)])


def _counts(n, g, seed=0):
    rng = np.random.default_rng(seed)
    lam = rng.gamma(0.5, 2.0, size=g)
    return rng.poisson(lam[None, :] * rng.uniform(0.5, 2, size=(n, 1))).astype(np.float32)


def _h5ad(path, X, genes, extra_obs=True):
    n = X.shape[0]
    ip = np.concatenate([[0], np.cumsum((X > 0).sum(1))])
    r, c = np.nonzero(X)
    obs = {"cell_type": np.array(["a", "b"])[np.arange(n) % 2]} if extra_obs else {}
    write_h5ad(path, (X[r, c], c, ip), [f"c{i}" for i in range(n)], genes, obs=obs,
               obsm={"X_pca": np.ones((n, 3), np.float32)}, uns={"note": "keep me"})
    return path


# ------------------------------------------------------------------------------------------------
# tokenisation

def test_topk_order_and_counts():
    V, k = 30, 10
    x = torch.tensor(np.random.default_rng(0).permutation(V), dtype=torch.float32)[None] / 3  # distinct
    valid = torch.ones(1, V, dtype=torch.bool)
    ids, cnt = tokenize(x, valid, k, torch.tensor([5]), salt=0, cls_gene=torch.tensor([3]))
    assert ids.shape == (1, k) and cnt.shape == (1, k + 1)
    assert torch.equal(ids[0], torch.argsort(x[0], descending=True)[:k])
    w = x[0] / x[0].sum()
    assert torch.allclose(cnt[0, 1:], 100 * w[ids[0]])
    assert torch.allclose(cnt[0, 0], 100 * w[3])  # reference CLS quirk
    _, c0 = tokenize(x, valid, k, torch.tensor([5]), cls_gene=torch.tensor([3]), cls_count="zero")
    assert c0[0, 0] == 0


def test_ties_broken_by_seeded_shuffle():
    V, k = 200, 20
    x = torch.zeros(4, V)
    x[:, :5] = torch.tensor([5.0, 4, 3, 2, 1])  # 5 expressed, 195 tied zeros
    valid = torch.ones(4, V, dtype=torch.bool)
    rows = torch.tensor([0, 1, 2, 3])
    a, _ = tokenize(x, valid, k, rows, salt=7)
    b, _ = tokenize(x, valid, k, rows, salt=7)
    assert torch.equal(a, b)  # seeded: reproducible
    assert torch.equal(a[:, :5], torch.arange(5).expand(4, 5))  # expressed first, in order
    assert all(len(set(r.tolist())) == k for r in a)  # enough genes: no repeats
    assert not torch.equal(a[0, 5:], a[1, 5:])  # different cells, different zero genes
    c, _ = tokenize(x, valid, k, rows, salt=8)
    assert not torch.equal(a[:, 5:], c[:, 5:])  # different seed, different tie-break
    # the same cell gets the same sentence in any batch
    d, _ = tokenize(x[2:3], valid[2:3], k, rows[2:3], salt=7)
    assert torch.equal(d[0], a[2])


def test_padding_when_fewer_genes_than_k():
    V, k = 50, 40
    x = torch.zeros(2, V)
    x[0, [3, 7, 9]] = torch.tensor([1.0, 3.0, 2.0])
    valid = torch.zeros(2, V, dtype=torch.bool)
    valid[:, :20] = True  # 20 measured genes < k
    x[1, :20] = torch.arange(1, 21).float()  # every measured gene expressed: pad from all of them
    ids, _ = tokenize(x, valid, k, torch.tensor([0, 1]))
    assert ids[0, :3].tolist() == [7, 9, 3]  # expressed first, by expression
    rest = ids[0, 3:]
    assert bool((rest < 20).all()) and not any(g in (3, 7, 9) for g in rest.tolist())  # unexpressed, valid
    assert len(set(rest.tolist())) < len(rest)  # 37 slots from 17 genes: with replacement
    assert bool((ids[1] < 20).all()) and ids[1, :20].tolist() == list(range(19, -1, -1))


def test_task_genes():
    x = to_log1p(torch.from_numpy(_counts(6, 40)))
    valid = torch.ones(6, 40, dtype=torch.bool)
    valid[:, 30:] = False
    g, y = task_genes(x, valid, 4, 5, 3, torch.arange(6), salt=1)
    assert g.shape == y.shape == (6, 12)
    assert bool((g[:, :9] < 30).all())
    assert torch.equal(y, torch.where(valid, x, 0).gather(1, g))
    for i in range(6):
        if (x[i, :30] > 0).sum() >= 4:
            assert bool((y[i, :4] > 0).all())
        assert bool((y[i, 4:9] < 1).all())
    assert torch.equal(g[0, 9:], g[5, 9:])  # shared across the batch


def test_to_log1p_scale_rule():
    x = torch.tensor([[40.0, 0, 1], [2.0, 0.5, 0]])  # row 0 raw counts (max > 35), row 1 log1p
    y = to_log1p(x)
    assert torch.allclose(y[0], torch.log1p(x[0])) and torch.equal(y[1], x[1])


# ------------------------------------------------------------------------------------------------
# model

@pytest.mark.parametrize("norm", ["post", "pre"])
def test_shapes(norm):
    m = _model(norm=norm).eval()
    x = torch.from_numpy(_counts(5, 40))
    valid = torch.ones(5, 40, dtype=torch.bool)
    e = m.embed(x, valid, torch.arange(5), 0, torch.full((5,), 3))
    assert e.shape == (5, 12 + 10)
    assert torch.allclose(e[:, :12].norm(dim=1), torch.ones(5), atol=1e-5)
    yh = m.expression(e, torch.tensor([0, 5, 7]))  # decode X_state at 3 genes (inference rda 4.0)
    assert yh.shape == (5, 3) and torch.isfinite(yh).all()
    m2 = _model(ds_token=False).eval()
    assert m2.embed(x, valid, torch.arange(5)).shape == (5, 12)
    loss, parts = m.train()(x, valid, torch.arange(5), 0, torch.tensor([0, 1, 0, 1, 0]))
    assert loss.ndim == 0 and set(parts) == {"gene", "cell", "ds"}
    assert torch.allclose(loss, parts["gene"] + parts["cell"] + parts["ds"])


def test_few_steps_lower_the_loss():
    m = _model(dropout=0.0)
    x = torch.from_numpy(_counts(16, 40, seed=1))
    valid = torch.ones(16, 40, dtype=torch.bool)
    rows, ds = torch.arange(16), torch.arange(16) % 2
    opt = m.configure_optimizer(3e-3)
    losses = []
    for i in range(40):
        loss, _ = m(x, valid, rows, 0, ds)  # fixed salt: the same task genes every step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_pca_gene_vectors_match_svd(tmp_path):
    X = _counts(120, 30, seed=2)
    X[:, 5] = X[:, 6] * 2  # some structure
    p = _h5ad(str(tmp_path / "a.h5ad"), X, [f"g{i}" for i in range(30)])
    h = H5AD(p)
    gm = GeneMap(h, [f"G{i}" for i in range(30)], quiet=True)
    W = pca_gene_vectors([(h.matrix("X"), gm)], 30, k=5, seed=0, block=50)
    L = to_log1p(torch.from_numpy(X)).double()
    Vt = torch.linalg.svd(L - L.mean(0), full_matrices=False)[2][:5].T.float()  # (30, 5)
    # same subspace: the projection of one basis on the other keeps its norm
    assert W.shape == (30, 5)
    assert torch.allclose((Vt.T @ W).abs().max(0).values, torch.ones(5), atol=1e-3)
    h.close()


# ------------------------------------------------------------------------------------------------
# gene tables and files

def test_gene_table_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_gene_vectors(str(tmp_path / "nope.pt"))
    torch.save({}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="empty"):
        load_gene_vectors(str(tmp_path / "empty.pt"))
    from safetensors.torch import save_file
    save_file({"tp53": torch.ones(4), "Actb": torch.zeros(4)}, str(tmp_path / "g.safetensors"))
    names, W = load_gene_vectors(str(tmp_path / "g.safetensors"))
    assert sorted(names) == ["ACTB", "TP53"] and W.shape == (2, 4)
    torch.save({"A": torch.ones(4), "B": torch.ones(3)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="widths"):
        load_gene_vectors(str(tmp_path / "bad.pt"))
    p = _h5ad(str(tmp_path / "m.h5ad"), _counts(4, 3), ["Trp53", "Actb2", "Gapdh1"])
    with H5AD(p) as h, pytest.raises(ValueError, match="[Mm]ouse"):
        GeneMap(h, ["TP53", "ACTB"], quiet=True)


def test_fit_resume_and_transform(tmp_path, capsys):
    import embed

    X = _counts(90, 25, seed=3)
    genes = [f"Gene{i}" for i in range(25)]
    a = _h5ad(str(tmp_path / "a.h5ad"), X[:60], genes)
    b = _h5ad(str(tmp_path / "b.h5ad"), X[60:, 5:], [g.lower() for g in genes[5:]])  # other case, subset
    from state.prepare import prepare
    prepare(a, tmp_path / "pa", pert_col="")  # no perturbations; counts normalised + log1p'd, recorded
    prepare(b, tmp_path / "pb", pert_col="")
    with pytest.raises(SystemExit, match="is a file: prepare it first"):
        embed.main(["fit", a, f"--out={tmp_path}/r0"])
    common = [f"--data={tmp_path / 'pa'},{tmp_path / 'pb'}", "--batch_size=8", "--max_steps=5", "--pca_dim=6",
              "--val_cells=4", "--eval_every=100", "--save_every=100", "--log_every=100",
              "--d_model=16", "--ff=32", "--n_head=2", "--n_layer=1", "--d_out=12", "--pad_length=16",
              "--count_hidden=8", "--P=4", "--N=4", "--S=4"]
    embed.main(["fit", *common, f"--out={tmp_path}/r1"])
    embed.main(["fit", *common, f"--out={tmp_path}/r2", "--stop_at=2"])
    embed.main(["fit", *common, f"--out={tmp_path}/r2", "--resume"])
    h1 = file_hash(str(tmp_path / "r1" / "model.safetensors"))
    assert h1 == file_hash(str(tmp_path / "r2" / "model.safetensors"))  # exact resume
    meta = json.load(open(tmp_path / "r1" / "meta.json"))
    assert meta["se_hash"] == h1 and len(meta["genes"]) == 25 and meta["step"] == 5
    assert (tmp_path / "r2" / "ckpt" / "dcp" / ".metadata").exists()  # train.py's sharded checkpoint
    for bad, what in (("--batch_size=16", "batch_size"), ("--d_model=32", "d_model"),
                      ("--grad_accum=2", "global batch"), (f"--data={tmp_path / 'pa'}", "data")):
        with pytest.raises(SystemExit, match=f"cannot change .*{what}"):  # refused, nothing written
            embed.main(["fit", *common, f"--out={tmp_path}/r2", "--resume", "--max_steps=6", bad])
    assert h1 == file_hash(str(tmp_path / "r2" / "model.safetensors"))
    embed.main(["fit", *common, f"--out={tmp_path}/r2", "--resume", "--max_steps=6", "--wd=0.1"])
    assert "changed settings (applied from this step on): max_steps 5 -> 6, wd 0.01 -> 0.1" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exists and is not empty"):  # never overwrite a run
        embed.main(["fit", *common, f"--out={tmp_path}/r1"])
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "meta.json").write_text('{"step": 3, "st": {}}')
    (tmp_path / "st" / "state.pt").write_text("")
    with pytest.raises(SystemExit, match="not an SE run"):
        embed.main(["fit", *common, f"--out={tmp_path}/st", "--resume"])
    with pytest.raises(SystemExit, match="unknown config key --no_such_key"):
        embed.main(["fit", f"--data={tmp_path / 'pa'}", "--no_such_key=1"])
    with pytest.raises(FileNotFoundError, match="not found"):
        embed.main(["fit", *common, f"--out={tmp_path}/r3", f"--gene_emb={tmp_path}/esm_missing.pt"])
    # a user {gene: vector} file (lower-case keys, one gene missing from it) and the onehot fallback
    torch.save({g.lower(): torch.randn(7) for g in genes[1:]}, tmp_path / "vec.pt")
    embed.main(["fit", *common, f"--out={tmp_path}/r4", f"--gene_emb={tmp_path}/vec.pt", "--max_steps=1"])
    m4 = json.load(open(tmp_path / "r4" / "meta.json"))
    assert len(m4["genes"]) == 24 and m4["config"]["E"] == 7 and m4["gene_emb"]["kind"] == "file"
    embed.main(["fit", *common, f"--out={tmp_path}/r5", "--gene_emb=onehot", "--max_steps=1"])
    assert json.load(open(tmp_path / "r5" / "meta.json"))["config"]["E"] == 25

    # transform in place (other content untouched), to a copy, and to .npy; == the model's forward
    with h5py.File(b, "r") as f:
        x_before = f["X/data"][:]
    embed.main(["transform", f"--ckpt={tmp_path}/r1", b, "--batch_size=7"])
    embed.main(["transform", f"--ckpt={tmp_path}/r1", b, f"--output={tmp_path}/e.npy", "--batch_size=64"])
    embed.main(["transform", f"--ckpt={tmp_path}/r1", a, f"--output={tmp_path}/a2.h5ad"])
    with h5py.File(b, "r") as f:
        Z = f["obsm/X_state"][:]
        assert np.array_equal(f["X/data"][:], x_before) and "X_pca" in f["obsm"]
        assert f["obsm/X_state"].attrs["encoding-type"] == "array"
    with H5AD(b) as h:
        assert h.uns("nanostate_se")["se_hash"] == h1 and h.uns("note") == "keep me"
        assert list(h.column("cell_type")[:2]) == ["a", "b"]
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), Z, atol=1e-5)  # batch size does not matter
    with h5py.File(a, "r") as f:
        assert "X_state" not in f["obsm"]  # --output leaves the source alone
    os.chmod(a, 0o444)
    with pytest.raises(SystemExit, match="read-only"):  # even as root: no in-place write
        embed.main(["transform", f"--ckpt={tmp_path}/r1", a])
    with h5py.File(a, "r") as f:
        assert "X_state" not in f["obsm"]
    with H5AD(str(tmp_path / "a2.h5ad")) as h:
        assert h.matrix("obsm/X_state").shape == (60, 22)

    m, mm = load_model(str(tmp_path / "r1"))
    ts = mm["recipe"]["target_sum"]  # fit saw prepared rows: transform normalises raw counts the same way
    assert ts == json.load(open(tmp_path / "pa" / "index.json"))["recipe"]["target_sum"]
    with H5AD(b) as h:
        gm = GeneMap(h, m.genes, quiet=True)
        C = h.matrix("X").block(0, 30)
        xv = torch.from_numpy(gm.to_vocab(np.log1p(C * (ts / C.sum(1, keepdims=True))).astype(np.float32)))
    valid = torch.from_numpy(gm.valid()).expand(30, -1)
    with torch.no_grad():
        ref = m.embed(xv, valid, torch.arange(30), 0, torch.full((30,), gm.cls_gene())).numpy()
    assert Z.shape == (30, 22)
    np.testing.assert_allclose(Z, ref, atol=1e-5)
    assert not np.allclose(Z[0], Z[1])


def test_losses_are_unsquared_norms():
    m = _model()
    x = torch.from_numpy(_counts(6, 40, seed=4))
    valid = torch.ones(6, 40, dtype=torch.bool)
    rows = torch.arange(6)
    m.decode = lambda z, ds, genes, rda: torch.zeros(genes.shape)  # yhat = 0: the losses are norms of y
    _, parts = m(x, valid, rows, 3)
    _, y = task_genes(to_log1p(x), valid, 6, 6, 5, rows, 3)
    assert torch.allclose(parts["gene"], y.norm(dim=1).mean())  # per cell over its 17 task genes
    assert torch.allclose(parts["cell"], y[:, -5:].norm(dim=0).mean())  # per shared gene over cells


def test_se_run_edited_or_moved_and_bad_settings_are_one_line(tmp_path, capsys):
    """SE settings out of range are a UserError (were asserts); an SE run whose meta.json was edited (wrong
    types, a key missing, a config or gene list its weights do not fit) is refused by transform and by fit
    --resume, naming what; --resume below the run's step is refused (it ended doing nothing); a moved run
    folder does not report its --out as a changed setting."""
    import shutil

    import embed
    from state.errors import UserError
    for kw in (dict(d_model=15), dict(norm="x"), dict(pad_length=1), dict(dropout=1.5), dict(n_layer=-1)):
        with pytest.raises(UserError, match="SE model settings out of range"):
            SEConfig(**{**MICRO, **kw})
    a, common = _micro_se_run(tmp_path, 3)
    with pytest.raises(SystemExit, match="--max_steps=2 is below the checkpoint's step 3"):
        embed.main(["fit", *common, f"--out={tmp_path}/r1", "--resume", "--max_steps=2"])
    shutil.copytree(tmp_path / "r1", tmp_path / "moved", symlinks=True)
    capsys.readouterr()
    embed.main(["fit", *common, f"--out={tmp_path}/moved", "--resume", "--max_steps=4"])
    assert "changed settings (applied from this step on): max_steps 3 -> 4" in capsys.readouterr().out
    edits = [("config", lambda m: m.update(config="x"), "'config' is str"),
             ("dstr", lambda m: m["config"].update(d_model="16"), "d_model='16', not a int"),
             ("dother", lambda m: m["config"].update(d_model=32), "not of one run"),
             ("nogenes", lambda m: m.pop("genes"), "'genes' is NoneType, not list (missing)"),
             ("genes", lambda m: m.update(genes=m["genes"][:-1]), "gene table 'emb' is (20, 6) for the 19 genes"),
             ("recipe", lambda m: m.update(recipe=3), "'recipe' is int"),
             ("heads", lambda m: m["config"].update(n_head=3), "d_model must divide by n_head")]
    for name, edit, want in edits:
        r = _edited_copy(tmp_path, name, edit)
        with pytest.raises((SystemExit, UserError), match=want.replace("(", r"\(").replace(")", r"\)")):
            embed.main(["transform", f"--ckpt={r}", a, f"--output={tmp_path / 'o.h5ad'}"])
        assert not (tmp_path / "o.h5ad").exists()
        if name != "dother":  # a resume compares --d_model with the run's config first
            with pytest.raises((SystemExit, UserError), match=want.replace("(", r"\(").replace(")", r"\)")):
                embed.main(["fit", *common, f"--out={r}", "--resume", "--max_steps=4"])


def test_se_resume_of_a_meta_json_without_its_fit_settings(tmp_path):
    """embed.py fit --resume of a run whose meta.json lost 'fit', 'gene_emb' or fit's grad_accum: KeyError
    tracebacks before; one line naming meta.json now."""
    import embed
    from state.errors import UserError
    a, common = _micro_se_run(tmp_path, 2)
    for name, edit, want in (("fit", lambda m: m.pop("fit"), "'fit' is NoneType"),
                             ("gene_emb", lambda m: m.pop("gene_emb"), "'gene_emb' is NoneType"),
                             ("accum", lambda m: m["fit"].pop("grad_accum"), "no grad_accum count")):
        r = _edited_copy(tmp_path, name, edit)
        with pytest.raises((SystemExit, UserError), match=want):
            embed.main(["fit", *common, f"--out={r}", "--resume", "--max_steps=3"])


def _micro_se_run(tmp_path, steps):
    """A tiny atlas file, prepared, and an embed.py fit run of it in tmp_path/r1: -> (h5ad path, fit options)."""
    import embed
    from state.prepare import prepare
    a = _h5ad(str(tmp_path / "a.h5ad"), _counts(60, 20, seed=1), [f"Gene{i}" for i in range(20)])
    prepare(a, tmp_path / "pa", pert_col="")
    common = [f"--data={tmp_path / 'pa'}", "--batch_size=8", f"--max_steps={steps}", "--pca_dim=6", "--val_cells=4",
              "--eval_every=100", "--save_every=100", "--log_every=100", "--d_model=16", "--ff=32", "--n_head=2",
              "--n_layer=1", "--d_out=12", "--pad_length=16", "--count_hidden=8", "--P=4", "--N=4", "--S=4"]
    embed.main(["fit", *common, f"--out={tmp_path}/r1"])
    return a, common


def _edited_copy(tmp_path, name, edit):
    """A copy of the run tmp_path/r1 as tmp_path/name whose meta.json went through edit(meta)."""
    import shutil
    r = tmp_path / name
    shutil.copytree(tmp_path / "r1", r, symlinks=True)
    p = os.path.realpath(r / "meta.json")
    m = json.load(open(p))
    edit(m)
    json.dump(m, open(p, "w"))
    return r
