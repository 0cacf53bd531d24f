"""Splits: few-shot / zero-shot / unseen, validation, TOML in and out, on the GBM lines and synthetic data."""
import numpy as np
import pytest

from state.prepare import prepare
from state.sampler import SetSampler
from state.splits import Split, main, make_split, read_toml
from state.synth import make_synthetic


@pytest.fixture(scope="module")
def gbm(tmp_path_factory):
    from conftest import real_file
    p = real_file("gbm")
    return prepare(p, tmp_path_factory.mktemp("gbm") / "p", keep={"cell_type": ["A172", "T98G", "U87MG"]})


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    make_synthetic(d / "s.h5ad", n_cells=1200, n_genes=40, n_perts=10, n_contexts=3, seed=1)
    return prepare(d / "s.h5ad", d / "p")


def groups(data, rows):
    return {(data.context_names[c], data.pert_names[p]) for c, p in zip(data.context[rows], data.pert[rows])}


def test_fewshot_gbm_explicit_support(gbm):
    d = gbm
    s = make_split(d, "fewshot", context="U87MG", support_perts=["MAP2K3", "MAP2K6", "MAP3K21"])
    assert s.support == ["MAP2K3", "MAP2K6", "MAP3K21"]
    assert sorted(p for _, p in s.test_groups) == ["MAP4K3", "MAP4K5", "MAPK1", "PLK4", "SGK1", "TGFBR2"]
    assert all(c == "U87MG" for c, _ in s.test_groups)
    u87 = d.context_names.index("U87MG")
    assert (d.context[s.test] == u87).all() and (d.pert[s.test] != d.control_code).all()
    # every U87MG cell of a held-out knockdown is in test, none in train or val
    held = [d.pert_names.index(p) for _, p in s.test_groups]
    m = (d.context == u87) & np.isin(d.pert, held)
    assert set(np.flatnonzero(m)) == set(s.test.tolist())
    tr, te, va = groups(d, s.train), groups(d, s.test), groups(d, s.val)
    assert not (tr & te) and va <= tr
    assert ("U87MG", "MAP2K3") in tr and ("U87MG", "control") in tr
    # held-out controls are in test_ctrl and (most of them, minus val) in train
    assert set(s.test_ctrl.tolist()) == set(np.flatnonzero((d.context == u87) & (d.pert == 0)).tolist())
    assert len(np.intersect1d(s.test_ctrl, s.train)) >= 0.85 * len(s.test_ctrl)
    assert len(s.train) + len(s.val) + len(s.test) == d.n_cells
    rep = s.report(d)
    assert "U87MG" in rep and "U87MG/SGK1 100" in rep
    # the train rows feed a sampler; the test rows + test controls feed an eval sampler
    SetSampler(d, s.train, 32, 4).next()
    ev = SetSampler(d, np.concatenate([s.test, s.test_ctrl]), 32, 4, train=False, control_sets=False)
    assert {int(p) for b in ev for p in b["pert"]} == set(held)


def test_fewshot_fraction_deterministic(syn):
    a = make_split(syn, "fewshot", context="ctxB", support=0.3, seed=4)
    b = make_split(syn, "fewshot", context="ctxB", support=0.3, seed=4)
    c = make_split(syn, "fewshot", context="ctxB", support=0.3, seed=5)
    assert a.support == b.support and np.array_equal(a.test, b.test) and np.array_equal(a.val, b.val)
    assert len(a.support) == 3 and len(a.test_groups) == 7
    assert a.support != c.support or not np.array_equal(a.val, c.val)


def test_zeroshot(gbm):
    d = gbm
    s = make_split(d, "zeroshot", context="A172")
    a = d.context_names.index("A172")
    assert set(s.test.tolist()) == set(np.flatnonzero((d.context == a) & (d.pert != 0)).tolist())
    assert len(s.test_groups) == 9 and s.support == []
    assert np.all(np.isin(s.test_ctrl, np.concatenate([s.train, s.val])))  # its controls also train
    assert not np.any((d.context[s.train] == a) & (d.pert[s.train] != 0))


