"""train.py + predict.py end to end (subprocesses, as a user runs them): synthetic data -> prepare ->
split -> train -> exact resume -> predict test (pred/real pair) -> simulate. Budget: ~60 s on 2 cores."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import make_synth_prepared, run_script
import torch



def run(*args, ok=True):
    return run_script(*args, ok=ok)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synth_prepared(tmp_path_factory.mktemp("synth"))


def args(d, out, steps, *extra):
    return ["train.py", f"--data={d / 'prep'}", f"--split={d / 'split.json'}", "--preset=tiny",
            f"--out={out}", f"--max_steps={steps}", "--log_every=1", "--val_every=4", "--val_batches=2",
            "--ckpt_every=100", "--batch_size=4", *extra]


def losses(out):
    return [json.loads(l) for l in open(Path(out) / "log.jsonl")]


@pytest.mark.slow
def test_train_resume_predict(synth, tmp_path):
    d = synth
    full, part = tmp_path / "full", tmp_path / "part"
    r = run(*args(d, full, 10))
    assert "set_float32_matmul_precision" in r.stdout
    assert "cells/s" in r.stdout and "eta" in r.stdout and "val_loss" in r.stdout
    for f in ("model.safetensors", "meta.json", "state.pt", "log.jsonl"):
        assert (full / f).exists(), f
    meta = json.load(open(full / "meta.json"))
    assert meta["step"] == 10 and meta["st"]["hidden"] == 64
    for k in ("genes", "pert_names", "data_checksum", "split_hash", "pert_col", "control"):
        assert meta[k], k
    # an existing run dir without --resume is an error; unknown keys and bad types are errors
    assert run(*args(d, full, 10), ok=False).returncode != 0
    r = run(*args(d, tmp_path / "x", 1, "--no_such_key=3"), ok=False)
    assert r.returncode != 0 and "unknown config key" in r.stderr
    r = run(*args(d, tmp_path / "x", 1, "--lr=abc"), ok=False)
    assert r.returncode != 0 and "expected float" in r.stderr
    # interrupted at step 5, resumed to 10: same batches, same losses, same weights
    run(*args(d, part, 5))
    run(*args(d, part, 10, "--resume"))
    a = [x for x in losses(full) if "loss" in x]
    b = {x["step"]: x["loss"] for x in losses(part) if "loss" in x}
    for x in a:
        assert abs(b[x["step"]] - x["loss"]) <= 1e-5 * max(1.0, abs(x["loss"])), (x, b[x["step"]])
    va = [x["val_loss"] for x in losses(full) if "val_loss" in x]
    vb = [x["val_loss"] for x in losses(part) if "val_loss" in x]
    assert va[-1] == pytest.approx(vb[-1], rel=1e-5)
    from safetensors.torch import load_file
    wa, wb = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)
    # the losses are not all equal (the test could fail): training moves them
    assert len({round(x["loss"], 6) for x in a}) > 1

    # predict test: pred/real pair in the DESIGN contract
    out = tmp_path / "pred"
    r = run("predict.py", "test", f"--run={full}", f"--data={d / 'prep'}", f"--split={d / 'split.json'}",
            f"--out={out}")
    assert "spread" in r.stdout
    from state.data import Prepared
    from state.h5ad import H5AD
    from state.splits import Split
    D = Prepared(d / "prep")
    sp = Split.load(d / "split.json").validate(D)
    n_test = int((D.pert[sp.test] != D.control_code).sum())
    n_ctrl = len(sp.test_ctrl)
    with H5AD(out / "pred.h5ad") as p, H5AD(out / "real.h5ad") as q:
        assert p.n_obs == q.n_obs == n_test + n_ctrl
        assert list(p.var_names()) == list(q.var_names()) == list(D.genes)
        Xp = p.matrix("X").block(0, p.n_obs)
        assert Xp.shape == (n_test + n_ctrl, D.n_genes) and Xp.min() >= 0 and Xp.max() <= 14
        pc, cc = D.pert_col, D.context_col
        for f in (p, q):
            assert {pc, cc, "is_predicted"} <= set(f.columns())
        assert "ctrl_cell_barcode" in p.columns()
        lp, lq = np.asarray(p.column(pc)).astype(str), np.asarray(q.column(pc)).astype(str)
        # same label multiset: every real test cell has one prediction, controls copied in both
        assert sorted(lp) == sorted(lq)
        want = {(D.context_names[c], D.pert_names[k]) for c, k in zip(D.context[sp.test], D.pert[sp.test])
                if k != D.control_code}
        got = set(zip(np.asarray(p.column(cc)).astype(str)[p.column("is_predicted").astype(bool)],
                      lp[p.column("is_predicted").astype(bool)]))
        assert got == want
        assert (lp[~p.column("is_predicted").astype(bool)] == D.control).all()
        assert not q.column("is_predicted").astype(bool).any()
        # the real file's perturbed cells are the data's rows
        Xq = q.matrix("X").block(0, q.n_obs)
        names = np.asarray(q.obs_names).astype(str)
        pos = {n: i for i, n in enumerate(D.obs_names)}
        np.testing.assert_allclose(Xq[:5], D.rows(np.array([pos[n] for n in names[:5]])), atol=1e-6)
        u = p.uns("nanostate")
        assert u["pert_col"] == pc and u["control"] == D.control
        assert u["center"] is True
        isp = p.column("is_predicted").astype(bool)
        cb = np.asarray(p.column("ctrl_cell_barcode")).astype(str)
        pctx = np.asarray(p.column(cc)).astype(str)
    # recentred (the default) against raw outputs (--center=False): each group moved by one row, the mean
    # of the context's training controls (the pool) less that of the controls it was drawn from (clipped
    # entries aside)
    run("predict.py", "test", f"--run={full}", f"--data={d / 'prep'}", f"--split={d / 'split.json'}",
        f"--out={tmp_path / 'raw'}", "--center=False")
    with H5AD(tmp_path / "raw" / "pred.h5ad") as f:
        X0 = f.matrix("X").block(0, f.n_obs)
        assert f.uns("nanostate")["center"] is False
    np.testing.assert_array_equal(X0[~isp], Xp[~isp])  # real controls as they are
    pos = {n: i for i, n in enumerate(D.obs_names)}
    grp = np.char.add(np.char.add(lp, "\t"), pctx)  # (context, perturbation) groups
    for g in np.unique(grp[isp]):
        m = isp & (grp == g)
        c = D.context_names.index(pctx[m][0])
        tc = sp.train[(D.pert[sp.train] == D.control_code) & (D.context[sp.train] == c)]
        off = D.rows(tc).mean(0) - D.rows(np.array([pos[n] for n in cb[m]])).mean(0)
        free = (X0[m] > 0) & (X0[m] < 14) & (Xp[m] > 0) & (Xp[m] < 14)
        assert free.mean() > 0.3 and np.abs(off).max() > 1e-3  # the test could fail
        np.testing.assert_allclose((Xp[m] - X0[m])[free], np.broadcast_to(off, X0[m].shape)[free], atol=1e-4)

    # simulate: a virtual screen from the held-out context's controls in the real file
    sim = tmp_path / "sim.h5ad"
    perts = [n for n in D.pert_names if n != D.control][:2]
    run("predict.py", "simulate", f"--run={full}", f"--adata={out / 'real.h5ad'}",
        f"--perts={','.join(perts)}", "--n_cells=20", f"--out={sim}")
    with H5AD(sim) as s:
        isp = s.column("is_predicted").astype(bool)
        assert isp.sum() == 20 * len(perts) * len(set(np.asarray(s.column(cc)).astype(str)[~isp]))
        assert sorted(set(np.asarray(s.column(pc)).astype(str)[isp])) == sorted(perts)
        Xs, cb, names = s.matrix("X").block(0, s.n_obs), np.asarray(s.column("ctrl_cell_barcode")).astype(str), s.obs_names
    # written in row blocks: one window per block gives the same file as the default blocks
    sim2 = tmp_path / "sim2.h5ad"
    run("predict.py", "simulate", f"--run={full}", f"--adata={out / 'real.h5ad'}",
        f"--perts={','.join(perts)}", "--n_cells=20", "--max_cells=1", f"--out={sim2}")
    with H5AD(sim2) as s2:
        np.testing.assert_allclose(s2.matrix("X").block(0, s2.n_obs), Xs, atol=1e-5)
        assert list(s2.obs_names) == list(names) and list(np.asarray(s2.column("ctrl_cell_barcode")).astype(str)) == list(cb)
    # recentred by default: against --center=False, each (context, perturbation) group moves by one row
    run("predict.py", "simulate", f"--run={full}", f"--adata={out / 'real.h5ad'}", f"--perts={','.join(perts)}",
        "--n_cells=20", "--center=False", f"--out={tmp_path / 'sim0.h5ad'}")
    with H5AD(tmp_path / "sim0.h5ad") as s0, H5AD(sim) as s1:
        X0, key = s0.matrix("X").block(0, s0.n_obs), np.char.add(np.asarray(s1.column(pc)).astype(str),
                                                                 np.asarray(s1.column(cc)).astype(str))
        assert s1.uns("nanostate")["center"] is True and s0.uns("nanostate")["center"] is False
    isp = np.asarray(isp, bool)
    for g in np.unique(key[isp]):
        m = isp & (key == g)
        d, free = Xs[m] - X0[m], (X0[m] > 0) & (X0[m] < 14) & (Xs[m] > 0) & (Xs[m] < 14)
        with warnings.catch_warnings():  # all-clipped genes: nan, not compared
            warnings.simplefilter("ignore", RuntimeWarning)
            row = np.nanmedian(np.where(free, d, np.nan), axis=0)
        assert np.nanmax(np.abs(row)) > 1e-3  # the test could fail
        np.testing.assert_allclose(d[free], np.broadcast_to(row, d.shape)[free], atol=1e-4)
    import anndata  # the streamed file is a valid AnnData file
    ad = anndata.read_h5ad(sim2)
    assert ad.shape == Xs.shape and ad.obs["is_predicted"].sum() == isp.sum()
    assert set(cb[isp]) <= set(np.asarray(names)[~isp])  # every predicted cell names a real control
    r = run("predict.py", "simulate", f"--run={full}", f"--adata={out / 'real.h5ad'}", "--perts=NOPE",
            f"--out={tmp_path / 'bad.h5ad'}", ok=False)
    assert r.returncode != 0 and "not in the run's vocabulary" in r.stderr


@pytest.mark.slow
def test_anchor_cosine_ema_resume_and_ensemble(synth, tmp_path):
    """The protocol's options together: anchored output, warmup + cosine, weight EMA, selection on the
    support perturbations' val loss. Resume is exact (raw weights from dcp, EMA from ema.safetensors,
    the selected weights and their loss from model.safetensors/meta.json), the lr follows the schedule,
    and predict.py replays the anchored run alone and as a two-run ensemble."""
    d = synth
    opts = ["--anchor=two_way", "--schedule=cosine", "--warmup=3", "--ema=0.8", "--lr=1e-3", "--select=support"]
    full, part = tmp_path / "full", tmp_path / "part"
    r = run(*args(d, full, 8, *opts))
    assert "anchored output" in r.stdout
    lrs = [float(l.split("| lr ")[1].split()[0]) for l in r.stdout.splitlines() if "| lr " in l]
    assert lrs[0] == pytest.approx(1e-3 / 3, rel=1e-2) and lrs[2] == pytest.approx(1e-3, rel=1e-2)
    assert lrs[-1] < lrs[3]  # cosine decay after the warmup
    run(*args(d, part, 4, *opts))
    r = run(*args(d, part, 8, *opts, "--resume"))
    a = {x["step"]: x["loss"] for x in losses(full) if "loss" in x}
    b = {x["step"]: x["loss"] for x in losses(part) if "loss" in x}
    for s in range(5, 9):
        assert abs(a[s] - b[s]) <= 1e-5 * max(1.0, abs(a[s])), (s, a[s], b[s])
    from safetensors.torch import load_file
    wa, wb = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)
    assert "anchor_table" in wa
    ma, mb = json.load(open(full / "meta.json")), json.load(open(part / "meta.json"))
    assert ma["best_step"] in (4, 8) and ma["best_step"] == mb["best_step"]
    assert ma["best_support_loss"] == pytest.approx(mb["best_support_loss"], rel=1e-5)
    assert "support val" in r.stdout
    r = run(*args(d, part, 9, "--anchor=two_way", "--schedule=cosine", "--warmup=3", "--lr=1e-3", "--resume"),
            ok=False)
    assert r.returncode != 0 and "ema" in r.stderr
    out = tmp_path / "pred"
    run("predict.py", "test", f"--run={full},{part}", f"--data={d / 'prep'}", f"--split={d / 'split.json'}",
        f"--out={out}")
    from state.h5ad import H5AD
    with H5AD(out / "pred.h5ad") as p:
        assert "," in p.uns("nanostate")["source"]
        assert np.isfinite(p.matrix("X").block(0, p.n_obs)).all()


@pytest.mark.slow
def test_guard_scores_unseen_perturbations_held_out_whole(synth, tmp_path):
    """--guard on an unseen split with guard_perts: alpha is chosen on the cells of perturbations that
    never trained (the split's guard perturbations), from the grid, by the lowest loss; recorded in
    meta.json and used by predict.py. Without guard perturbations the run says what the guard scores."""
    from state.data import Prepared
    from state.splits import make_split
    D = Prepared(synth / "prep")
    perts = [p for p in D.pert_names if p != D.control]
    feats = {p: None for p in perts}
    make_split(D, "unseen", features=feats, test_perts=perts[:1], guard_perts=perts[1:3]).save(tmp_path / "u.json")
    make_split(D, "unseen", features=feats, test_perts=perts[:1]).save(tmp_path / "n.json")
    opts = ["--anchor=context_mean", "--guard=0,0.5,1", "--pert_features=pca", "--lr=3e-3"]
    a = args(synth, tmp_path / "g", 8, *opts)
    a[2] = f"--split={tmp_path / 'u.json'}"
    r = run(*a)
    assert f"guard perturbations (held out of training, scored as unseen): {perts[1:3]}" in r.stdout
    g = json.load(open(tmp_path / "g" / "meta.json"))["guard"]
    losses = {float(k): v for k, v in g["losses"].items()}
    assert sorted(losses) == [0, 0.5, 1] and all(np.isfinite(list(losses.values())))
    assert len(set(losses.values())) == 3 and g["alpha"] == min(losses, key=losses.get)
    means = {float(k): v for k, v in g["mean_losses"].items()}  # the set-mean error, recorded beside it
    by = g["alpha_by"]
    assert (by["energy"], by["mean"]) == (g["alpha"], min(means, key=means.get)) and g["rule"] == "best"
    # the one-SE rule keeps the best alpha or a weaker one of the grid
    assert by["energy+1se"] <= by["energy"] and by["mean+1se"] <= by["mean"] and by["energy+1se"] in losses
    # predict.py --alpha: the same weights at another strength (0 = the anchor alone); refused outside [0, 1]
    pt = ["predict.py", "test", f"--run={tmp_path / 'g'}", f"--data={synth / 'prep'}", f"--split={tmp_path / 'u.json'}"]
    from state.h5ad import H5AD
    xs = {}
    for al in ("0", "1", ""):
        run(*pt, f"--out={tmp_path / ('p' + al)}", *([f"--alpha={al}"] if al else []))
        with H5AD(tmp_path / ("p" + al) / "pred.h5ad") as f:
            xs[al] = f.matrix("X").block(0, f.n_obs)
    assert not np.allclose(xs["0"], xs["1"])
    assert np.allclose(xs[""], xs["0" if g["alpha"] == 0 else "1"]) or g["alpha"] == 0.5
    r = run(*pt, f"--out={tmp_path / 'bad'}", "--alpha=2", ok=False)
    assert r.returncode == 2 and "--alpha='2'" in r.stderr and not (tmp_path / "bad").exists()
    r = run(*pt, f"--out={tmp_path / 'bad'}", "--dtype=fp8", ok=False)
    assert r.returncode == 2 and "--dtype='fp8'" in r.stderr and not (tmp_path / "bad").exists()
    r = run(*a[:4], f"--out={tmp_path / 'g1'}", *a[5:], "--guard_rule=1se")  # the same run, the 1se rule applied
    g1 = json.load(open(tmp_path / "g1" / "meta.json"))["guard"]
    assert g1["rule"] == "1se" and g1["alpha"] == g1["alpha_by"]["energy+1se"] and g1["alpha_by"] == by
    r = run(*a[:4], f"--out={tmp_path / 'bad'}", *a[5:], "--guard_rule=min", ok=False)
    assert r.returncode == 2 and "--guard_rule must be best or 1se" in r.stderr and not (tmp_path / "bad").exists()
    a[2], a[4] = f"--split={tmp_path / 'n.json'}", f"--out={tmp_path / 'n'}"
    r = run(*a)
    assert "no guard perturbations" in r.stdout


@pytest.mark.slow
def test_resume_a_run_written_before_newer_model_fields(synth, tmp_path):
    """A run whose meta.json predates STConfig fields added since (their defaults are what it computed)
    resumes; a real change of a model field is still refused."""
    out = tmp_path / "old"
    run(*args(synth, out, 4))
    for f in out.rglob("meta.json"):
        m = json.load(open(f))
        for k in ("mean_weight", "activation"):
            m["st"].pop(k, None)
        json.dump(m, open(f, "w"))
    run(*args(synth, out, 6, "--resume"))
    assert max(x["step"] for x in losses(out) if "loss" in x) == 6
    r = run(*args(synth, out, 8, "--resume", "--mean_weight=1"), ok=False)
    assert r.returncode == 2 and "different model config" in r.stderr


@pytest.mark.slow
def test_bad_settings_nonfinite_loss_and_resume_changes(synth, tmp_path):
    """Out-of-range settings are named errors; a NaN in the data stops training with the step named and
    no checkpoint written; a resume applies and says changed settings, and refuses data-order ones."""
    d = synth
    for bad in ("--batch_size=0", "--max_steps=-5", "--lr=0", "--grad_accum=0"):
        r = run(*args(d, tmp_path / "b", 3, bad), ok=False)
        assert r.returncode != 0 and bad.split("=")[0][2:] in r.stderr and "out of range" in r.stderr, bad
        assert not (tmp_path / "b").exists()
    # a corrupted prepared matrix: NaN in training rows (prepare refuses NaN input; this is a damaged copy)
    import shutil
    shutil.copytree(d / "prep", tmp_path / "prep")
    from state.data import Prepared
    D = Prepared(tmp_path / "prep")
    X = np.memmap(tmp_path / "prep" / "X.bin", dtype=np.float32, mode="r+", shape=(D.n_cells, D.n_genes))
    X[:, 0] = np.nan
    X.flush()
    del X
    out = tmp_path / "nan"
    a = args(d, out, 6)
    a[1] = f"--data={tmp_path / 'prep'}"
    r = run(*a, ok=False)  # the damaged copy no longer reaches training: Prepared checks its sums at open
    assert r.returncode == 2 and "sums.npy" in r.stderr and "re-run prepare" in r.stderr
    assert not out.exists()
    # a loss that goes non-finite in training (a diverging run) stops the loop before anything is written
    r = run(*args(d, out, 6, "--lr=1e30", "--grad_clip=0"), ok=False)
    assert r.returncode != 0 and "not finite" in r.stderr and "at step" in r.stderr
    assert not (out / "model.safetensors").exists() and not (out / "meta.json").exists()
    # resume: lr changed -> applied and said; batch_size changed -> refused
    ok = tmp_path / "ok"
    run(*args(d, ok, 3))
    r = run(*args(d, ok, 5, "--resume", "--lr=5e-4"))
    assert "changed settings" in r.stdout and "lr 0.0001 -> 0.0005" in r.stdout and "| lr 5.0e-04" in r.stdout
    r = run(*args(d, ok, 6, "--resume", "--batch_size=3"), ok=False)
    assert r.returncode != 0 and "cannot change batch_size" in r.stderr


@pytest.mark.slow
def test_predict_refuses_wrong_split_and_bad_controls(synth, tmp_path):
    d = synth
    runp = tmp_path / "r"
    run(*args(d, runp, 2))
    from state.data import Prepared
    from state.h5ad import H5AD, write_h5ad
    from state.splits import make_split
    D = Prepared(d / "prep")
    other = make_split(D, "zeroshot", context=D.context_names[1], seed=0).save(tmp_path / "other.json")
    base = ["predict.py", "test", f"--run={runp}", f"--data={d / 'prep'}", f"--out={tmp_path / 'o'}"]
    r = run(*base, f"--split={other}", ok=False)
    assert r.returncode != 0 and "not the split the run was trained on" in r.stderr
    # controls for a screen: the real controls of the split, written with variants
    out = tmp_path / "t"
    run(*base[:-1], f"--out={out}", f"--split={d / 'split.json'}")
    with H5AD(out / "real.h5ad") as f:
        X, names, genes = f.matrix("X").block(0, f.n_obs), np.asarray(f.obs_names), list(f.var_names())
        obs = {D.pert_col: np.asarray(f.column(D.pert_col)), D.context_col: np.asarray(f.column(D.context_col))}
    sim = ["predict.py", "simulate", f"--run={runp}", f"--perts={D.pert_names[1]}", f"--out={tmp_path / 's.h5ad'}"]
    cases = [("nocol", X, {D.context_col: obs[D.context_col]}, "no perturbation column"),
             ("nan", np.where(np.arange(len(X))[:, None] == len(X) - 1, np.nan, X), obs, "NaN/Inf"),
             ("z", X - X.mean(0), obs, "negative values")]
    for name, Xv, ob, msg in cases:
        p = tmp_path / f"{name}.h5ad"
        write_h5ad(p, Xv.astype(np.float32), names, genes, obs=ob)
        r = run(*sim, f"--adata={p}", ok=False)
        assert r.returncode != 0 and msg in r.stderr, (name, r.stderr[-500:])
    assert not (tmp_path / "s.h5ad").exists()
    r = run(*sim, f"--adata={tmp_path / 'nocol.h5ad'}", "--all_controls=True")
    assert (tmp_path / "s.h5ad").exists()


@pytest.mark.slow
def test_init_from_fine_tunes_with_a_table_and_named_errors(synth, tmp_path):
    """--init_from loads every matching tensor (printing what was loaded, re-initialised, skipped),
    --freeze_steps keeps the blocks as loaded, --reinit=pert redraws the perturbation encoder, and a
    source of another hidden size is an error naming the tensor unless --init_skip=True."""
    from safetensors.torch import load_file
    d = synth
    src = tmp_path / "src"
    run(*args(d, src, 4))
    ft = tmp_path / "ft"
    r = run(*args(d, ft, 3, f"--init_from={src}", "--freeze_steps=3", "--reinit=pert"))
    assert "init_from" in r.stdout and "re-initialised (asked)" in r.stdout and "f_pert.0.weight" in r.stdout
    a, b = load_file(src / "model.safetensors"), load_file(ft / "model.safetensors")
    blocks = [k for k in a if k.startswith("blocks.")]
    assert blocks and all(torch.equal(a[k], b[k]) for k in blocks)  # frozen: exactly the source's
    assert not torch.equal(a["f_pert.0.weight"], b["f_pert.0.weight"])
    meta = json.load(open(ft / "meta.json"))
    assert meta["init_from"]["reinit"] == {"pert": "asked"} and meta["init_from"]["loaded"] > 0
    r = run(*args(d, tmp_path / "bad", 2, f"--init_from={src}", "--hidden=96"), ok=False)
    assert r.returncode != 0 and "tensor 'f_pert.0.weight'" in r.stderr and "--init_skip=True" in r.stderr
    r = run(*args(d, tmp_path / "skip", 2, f"--init_from={src}", "--hidden=96", "--init_skip=True"))
    assert "skipped: shape" in r.stdout


@pytest.mark.slow
def test_simulate_applies_the_runs_recipe_to_raw_counts(tmp_path):
    """A run records its input recipe; simulate normalises raw counts to the run's target_sum and
    log1p's them (any gene order), giving the same screen as log1p input; other scales are refused
    with what was found and what the run expects."""
    from state.prepare import prepare
    from state.h5ad import H5AD, write_h5ad
    from state.splits import make_split
    from state.synth import make_synthetic
    make_synthetic(tmp_path / "c.h5ad", n_cells=900, n_genes=40, n_perts=4, n_contexts=2, seed=3, counts=True)
    D = prepare(tmp_path / "c.h5ad", tmp_path / "prep")
    ts = D.index["recipe"]["target_sum"]
    assert D.index["recipe"]["log1p"] and ts > 0
    make_split(D, "fewshot", context=D.context_names[0], seed=0).save(tmp_path / "split.json")
    run("train.py", f"--data={tmp_path / 'prep'}", f"--split={tmp_path / 'split.json'}", "--preset=tiny",
        "--max_steps=2", f"--out={tmp_path / 'run'}")
    meta = json.load(open(tmp_path / "run" / "meta.json"))
    assert meta["recipe"]["target_sum"] == ts and meta["genes"] == list(D.genes) and meta["split_hash"]
    with H5AD(tmp_path / "c.h5ad") as f:
        C, names, genes = f.matrix("X").block(0, f.n_obs), np.asarray(f.obs_names), list(f.var_names())
        obs = {k: np.asarray(f.column(k)) for k in ("perturbation", "cell_type")}
    o = np.arange(len(genes))[::-1]  # another gene order
    L = np.log1p(C * (ts / C.sum(1, keepdims=True)))
    write_h5ad(tmp_path / "counts.h5ad", C[:, o], names, [genes[i] for i in o], obs=obs)
    write_h5ad(tmp_path / "log.h5ad", L.astype(np.float32), names, genes, obs=obs)
    write_h5ad(tmp_path / "norm.h5ad", np.expm1(L).astype(np.float32), names, genes, obs=obs)
    sim = ["predict.py", "simulate", f"--run={tmp_path / 'run'}", f"--perts={D.pert_names[1]}", "--n_cells=30"]
    r = run(*sim, f"--adata={tmp_path / 'counts.h5ad'}", f"--out={tmp_path / 'a.h5ad'}")
    assert f"normalised to the run's target_sum {ts:g}" in r.stdout
    run(*sim, f"--adata={tmp_path / 'log.h5ad'}", f"--out={tmp_path / 'b.h5ad'}")
    with H5AD(tmp_path / "a.h5ad") as a, H5AD(tmp_path / "b.h5ad") as b:
        np.testing.assert_allclose(a.matrix("X").block(0, a.n_obs), b.matrix("X").block(0, b.n_obs), atol=1e-4)
    r = run(*sim, f"--adata={tmp_path / 'norm.h5ad'}", f"--out={tmp_path / 'c2.h5ad'}", ok=False)
    assert r.returncode != 0 and "looks normalized" in r.stderr and f"normalised to {ts:g}" in r.stderr


def test_counts_to_an_embedding_run_is_refused():
    """A run trained on embeddings (obsm/X_state) refuses gene counts, naming the SE model it needs."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from predict import apply_recipe
    meta = {"key": "obsm/X_state", "recipe": {"key": "obsm/X_state", "log1p": False, "se_hash": "abc123"}}
    counts = np.random.default_rng(0).poisson(3.0, (50, 20)).astype(np.float32)
    with pytest.raises(SystemExit, match="trained on the embedding 'obsm/X_state' of SE abc123"):
        apply_recipe(counts, meta, "c.h5ad", "X", gene_space=False, obs_names=[f"c{i}" for i in range(50)])
    emb = np.random.default_rng(1).normal(size=(50, 8)).astype(np.float32)  # signed: fine for an embedding
    assert apply_recipe(emb, meta, "e.h5ad", "obsm/X_state", gene_space=False, obs_names=None) is emb


@pytest.mark.slow
def test_gene_space_override_is_a_setting_like_any(synth, tmp_path):
    """--gene_space=False (or a config file setting it) trains and is recorded; it was passed twice to
    STConfig.from_name (a TypeError traceback)."""
    out = tmp_path / "g"
    r = run(*args(synth, out, 2, "--gene_space=False"), ok=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.load(open(out / "meta.json"))["st"]["gene_space"] is False


@pytest.mark.slow
def test_resume_refusals_come_before_the_applied_note(synth, tmp_path):
    """A --resume refused (--max_steps below the run's step, another --ema) does not first say its changes were
    applied; --init_from on a resume is said to be ignored (it acts at step 0 only), not 'applied'."""
    out = tmp_path / "r"
    run(*args(synth, out, 4))
    for extra, want in (("--max_steps=2", "is below the checkpoint's step 4"), ("--ema=0.5", "--ema=0.5")):
        r = run(*args(synth, out, 4, "--resume", extra, "--lr=0.01"), ok=False)
        assert r.returncode == 2 and want in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "applied from this step on" not in r.stdout, r.stdout[-1000:]
    r = run(*args(synth, out, 5, "--resume", f"--init_from={out}"))
    assert "are ignored" in r.stdout and "init_from ''" not in r.stdout


@pytest.mark.slow
def test_resume_names_changed_model_fields_and_empty_out(synth, tmp_path):
    """A --resume with another model config named no field ('a different model config'); --out= (empty) said
    'No such file or directory' naming no option."""
    out = tmp_path / "r"
    run(*args(synth, out, 2))
    r = run(*args(synth, out, 3, "--resume", "--hidden=32"), ok=False)
    assert r.returncode == 2 and "hidden (64 -> 32)" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    for script in (args(synth, "", 2), ["embed.py", "fit", f"--data={synth / 'prep'}", "--out="]):
        r = run(*script, ok=False)
        assert r.returncode == 2 and "--out is empty" in r.stderr, r.stderr[-1000:]
