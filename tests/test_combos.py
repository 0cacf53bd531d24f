"""Combinations (issue 13): labels encoded from their parts, the combo split and its reorder check, the
additive baseline, and training on the Norman19 K562 doubles of the shared perturbench file."""
import numpy as np
import pytest
import torch

from state.baselines import additive, perturbation_mean, real_pair, shift_table
from state.h5ad import write_h5ad
from state.perts import combo_table, parts_of
from state.prepare import prepare
from state.splits import make_split


def test_combo_table_onehot_and_features(tmp_path):
    names = ["ctrl", "A", "B", "A+B", "C+A"]
    T, parts = combo_table(names, "ctrl", "+")
    assert parts == ["ctrl", "A", "B", "C"]
    np.testing.assert_array_equal(T.numpy(), [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 1, 1, 0], [0, 1, 0, 1]])
    Tm, _ = combo_table(names, "ctrl", "+", reduce="mean")
    np.testing.assert_allclose(Tm[3].numpy(), [0, 0.5, 0.5, 0])
    from safetensors.torch import save_file
    f = tmp_path / "f.safetensors"
    save_file({"A": torch.tensor([1.0, 0.0]), "B": torch.tensor([0.0, 2.0]), "C": torch.tensor([3.0, 3.0])}, str(f))
    Tf, _ = combo_table(names, "ctrl", "+", features=str(f))
    np.testing.assert_allclose(Tf.numpy(), [[0, 0], [1, 0], [0, 2], [1, 2], [4, 3]])  # control: zero vector
    save_file({"A": torch.tensor([1.0, 0.0]), "B": torch.tensor([0.0, 2.0])}, str(f))
    with pytest.raises(KeyError, match="part 'C' of label 'C\\+A'"):
        combo_table(names, "ctrl", "+", features=str(f))
    assert parts_of("A|B", "|") == ["A", "B"] and parts_of("A+B", "") == ["A+B"]


def _combo_file(path, n=40, seed=0):
    """Synthetic log1p data whose double is exactly additive: mu + dA + dB (+ small noise)."""
    rng = np.random.default_rng(seed)
    G = 20
    mu = rng.uniform(3, 4, G)  # far from 0: no clipping, so the double is exactly additive
    d = {"A": rng.normal(0, 0.5, G), "B": rng.normal(0, 0.5, G), "C": rng.normal(0, 0.5, G)}
    labels = {"ctrl": mu, "A": mu + d["A"], "B": mu + d["B"], "C": mu + d["C"], "A+C": mu + d["A"] + d["C"],
              "A+B": mu + d["A"] + d["B"], "B+C": mu + d["B"] + d["C"]}
    X, lab = [], []
    for k, m in labels.items():
        X.append(np.clip(m + rng.normal(0, 0.05, (n, G)), 0, None))
        lab += [k] * n
    write_h5ad(path, np.concatenate(X).astype(np.float32), [f"c{i}" for i in range(len(lab))],
               [f"g{j}" for j in range(G)], obs={"perturbation": np.array(lab, object)})
    return mu, d


def test_combo_split_reorder_check_and_additive_baseline(tmp_path):
    mu, d = _combo_file(tmp_path / "c.h5ad")
    data = prepare(tmp_path / "c.h5ad", tmp_path / "p", control="ctrl")
    s = make_split(data, "combo", test_perts=["A+B"])
    assert s.test_groups == [("all", "A+B")] and s.combo_sep == "+"
    assert set(data.pert[s.train].tolist()) == set(range(len(data.pert_names))) - {data.pert_names.index("A+B")}
    default = make_split(data, "combo")  # every double whose singles were measured
    assert sorted(p for _, p in default.test_groups) == ["A+B", "A+C", "B+C"]
    # additive: control + dA + dB from the training singles; the perturbation mean has no other context
    X, obs = additive(data, s)
    Xr, _ = real_pair(data, s)
    isp = obs["is_predicted"]
    real = Xr[:isp.sum()].mean(0)
    err_add = np.abs(X[isp].mean(0) - real).mean()
    err_pm = np.abs(perturbation_mean(data, s)[0][isp].mean(0) - real).mean()
    assert err_add < 0.05 < err_pm
    T = shift_table(data, s.train, "additive")
    np.testing.assert_allclose(T[0, data.pert_names.index("A+B")], d["A"] + d["B"], atol=0.1)  # 4 means of ~36 cells
    # a test double that trains under a reordered name is refused
    mu, _ = _combo_file(tmp_path / "r.h5ad")
    from state.h5ad import H5AD
    with H5AD(tmp_path / "r.h5ad") as h:
        lab = np.asarray(h.column("perturbation")).astype(object)
        X = h.matrix("X").block(0, h.n_obs)
    lab[lab == "B+C"] = "C+B"  # now "C+B" ... and add a "B+C" group
    lab[np.flatnonzero(lab == "A+C")[:20]] = "B+C"
    write_h5ad(tmp_path / "r2.h5ad", X, [f"c{i}" for i in range(len(lab))], [f"g{j}" for j in range(X.shape[1])],
               obs={"perturbation": lab})
    r = prepare(tmp_path / "r2.h5ad", tmp_path / "pr", control="ctrl")
    with pytest.raises(ValueError, match="test combination 'B\\+C' in context 'all' trains as 'C\\+B'"):
        make_split(r, "combo", test_perts=["B+C"])
    with pytest.raises(ValueError, match="not combination labels"):
        make_split(r, "combo", test_perts=["A"])


