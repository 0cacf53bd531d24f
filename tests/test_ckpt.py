"""Crash-proof checkpoints: a process SIGKILLed right after any single file operation of a save
(NANOSTATE_FAULT=k, state/ckpt.py) resumes to exactly the uninterrupted run (train.py losses and
weights; embed.py weights), and a run killed before its first commit starts again from step 0."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_synth_prepared, run_script



def run(args, fault=None, ok=True):
    """A script run with one thread; fault=k kills it after the k-th checkpoint file operation."""
    return run_script(*args, ok=ok, threads=1, env={"NANOSTATE_FAULT": str(fault) if fault is not None else ""})


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synth_prepared(tmp_path_factory.mktemp("ck"))


def train_args(d, out, *extra):
    return ["train.py", f"--data={d / 'prep'}", f"--split={d / 'split.json'}", "--preset=tiny", f"--out={out}",
            "--max_steps=6", "--ckpt_every=3", "--val_every=3", "--val_batches=1", "--log_every=1",
            "--batch_size=4", "--ema=0.5", "--threads=1", *extra]


def losses(out):
    return {x["step"]: x["loss"] for x in map(json.loads, open(Path(out) / "log.jsonl")) if "loss" in x}


def weights(out):
    from safetensors.torch import load_file
    return load_file(Path(out) / "model.safetensors")


# one train.py save: dcp, state.pt, ema.safetensors, model.safetensors, meta.json, rename, switch, clean-up
OPS = 8


@pytest.mark.slow
def test_train_killed_after_any_checkpoint_write_resumes_exactly(synth, tmp_path):
    d = synth
    full = tmp_path / "full"
    run(train_args(d, full))
    lf, wf = losses(full), weights(full)
    assert sorted(lf) == list(range(1, 7)) and os.path.islink(full / "ckpt")
    # every operation of the second save, and one of the first save before its commit
    for k in [3] + list(range(OPS + 1, 2 * OPS + 1)):
        out = tmp_path / f"k{k}"
        r = run(train_args(d, out), fault=k, ok=False)
        assert r.returncode != 0, k  # killed
        r = run(train_args(d, out, "--resume"))
        if k < OPS - 1:
            assert "starting at step 0" in r.stdout, k
        lk, wk = losses(out), weights(out)
        assert sorted(lk) == list(range(1, 7)), (k, sorted(lk))
        for s in lf:
            assert abs(lk[s] - lf[s]) <= 1e-5 * max(1.0, abs(lf[s])), (k, s, lk[s], lf[s])
        for n in wf:
            torch.testing.assert_close(wk[n], wf[n], atol=1e-6, rtol=1e-5)
        left = sorted(f for f in os.listdir(out) if f.startswith("ckpt"))
        assert left in (["ckpt", "ckpt-6"], ["ckpt", "ckpt-6-b"]), (k, left)  # -b: step 6 saved again
        assert json.load(open(out / "meta.json"))["step"] == 6


def _h5ad(path, n=80, g=20, seed=0):
    from state.h5ad import write_h5ad
    X = np.random.default_rng(seed).poisson(2.0, (n, g)).astype(np.float32)
    write_h5ad(path, X, [f"c{i}" for i in range(n)], [f"Gene{i}" for i in range(g)])
    return str(path)


@pytest.mark.slow
def test_embed_killed_after_any_checkpoint_write_resumes_exactly(tmp_path):
    from state.prepare import prepare
    prepare(_h5ad(tmp_path / "a.h5ad"), tmp_path / "pa", pert_col="")
    common = ["embed.py", "fit", f"--data={tmp_path / 'pa'}", "--batch_size=8", "--max_steps=4", "--save_every=2",
              "--pca_dim=6", "--val_cells=4", "--eval_every=100", "--log_every=100", "--d_model=16", "--ff=32",
              "--n_head=2", "--n_layer=1", "--d_out=12", "--pad_length=16", "--count_hidden=8", "--P=4", "--N=4",
              "--S=4", "--threads=1"]
    run([*common, f"--out={tmp_path / 'full'}"])
    h = hashlib.sha256(open(tmp_path / "full" / "model.safetensors", "rb").read()).hexdigest()
    ops = 7  # dcp/, state.pt, model, meta, rename, switch, clean-up
    for k in [1] + list(range(ops + 1, 2 * ops + 1)):
        out = tmp_path / f"k{k}"
        assert run([*common, f"--out={out}"], fault=k, ok=False).returncode != 0
        run([*common, f"--out={out}", "--resume"])
        assert hashlib.sha256(open(out / "model.safetensors", "rb").read()).hexdigest() == h, k
        assert json.load(open(out / "meta.json"))["step"] == 4


@pytest.mark.slow
def test_edited_meta_json_is_one_line_for_every_reader(synth, tmp_path):
    """A run whose meta.json was edited (a key missing, a wrong type, a model field changed so the weights no
    longer fit it) is refused in one line by predict.py --run, train.py --resume and --init_from; extra keys
    are harmless."""
    import shutil
    d = synth
    src = tmp_path / "src"
    run(train_args(d, src, "--ema=0.5", "--select=support"))
    pred = lambda r: ["predict.py", "test", f"--run={r}", f"--data={d / 'prep'}", f"--split={d / 'split.json'}",
                      f"--out={tmp_path / 'pout'}"]
    edits = [("st", lambda m: m.update(st="x"), "'st' is str"),
             ("hidden_str", lambda m: m["st"].update(hidden="64"), "hidden='64', not a int"),
             ("hidden_other", lambda m: m["st"].update(hidden=32), "tensor 'f_pert.0.weight' is (64, 7)"),
             ("hidden_gone", lambda m: m["st"].pop("hidden"), "not of one run"),
             ("genes", lambda m: m.update(genes=5), "'genes' is int"),
             ("genes_gone", lambda m: m.pop("genes"), "has no 'genes'"),
             ("checksum_gone", lambda m: m.pop("data_checksum"), "has no 'data_checksum'"),
             ("perts", lambda m: m.update(pert_names=None), "'pert_names' is NoneType"),
             ("genes_int", lambda m: m.update(genes=[1, 2]), "other than names"),
             ("corr", lambda m: m.update(corr_scale=[1, 2]), "'corr_scale' (2 values) does not fit"),
             ("range", lambda m: m["st"].update(n_layers=-1), "n_layers=-1"),
             ("curve", lambda m: m.update(support_curve=[[1]]), "[step, loss] pairs")]
    for name, edit, want in edits:
        r_ = tmp_path / name
        shutil.copytree(src, r_, symlinks=True)
        p = os.path.realpath(r_ / "meta.json")
        m = json.load(open(p))
        edit(m)
        json.dump(m, open(p, "w"))
        for args in (pred(r_), train_args(d, r_, "--resume", "--ema=0.5", "--select=support", "--max_steps=7"),
                     train_args(d, tmp_path / f"ft_{name}", f"--init_from={r_}")):
            if "corr_scale" in want and args[0] == "train.py":
                continue  # a resumed run recomputes corr_scale, init_from ignores it: only inference reads it
            if name == "checksum_gone" and "--init_from" in str(args):
                continue  # init_from reads the config, genes and perturbations only
            if "not of one run" in want or "f_pert.0.weight" in want:
                if "--resume" in args:  # the resumed run compares the config with its own
                    want_ = "different model config"
                elif "--init_from" in str(args):
                    continue  # init_from loads by name and shape into this run's model: no meta config read
                else:
                    want_ = want
            else:
                want_ = want
            r = run(args, ok=False)
            assert r.returncode == 2, (name, args[0], r.stderr[-2000:])
            assert len(r.stderr.strip().splitlines()) == 1 and want_ in r.stderr, (name, args[0], r.stderr)
        assert not (tmp_path / "pout").exists() and not (tmp_path / f"ft_{name}").exists(), name
    m = json.load(open(os.path.realpath(src / "meta.json")))
    m["extra"], m["st"]["bogus"] = 1, 2  # keys no reader knows: harmless
    json.dump(m, open(os.path.realpath(src / "meta.json"), "w"))
    run(pred(src))
    assert (tmp_path / "pout" / "pred.h5ad").exists()


@pytest.mark.slow
def test_killed_between_rename_and_first_switch_starts_again(synth, tmp_path):
    """A save killed after its staging folder was renamed to ckpt-<step> but before the `ckpt` link was first
    switched to it leaves no commit: --resume refused ('holds no committed checkpoint') instead of starting
    again from step 0 as for every other point before the first commit (train.py and embed.py fit)."""
    d = synth
    full, out = tmp_path / "full", tmp_path / "k"
    run(train_args(d, full))
    assert run(train_args(d, out), fault=OPS - 2, ok=False).returncode != 0  # after the rename of the first save
    assert sorted(os.listdir(out)) == [".lock", "ckpt-3", "log.jsonl"] or sorted(os.listdir(out)) == ["ckpt-3", "log.jsonl"]
    r = run(train_args(d, out, "--resume"))
    assert "starting at step 0" in r.stdout
    assert losses(out) == losses(full)
    from state.prepare import prepare
    prepare(_h5ad(tmp_path / "a.h5ad"), tmp_path / "pa", pert_col="")
    common = ["embed.py", "fit", f"--data={tmp_path / 'pa'}", "--batch_size=8", "--max_steps=2", "--save_every=2",
              "--pca_dim=6", "--val_cells=4", "--eval_every=100", "--log_every=100", "--d_model=16", "--ff=32",
              "--n_head=2", "--n_layer=1", "--d_out=12", "--pad_length=16", "--count_hidden=8", "--P=4", "--N=4",
              "--S=4", "--threads=1", f"--out={tmp_path / 'se'}"]
    assert run(common, fault=5, ok=False).returncode != 0  # dcp/, state.pt, model, meta, rename: killed
    assert "ckpt-2" in os.listdir(tmp_path / "se") and "ckpt" not in os.listdir(tmp_path / "se")
    assert "starting at step 0" in run([*common, "--resume"]).stdout
    assert json.load(open(tmp_path / "se" / "meta.json"))["step"] == 2


@pytest.mark.slow
def test_damaged_state_pt_or_dcp_is_one_line_on_resume(synth, tmp_path):
    """--resume of a checkpoint whose state.pt lacks the sampler cursor or the RNG states, holds a cursor of
    other data, or whose dcp/ data is truncated or of another model: a KeyError/EOFError/size-mismatch
    traceback before; one line naming the file now (train.py; embed.py reads through the same ckpt.read)."""
    import shutil
    d = synth
    src = tmp_path / "src"
    run(train_args(d, src))

    def state(fn):
        def edit(ck):
            s = torch.load(ck / "state.pt", weights_only=True)
            fn(s)
            torch.save(s, ck / "state.pt")
        return edit

    def truncate(ck):
        for f in (ck / "dcp").glob("*.distcp"):
            os.truncate(f, 100)

    cases = [("nosampler", state(lambda s: s.pop("sampler")), "state.pt holds no sampler cursor"),
             ("norng", state(lambda s: s.pop("rng_ranks")), "state.pt holds no RNG states"),
             ("badsampler", state(lambda s: s.update(sampler={"x": 1})), "its sampler cursor does not fit"),
             ("truncated", truncate, "the sharded checkpoint cannot be read (EOFError")]
    for name, edit, want in cases:
        out = tmp_path / name
        shutil.copytree(src, out, symlinks=True)
        edit(Path(os.path.realpath(out / "ckpt")))
        r = run(train_args(d, out, "--resume", "--max_steps=7"), ok=False)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and want in r.stderr, (name, r.stderr[-2000:])
    other = tmp_path / "other"
    run(train_args(d, other, "--hidden=32", "--max_steps=3"))
    out = tmp_path / "mixed"
    shutil.copytree(src, out, symlinks=True)
    ck = Path(os.path.realpath(out / "ckpt"))
    shutil.rmtree(ck / "dcp")
    shutil.copytree(Path(os.path.realpath(other / "ckpt")) / "dcp", ck / "dcp")
    r = run(train_args(d, out, "--resume", "--max_steps=7"), ok=False)
    assert r.returncode == 2 and "the sharded checkpoint cannot be read" in r.stderr, r.stderr[-2000:]


def test_trim_log_drops_any_line_it_cannot_read(tmp_path):
    """A log line whose step is not a number ({"step": "x"}) was a TypeError traceback on --resume; torn,
    binary and non-object lines are dropped like it, lines up to the step kept."""
    from state.ckpt import trim_log
    p = tmp_path / "log.jsonl"
    p.write_bytes(b'{"step": 1, "loss": 2.0}\n{"step": 3}\n\xff\xfe garbage\n[1, 2]\n{"step": "x"}\n{"step": 2}\n{"ste')
    trim_log(str(p), 2)
    assert [json.loads(l)["step"] for l in open(p)] == [1, 2]