def test_unseen_needs_features(syn):
    with pytest.raises(ValueError, match="needs perturbation features"):
        make_split(syn, "unseen")
    feats = {p: np.ones(4) for p in syn.pert_names}
    s = make_split(syn, "unseen", features=feats, test_perts=["GENE0001", "GENE0004"])
    held = {syn.pert_names.index("GENE0001"), syn.pert_names.index("GENE0004")}
    assert set(syn.pert[s.test].tolist()) == held and not held & set(syn.pert[s.train].tolist())
    with pytest.raises(ValueError, match="no features for test perturbation"):
        make_split(syn, "unseen", features={"GENE0001": np.ones(4)}, test_perts=["GENE0001", "GENE0002"])
    # without test_perts the held-out ones are drawn among those with features (training ones need none
    # here: train.py decides, --missing_pert_features)
    s = make_split(syn, "unseen", features={"GENE0001": np.ones(4), "GENE0003": np.ones(4)}, test_frac=1.0)
    assert {p for _, p in s.test_groups} <= {"GENE0001", "GENE0003"}


def test_guard_perts_held_out_of_training_whole(syn, tmp_path):
    """guard_perts (unseen / combo): every cell of those perturbations is val, none trains, none is test;
    a count is drawn among the candidates with features; the field survives save/load; bad names refused."""
    feats = {p: np.ones(4) for p in syn.pert_names if p != syn.control}
    s = make_split(syn, "unseen", features=feats, test_perts=["GENE0001"], guard_perts=["GENE0002", "GENE0005"])
    g = {syn.pert_names.index(q) for q in ("GENE0002", "GENE0005")}
    tr, va, te = (set(syn.pert[r].tolist()) for r in (s.train, s.val, s.test))
    assert not g & tr and not g & te and g <= va
    assert (np.isin(syn.pert, list(g))).sum() == np.isin(syn.pert[s.val], list(g)).sum()  # all their cells
    gr = s.part("val", perts=list(g)).array()
    assert set(syn.pert[gr].tolist()) == g and len(gr) == np.isin(syn.pert, list(g)).sum()
    t = Split.load(s.save(tmp_path / "g.json")).validate(syn)
    assert t.guard_perts == ["GENE0002", "GENE0005"] and np.array_equal(t.val, s.val)
    assert np.array_equal(t.train, s.train)
    c = make_split(syn, "unseen", features={"GENE0001": 1, "GENE0002": 1, "GENE0003": 1},
                   test_perts=["GENE0001"], guard_perts=1, seed=3)
    assert len(c.guard_perts) == 1 and c.guard_perts[0] in ("GENE0002", "GENE0003")
    with pytest.raises(ValueError, match="not candidates"):
        make_split(syn, "unseen", features=feats, test_perts=["GENE0001"], guard_perts=["GENE0001"])
    with pytest.raises(ValueError, match="between 1 and"):
        make_split(syn, "unseen", features={"GENE0001": 1, "GENE0002": 1}, test_perts=["GENE0001"], guard_perts=1)
    with pytest.raises(ValueError, match="no candidates"):
        make_split(syn, "zeroshot", context=syn.context_names[0], guard_perts=1)
    bad = Split("unseen", None, s.test_groups, [], 0.1, 0, syn.checksum, None, ["GENE0001"])
    with pytest.raises(ValueError, match="also a support or test"):
        bad.validate(syn)