@pytest.mark.slow
def test_norman_doubles_train_and_predict(tmp_path):
    """The Norman19 K562 part of the shared file: the 5 doubles with both singles measured are the
    default test set; a run with --combos=+ encodes them multi-hot, trains, and predicts them."""
    from conftest import real_file, run_script
    from state.splits import Split
    p = real_file("gbm")
    data = prepare(p, tmp_path / "prep", pert_col="perturbation", control="control", context_col="cell_type",
                   keep={"cell_type": ["k562"]})
    s = make_split(data, "combo")
    assert len(s.test_groups) == 5 and all("+" in q for _, q in s.test_groups)
    s.save(tmp_path / "split.json")
    run_script("train.py", f"--data={tmp_path / 'prep'}", f"--split={tmp_path / 'split.json'}", "--preset=tiny",
               "--combos=+", "--anchor=additive", "--max_steps=20", f"--out={tmp_path / 'run'}")
    import json
    meta = json.load(open(tmp_path / "run" / "meta.json"))
    assert meta["combos"] == "+" and len(meta["combo_parts"]) == meta["st"]["n_pert"] == 32
    run_script("predict.py", "test", f"--run={tmp_path / 'run'}", f"--data={tmp_path / 'prep'}",
               f"--split={tmp_path / 'split.json'}", f"--out={tmp_path / 'pred'}")
    from state.h5ad import H5AD
    with H5AD(tmp_path / "pred" / "pred.h5ad") as f:
        lab = np.asarray(f.column("perturbation")).astype(str)
        isp = f.column("is_predicted").astype(bool)
    assert sorted(set(lab[isp])) == sorted(q for _, q in Split.load(tmp_path / "split.json").test_groups)
    # a virtual screen of a combination that is in no data: multi-hot from its singles (non-anchored run)
    run_script("train.py", f"--data={tmp_path / 'prep'}", f"--split={tmp_path / 'split.json'}", "--preset=tiny",
               "--combos=+", "--max_steps=5", f"--out={tmp_path / 'plain'}")
    labels = set(meta["pert_names"])
    singles = [q for q in meta["combo_parts"][1:] if q in labels]
    new = next(f"{a}+{b}" for a in singles for b in singles if a < b and f"{a}+{b}" not in labels
               and f"{b}+{a}" not in labels)
    ctrl = tmp_path / "pred" / "real.h5ad"
    sim = ["predict.py", "simulate", f"--adata={ctrl}", "--n_cells=10"]
    r = run_script(*sim, f"--run={tmp_path / 'plain'}", f"--perts={new}", f"--out={tmp_path / 's.h5ad'}")
    assert "new combinations from their singles" in r.stdout
    with H5AD(tmp_path / "s.h5ad") as f:
        assert new in set(np.asarray(f.column("perturbation")).astype(str))
    r = run_script(*sim, f"--run={tmp_path / 'plain'}", f"--perts={singles[0]}+NOPE", f"--out={tmp_path / 'x.h5ad'}",
                   ok=False)
    assert r.returncode != 0 and "single(s) ['NOPE'] that the run never saw" in r.stderr
    r = run_script(*sim, f"--run={tmp_path / 'run'}", f"--perts={new}", f"--out={tmp_path / 'y.h5ad'}", ok=False)
    assert r.returncode != 0 and "anchored" in r.stderr
