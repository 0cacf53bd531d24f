"""ST on an embedding with the gene decoder, end to end (issue 8 item 4, issue 4 item 1): synthetic data
with a fake obsm embedding (a fixed random projection of log1p X) -> prepare --key obsm/X_emb --genes-key X
-> split -> train.py (decoder loss `dec` logged, output genes in meta.json) -> predict.py test writes the
pred/real pair in GENE space (decoded, clipped; real = the stored gene rows of the test cells) with the
embedding predictions in obsm. Budget: ~15 s on 2 cores (3 subprocesses)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from state.h5ad import H5AD
from state.prepare import prepare
from state.splits import make_split
from state.synth import make_synthetic

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"{args} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def read(path):
    with H5AD(path) as h:
        return (h.matrix("X").block(0, h.n_obs), list(h.var_names()), np.asarray(h.obs_names).astype(str),
                {k: h.f["obsm"][k][:] for k in (h.f["obsm"] if "obsm" in h.f else [])},
                h.uns("nanostate"), np.asarray(h.column("is_predicted")).astype(bool))


@pytest.mark.slow
def test_embedding_with_gene_decoder_end_to_end(tmp_path):
    import h5py
    p = tmp_path / "s.h5ad"
    make_synthetic(p, n_cells=900, n_genes=30, n_perts=4, n_contexts=2, seed=3)
    with H5AD(p) as h:
        X = h.matrix("X").block(0, h.n_obs)
        file_genes = list(h.var_names().astype(str))
    E = (X @ np.random.default_rng(0).normal(0, 1, (X.shape[1], 8))).astype(np.float32)  # signed "X_state"
    with h5py.File(p, "a") as f:
        f.require_group("obsm").create_dataset("X_emb", data=E)
    D = prepare(p, tmp_path / "prep", key="obsm/X_emb", genes_key="X", pert_col="perturbation",
                control="control", context_col="cell_type")
    ref = prepare(p, tmp_path / "ref", pert_col="perturbation", control="control", context_col="cell_type")
    assert D.n_genes == 8 and D.gene_names_out == file_genes == ref.genes
    sp = make_split(D, task="fewshot", context=D.context_names[0], support=0.3, seed=0)
    sp.save(tmp_path / "split.json")
    common = [f"--data={tmp_path / 'prep'}", f"--split={tmp_path / 'split.json'}", "--preset=tiny",
              "--max_steps=6", "--log_every=2", "--val_every=0", "--val_batches=2", "--batch_size=4",
              "--decoder_hidden=[32]", "--threads=1"]
    run_dir = tmp_path / "run"
    r = run("train.py", *common, f"--out={run_dir}")
    assert "gene decoder: 8 -> [32] -> 30 genes ('X')" in r.stdout
    assert "| dec " in r.stdout and "val_dec" in r.stdout
    log = [json.loads(l) for l in open(run_dir / "log.jsonl")]
    assert all(np.isfinite(l["dec"]) and l["dec"] > 0 for l in log if "loss" in l)
    meta = json.load(open(run_dir / "meta.json"))
    assert meta["genes_out"] == file_genes and meta["genes_key"] == "X" and meta["st"]["n_genes"] == 30
    assert meta["genes"] == D.genes and meta["gene_space"] is False

    out = tmp_path / "test"
    r = run("predict.py", "test", f"--run={run_dir}", f"--data={tmp_path / 'prep'}",
            f"--split={tmp_path / 'split.json'}", f"--out={out}")
    assert "30 decoded genes" in r.stdout
    Xp, vp, np_, mp, up, ip = read(out / "pred.h5ad")
    Xr, vr, nr, mr, ur, ir = read(out / "real.h5ad")
    assert vp == vr == file_genes and Xp.shape[1] == Xr.shape[1] == 30
    assert Xp.min() >= 0 and Xp.max() <= 14 and up["clip"] == "0,14" and up["space"] == "gene (decoded)"
    n_pred = int(ip.sum())
    assert n_pred == len(sp.test) - int((D.pert[np.asarray(sp.test)] == D.control_code).sum())
    assert mp["X_state_pred"].shape == (len(Xp), 8) and mr["X_state"].shape == (len(Xr), 8)
    assert (mp["X_state_pred"][:n_pred] < 0).any()  # signed embedding predictions, not ReLU'd/clipped
    # real = the stored gene rows (gene space, not the embedding) of the test cells, by cell name
    pos = {n: i for i, n in enumerate(ref.obs_names)}
    np.testing.assert_array_equal(Xr, ref.rows([pos[n] for n in nr]))
    np.testing.assert_array_equal(mr["X_state"], D.rows([pos[n] for n in nr]))
    # real controls are copied through in gene space in pred too
    np.testing.assert_array_equal(Xp[~ip], ref.rows([pos[n] for n in np_[~ip]]))

    # the same data without the decoder: embedding outputs, not clipped, and uns says so
    r = run("train.py", *common, f"--out={tmp_path / 'run_nodec'}", "--decoder=False", "--max_steps=2")
    assert "but --decoder=False" in r.stdout and "| dec " not in r.stdout
    run("predict.py", "test", f"--run={tmp_path / 'run_nodec'}", f"--data={tmp_path / 'prep'}",
        f"--split={tmp_path / 'split.json'}", f"--out={tmp_path / 'test_nodec'}")
    Xe, ve, _, me, ue, ie = read(tmp_path / "test_nodec" / "pred.h5ad")
    assert ve == D.genes and Xe.shape[1] == 8 and "X_state_pred" not in me
    assert ue["clip"] == "none" and ue["space"] == "embedding" and (Xe[ie] < 0).any()