def test_fewshot_guard_perts_held_out_in_the_context_only(gbm, tmp_path):
    """fewshot guard_perts: drawn from the support, they leave it; their cells in the held-out context are
    all val (none trains, none is test), in the other contexts they train; the test groups are those of the
    same split without guard perturbations; at least one support perturbation must still train."""
    sup = ["MAP2K3", "MAP2K6", "MAP3K21"]
    s0 = make_split(gbm, "fewshot", context="U87MG", support_perts=sup)
    s = make_split(gbm, "fewshot", context="U87MG", support_perts=sup, guard_perts=["MAP2K6"])
    assert s.guard_perts == ["MAP2K6"] and s.support == ["MAP2K3", "MAP3K21"] and s.test_groups == s0.test_groups
    k, q = gbm.context_names.index("U87MG"), gbm.pert_names.index("MAP2K6")
    cell = (gbm.context == k) & (gbm.pert == q)
    assert not cell[s.train].any() and not cell[s.test].any() and cell[s.val].sum() == cell.sum()
    other = (gbm.context != k) & (gbm.pert == q)
    assert other[s.train].sum() > 0.8 * other.sum()  # trains elsewhere (less its val fraction)
    g = s.part("val", contexts=[k], perturbed=True, perts=[q]).array()
    assert len(g) == cell.sum()
    t = Split.load(s.save(tmp_path / "g.json")).validate(gbm)
    assert np.array_equal(t.train, s.train) and np.array_equal(t.val, s.val) and t.support == s.support
    d = make_split(gbm, "fewshot", context="U87MG", support_perts=sup, guard_perts=1, seed=4)
    assert len(d.guard_perts) == 1 and d.guard_perts[0] in sup and len(d.support) == 2
    with pytest.raises(ValueError, match="0 candidates"):
        make_split(gbm, "fewshot", context="U87MG", support=0, guard_perts=1)
    with pytest.raises(ValueError, match="leave at least one"):
        make_split(gbm, "fewshot", context="U87MG", support_perts=sup, guard_perts=sup)
    with pytest.raises(ValueError, match="not candidates"):
        make_split(gbm, "fewshot", context="U87MG", support_perts=sup, guard_perts=["SGK1"])
    # a split whose guard perturbation has no cells in the held-out context (a K562-only one, with K562 in
    # the data) would guard nothing: refused, not ignored
    from conftest import real_file
    full = prepare(real_file("gbm"), tmp_path / "full")
    ok = make_split(full, "fewshot", context="U87MG", support_perts=sup)
    bad = Split("fewshot", "U87MG", ok.test_groups, ok.support, 0.1, 0, full.checksum, None, ["KLF1"])
    with pytest.raises(ValueError, match=r"guard perturbation 'KLF1' has no cells to hold out in the held-out"):
        bad.validate(full)


def test_pca_features_from_measured_target_genes(tmp_path):
    """--pert_features=pca: a perturbation named after a measured gene gets that gene's loadings on the
    training cells' principal axes; the others are reported, and train.py refuses them unless zero."""
    from state.perts import pca_pert_features, target_gene
    d = tmp_path
    make_synthetic(d / "s.h5ad", n_cells=600, n_genes=30, n_perts=5, n_contexts=2, seed=2)
    data = prepare(d / "s.h5ad", d / "p")
    names = [p for p in data.pert_names if p != data.control] + ["NOTAGENE"]
    f, lacking = pca_pert_features(data, np.arange(data.n_cells), names, d=8)
    assert lacking == ["NOTAGENE"] and set(f) == set(names) - {"NOTAGENE"}
    assert all(v.shape == (8,) for v in f.values()) and not np.allclose(f[names[0]], f[names[1]])
    assert target_gene("CRISPRi:STAT1") == "STAT1"


def test_bad_splits(syn, gbm):
    with pytest.raises(ValueError, match="context 'nowhere' not in"):
        make_split(syn, "fewshot", context="nowhere")
    with pytest.raises(ValueError, match="which context"):
        make_split(syn, "fewshot")
    with pytest.raises(ValueError, match=r"support perturbation\(s\) \['BOGUS'\]"):
        make_split(syn, "fewshot", context="ctxA", support_perts=["BOGUS"])
    with pytest.raises(ValueError, match="empty split"):
        make_split(syn, "fewshot", context="ctxA", support=1.0)
    with pytest.raises(ValueError, match="task 'x'"):
        make_split(syn, "x", context="ctxA")
    for kw, msg in ((dict(support=-0.5), "support=-0.5"), (dict(val_frac=1.5), "val_frac=1.5"),
                    (dict(val_frac=-0.2), "val_frac=-0.2")):
        with pytest.raises(ValueError, match=msg):
            make_split(syn, "fewshot", context="ctxA", **kw)
    # a split is group ids: rows cannot leak by construction; what a file can get wrong is named
    s = make_split(gbm, "fewshot", context="U87MG", support=0.3)
    assert not np.intersect1d(s.test, s.train).size and not np.intersect1d(s.train, s.val).size
    assert not groups(gbm, s.train) & groups(gbm, s.test)
    for bad, msg in (([("U87MG", "NOPE")], "perturbation 'NOPE' not in"), ([("U99", "SGK1")], "context 'U99' not in"),
                     ([("U87MG", "control")], "is the control"), ([], "no test cells")):
        with pytest.raises(ValueError, match=msg):
            Split(s.task, s.context, bad, s.support, checksum=s.checksum).validate(gbm)
    with pytest.raises(ValueError, match="split was made for prepared data"):
        s.validate(syn)


def test_split_file_is_small_and_old_files_are_refused(gbm, tmp_path):
    s = make_split(gbm, "zeroshot", context="A172")
    p = s.save(tmp_path / "s.json")
    assert p.stat().st_size < 2000  # group ids, not row indices
    (tmp_path / "old.json").write_text('{"task": "zeroshot", "context": "A172", "train": [0, 1], "val": []}')
    with pytest.raises(ValueError, match="older format"):
        Split.load(tmp_path / "old.json")
    # val: floor(val_frac * n) cells of each training group, disjoint from train, the same every load
    t = Split.load(p).validate(gbm)
    assert np.array_equal(t.val, s.val) and np.array_equal(t.train, s.train)
    gt = gbm.group_table
    n_tr = gt[:, 4] - gt[:, 3]
    tr = ~((gt[:, 0] == gbm.context_names.index("A172")) & (gt[:, 1] != 0))
    assert len(s.val) == int(np.where(n_tr[tr] >= 2, np.floor(0.1 * n_tr[tr]), 0).sum())
    assert len(s.train) + len(s.val) + len(s.test) == gbm.n_cells


def test_save_load_toml_roundtrip(gbm, tmp_path):
    s = make_split(gbm, "fewshot", context="U87MG", support=0.3, seed=2)
    s2 = Split.load(s.save(tmp_path / "s.json")).validate(gbm)
    for k in ("train", "val", "test", "test_ctrl"):
        assert np.array_equal(getattr(s, k), getattr(s2, k))
    assert s2.test_groups == s.test_groups and s2.support == s.support
    t = read_toml(s.write_toml(tmp_path / "s.toml", gbm), gbm)
    assert np.array_equal(t.test, s.test) and t.task == "fewshot" and t.support == s.support


def test_reference_toml(gbm, tmp_path):
    (tmp_path / "z.toml").write_text(f'[datasets]\ngbm = "{gbm.dir}"\n'
                                     '[training]\ngbm = "train"\n'
                                     '[zeroshot]\n"gbm.T98G" = "test"\n'
                                     '[fewshot."gbm.U87MG"]\nval = ["SGK1"]\ntest = ["SGK1", "PLK4"]\n')
    s = read_toml(tmp_path / "z.toml", gbm)
    t98, u87 = gbm.context_names.index("T98G"), gbm.context_names.index("U87MG")
    assert {c for c, _ in s.test_groups} == {"T98G", "U87MG"}
    assert sorted(p for c, p in s.test_groups if c == "U87MG") == ["PLK4", "SGK1"]
    assert len([1 for c, _ in s.test_groups if c == "T98G"]) == 9
    assert set(gbm.context[s.test_ctrl].tolist()) == {t98, u87}
    (tmp_path / "b.toml").write_text(f'[datasets]\ngbm = "{gbm.dir}"\n'
                                     '[training]\ngbm = "train"\n'
                                     '[fewshot."gbm.u87mg"]\ntest = ["SGK1"]\n')
    with pytest.raises(ValueError, match="context 'u87mg' not found"):
        read_toml(tmp_path / "b.toml", gbm)
    (tmp_path / "c.toml").write_text(f'[datasets]\ngbm = "{gbm.dir}"\n'
                                     '[training]\ngbm = "train"\n'
                                     '[fewshot."gbm.U87MG"]\ntest = ["SGK2"]\n')
    with pytest.raises(ValueError, match="'SGK2' matches zero cells"):
        read_toml(tmp_path / "c.toml", gbm)
    (tmp_path / "d.toml").write_text(f'[datasets]\ngbm = "{gbm.dir}"\n'
                                     '[training]\ngbm = "train"\n')
    with pytest.raises(ValueError, match="nothing is held out"):
        read_toml(tmp_path / "d.toml", gbm)
    # every bad TOML is a named error
    (tmp_path / "e.toml").write_text('[datasets]\ngbm = "/no/such/dir"\n[training]\ngbm = "train"\n')
    with pytest.raises(ValueError, match="e.toml: .datasets. gbm = '/no/such/dir' does not exist"):
        read_toml(tmp_path / "e.toml", gbm)
    (tmp_path / "f.toml").write_text(f'[datasets]\ngbm = "{gbm.dir}"\n[training]\nother = "train"\n')
    with pytest.raises(ValueError, match=r"f.toml: \[training\] names dataset\(s\) \['other'\]"):
        read_toml(tmp_path / "f.toml", gbm)
    (tmp_path / "g.toml").write_text(f'[datasets]\ngbm = "{gbm.dir}"\n[training]\ngbm = "train"\n'
                                     '[zeroshot]\n"gbm.T98G" = "test"\n"gbm.U87MG" = "test"\n"gbm.A172" = "test"\n')
    with pytest.raises(ValueError, match="every perturbed cell is held out"):
        read_toml(tmp_path / "g.toml", gbm)
    with pytest.raises(ValueError, match="missing.toml not found"):
        read_toml(tmp_path / "missing.toml", gbm)
    (tmp_path / "h.toml").write_text('[datasets\ngbm = 1\n')
    with pytest.raises(ValueError, match="h.toml: not valid TOML"):
        read_toml(tmp_path / "h.toml", gbm)


def test_cli(syn, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["make", f"--data={syn.dir}", "--task=zeroshot", "--context=ctxC", f"--out={out}"]) == 0  # --key=value
    assert main(["make", "--data", str(syn.dir), "--task", "combo", "--combo-sep", "+", "--out", str(out)]) == 2  # old
    assert "no label of" in capsys.readouterr().err  # the old --key-name spelling still parses (and this data has no combos)
    assert main(["make", f"--data={syn.dir}", "--task=zeroshot", "--context=ctxC", f"--out={out}"]) == 0
    assert out.exists() and (tmp_path / "s.toml").exists()
    assert main(["report", "--data", str(syn.dir), "--split", str(out)]) == 0
    assert main(["toml", "--data", str(syn.dir), "--toml", str(tmp_path / "s.toml"), "--out", str(tmp_path / "t.json")]) == 0
    assert np.array_equal(Split.load(out).validate(syn).test, Split.load(tmp_path / "t.json").validate(syn).test)
    assert main(["make", "--data", str(syn.dir), "--task", "unseen", "--out", str(out)]) == 2
    assert "needs perturbation features" in capsys.readouterr().err
