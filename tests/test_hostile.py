"""Hostile inputs and faults on the run surfaces (issue Reliability III): every class ends in the right
result or one line `command: ...` with exit status 2, nothing lost or half-written, no hang, nothing a
user can hand over unpickled. Data files and splits/features have their own files
(test_hostile_data.py, test_hostile_inputs.py). Budget: ~1 min on 2 cores."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, make_synth_prepared, run_script


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def one_line(r, *want):
    """A user's mistake: exit 2, one line on stderr naming what is wrong, no traceback."""
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for w in want:
        assert w in err[0], (w, err[0])
    return err[0]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synth_prepared(tmp_path_factory.mktemp("hostile"))


def train_args(d, out, steps, *extra):
    return ["train.py", f"--data={d / 'prep'}", f"--split={d / 'split.json'}", "--preset=tiny", f"--out={out}",
            f"--max_steps={steps}", "--log_every=1", "--val_every=4", "--val_batches=2", "--ckpt_every=4",
            "--batch_size=4", "--threads=1", *extra]


@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    run_script(*train_args(synth, out, 8))
    return out


def train_patched(patch, argv):
    """train.py as a user runs it, with `patch` (Python source: a fault injected into torch) run first."""
    code = "import errno, runpy, sys, torch\n" + patch + f"sys.argv = {argv!r}\nrunpy.run_path('train.py', run_name='__main__')\n"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


def log(out):
    return [json.loads(l) for l in open(Path(out) / "log.jsonl")]


# --- 1. nothing unpickled: DCP's .metadata and its non-tensor items ---------------------------------

@pytest.mark.slow
def test_crafted_dcp_metadata_is_refused_on_resume(synth, trained, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(trained, run, symlinks=True)
    md_path = run / "ckpt" / "dcp" / ".metadata"
    md = pickle.load(open(md_path, "rb"))  # the real index, with a payload riding along
    md.storage_meta = Payload()
    pickle.dump(md, open(md_path, "wb"))
    r = run_script(*train_args(synth, run, 12, "--resume"), ok=False)
    one_line(r, "train.py:", ".metadata", "refusing to unpickle")
    assert not (ROOT / "PWNED_BY_PICKLE").exists()


def test_crafted_dcp_item_is_refused(tmp_path, monkeypatch):
    import warnings

    import torch.distributed.checkpoint as dcp

    from state.dist import load_dcp
    from state.errors import UserError
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(3), "lr": Payload()}, checkpoint_id=str(tmp_path / "dcp"))
    with pytest.raises(UserError, match="item 'lr' is not plain data"):
        load_dcp({"w": torch.zeros(3), "lr": 0.0}, str(tmp_path / "dcp"))
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    with warnings.catch_warnings():  # plain items (an optimizer's floats, tuples) still load
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(3), "lr": 0.5, "betas": (0.9, 0.95)}, checkpoint_id=str(tmp_path / "ok"))
    sd = {"w": torch.zeros(3), "lr": 0.0, "betas": (0.0, 0.0)}
    load_dcp(sd, str(tmp_path / "ok"))
    assert sd["lr"] == 0.5 and tuple(sd["betas"]) == (0.9, 0.95) and torch.equal(sd["w"], torch.ones(3))


# --- 3. a dead loader process stops the run with its name ------------------------------------------

@pytest.mark.slow
def test_killed_loader_process_stops_the_run(synth, tmp_path):
    """What the OOM killer does: SIGKILL a real loader process mid-run. The run must end within seconds
    with one line naming the process (it blocked forever in a queue read before)."""
    out = tmp_path / "w"
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, *train_args(synth, out, 100000, "--workers=1", "--log_every=50",
                                                      "--val_every=0", "--ckpt_every=100000")],
                         cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not ((out / "log.jsonl").exists() and (out / "log.jsonl").stat().st_size > 0):
            assert p.poll() is None, p.communicate()[1][-2000:]  # the run is stepping once its log grows
            time.sleep(0.1)
        kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        assert kids, "no loader process"
        os.kill(int(kids[0]), signal.SIGKILL)
        _, err = p.communicate()  # returns only because the run stops itself (it blocked forever before)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 2 and "loader process loader0" in err and "SIGKILL" in err, err[-2000:]
    assert "Traceback" not in err


# --- 5. run folders: copies, torn logs, failed saves, a second writer ------------------------------

@pytest.mark.slow
def test_dereferenced_copy_torn_log_and_stale_staging_resume_exactly(synth, trained, tmp_path):
    straight = tmp_path / "straight"
    run_script(*train_args(synth, straight, 12))
    run = tmp_path / "copy"
    shutil.copytree(trained, run, symlinks=False)  # cp -rL: every link is now a real file or folder
    assert not os.path.islink(run / "ckpt")
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 9, "lo')  # torn by a kill or a full disk
    (run / "ckpt-12.tmp").mkdir()  # a save that failed half-way
    (run / "ckpt-12.tmp" / "state.pt").write_bytes(b"partial")
    r = run_script(*train_args(synth, run, 12, "--resume"))
    assert "links were put back" in r.stdout
    a = {(x["step"], "loss" in x): x for x in log(straight)}
    b = {(x["step"], "loss" in x): x for x in log(run)}
    for k in a:
        assert k in b, k
        assert abs(a[k].get("loss", a[k].get("val_loss")) - b[k].get("loss", b[k].get("val_loss"))) < 1e-6, k
    assert os.path.islink(run / "ckpt") and not (run / "ckpt-12.tmp").exists()


@pytest.mark.slow
def test_second_writer_is_refused_naming_the_holder(synth, trained, tmp_path):
    from state import ckpt
    run = tmp_path / "r"
    shutil.copytree(trained, run, symlinks=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from state import ckpt; "
                               f"ckpt.lock({str(run)!r}); print('locked', flush=True); time.sleep(600)"],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(os.listdir(run))
        r = run_script(*train_args(synth, run, 12, "--resume"), ok=False)
        one_line(r, "another process", f"pid {holder.pid}")
        assert sorted(os.listdir(run)) == before
    finally:
        holder.kill()
        holder.wait()
    assert ckpt.empty(tmp_path / "nothing") and not ckpt.empty(run)


@pytest.mark.slow
def test_failed_save_leaves_the_committed_checkpoint(synth, trained, tmp_path, monkeypatch):
    """A full disk in the middle of a save: the committed checkpoint stays as it was, the staging folder
    goes, and the next resume continues from the committed step."""
    from state import ckpt
    run = tmp_path / "r"
    shutil.copytree(trained, run, symlinks=True)
    committed = os.readlink(run / "ckpt")
    ckpt.begin(str(run), 12)
    (Path(ckpt.staging(str(run), 12)) / "state.pt").write_bytes(b"half")
    ckpt.abandon(str(run), 12)
    assert os.readlink(run / "ckpt") == committed and not any(f.endswith(".tmp") for f in os.listdir(run))
    # the training script removes its staging folder when a write fails (ENOSPC simulated in the child)
    r = train_patched("real = torch.save\n"
                      "def full(obj, f, *a, **k):\n"
                      "    if isinstance(f, str) and f.endswith('state.pt'):\n"
                      "        raise OSError(errno.ENOSPC, 'No space left on device', f)\n"
                      "    return real(obj, f, *a, **k)\n"
                      "torch.save = full\n", train_args(synth, run, 12, "--resume"))
    one_line(r, "No space left on device", "free space")
    assert os.readlink(run / "ckpt") == committed
    assert not any(f.endswith(".tmp") for f in os.listdir(run)), os.listdir(run)
    run_script(*train_args(synth, run, 12, "--resume"))  # and it resumes


# --- 2. outputs never touch inputs; a failed write leaves the user's files as they were -------------

def controls_file(synth, path, counts=True, extra_genes=0, dup=None, late_fraction_row=None, n_rep=1):
    """The synthetic controls as a user's file: raw counts (or log1p), optionally with extra genes, a
    duplicated gene name, or one fractional value in a late row."""
    from state.h5ad import H5AD, write_h5ad
    with H5AD(synth / "s.h5ad") as h:
        pert = np.asarray(h.column("perturbation")).astype(str)
        keep = np.flatnonzero(pert == "control")
        X = h.matrix("X").rows(keep)
        ctx = np.asarray(h.column("cell_type")).astype(str)[keep]
        genes = list(h.var_names())
    X = np.tile(X, (n_rep, 1))
    ctx = np.tile(ctx, n_rep)
    if counts:  # back to counts: expm1 of log1p at target 1e4, scaled to ~2,000 per cell, rounded
        X = np.round(np.expm1(X) * 0.2).astype(np.float32)
    if extra_genes:
        rng = np.random.default_rng(0)
        X = np.concatenate([X, rng.poisson(5.0, size=(len(X), extra_genes)).astype(np.float32)], 1)
        genes = genes + [f"EXTRA{i}" for i in range(extra_genes)]
    if dup is not None:
        genes[dup[1]] = genes[dup[0]]
    if late_fraction_row is not None:
        X[late_fraction_row, 0] += 0.5
    write_h5ad(str(path), X, [f"c{i}" for i in range(len(X))], genes,
               obs={"perturbation": np.array(["control"] * len(X)), "cell_type": ctx})
    return path


@pytest.mark.slow
def test_simulate_never_writes_over_its_inputs(synth, trained, tmp_path):
    src = controls_file(synth, tmp_path / "ctrl.h5ad")
    before = src.read_bytes()
    pert = json.load(open(trained / "meta.json"))["pert_names"][1]
    sim = ["predict.py", "simulate", f"--run={trained}", f"--adata={src}", f"--perts={pert}"]
    one_line(run_script(*sim, f"--out={src}", ok=False), "is one of the inputs")
    assert src.read_bytes() == before
    (tmp_path / "folder").mkdir()
    one_line(run_script(*sim, f"--out={tmp_path / 'folder'}", ok=False), "is a folder")
    assert os.listdir(tmp_path / "folder") == []
    one_line(run_script(*sim, f"--out={trained / 'model.safetensors'}", ok=False), "is one of the inputs")
    (tmp_path / "s.h5ad.tmp99999999").write_bytes(b"left by a killed screen")
    run_script(*sim, f"--out={tmp_path / 's.h5ad'}")
    assert sorted(os.listdir(tmp_path)) == ["ctrl.h5ad", "folder", "s.h5ad"]  # its own leftovers cleaned


def test_transform_failure_leaves_the_users_file_intact(tmp_path, monkeypatch):
    """embed.py transform in place, failing half-way (a full disk): the input keeps its bytes, no temp
    file and no partial obsm key remain."""
    import embed
    from state.se import SEConfig, StateEmbedding, save_model
    from state.synth import make_synthetic
    make_synthetic(tmp_path / "x.h5ad", n_cells=300, n_genes=40, n_perts=2, n_contexts=1, seed=0)
    from state.h5ad import H5AD
    with H5AD(tmp_path / "x.h5ad") as h:
        genes = list(h.var_names())
    ck = tmp_path / "se"
    ck.mkdir()
    model = StateEmbedding(SEConfig.from_name("tiny"), torch.randn(len(genes), 16), genes)  # untrained: enough
    save_model(model, str(ck), {"step": 0, "preset": "tiny"})
    before = (tmp_path / "x.h5ad").read_bytes()
    calls = {"n": 0}
    real = StateEmbedding.embed

    def full_disk(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            import errno
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.h5ad"))
        return real(self, *a, **k)
    monkeypatch.setattr(StateEmbedding, "embed", full_disk)
    with pytest.raises(OSError):
        embed.transform([f"--ckpt={ck}", str(tmp_path / "x.h5ad"), "--batch_size=100"])
    assert (tmp_path / "x.h5ad").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["se", "x.h5ad"]


def test_reports_write_only_where_told(synth, tmp_path, monkeypatch):
    """`state.baselines report` and `state.eval` wrote ./baselines_out and ./eval_out of whatever folder
    they ran from; now beside the --pred file unless --out says, and a report never writes over a --pred."""
    from state import baselines as B
    from state.data import Prepared
    from state.errors import UserError
    from state.splits import Split
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    data = Prepared(synth / "prep")
    split = Split.load(synth / "split.json").validate(data)
    (tmp_path / "m").mkdir()
    B.write_pred(str(tmp_path / "m" / "pred.h5ad"), B.perturbation_mean(data, split), data, "pm")
    with pytest.raises(UserError, match="--out=FOLDER is required"):
        B.main(["report", f"--data={synth / 'prep'}", f"--split={synth / 'split.json'}"])
    with pytest.raises(UserError, match="is inside --out"):
        B.main(["report", f"--data={synth / 'prep'}", f"--split={synth / 'split.json'}",
                f"--pred={tmp_path / 'm' / 'pred.h5ad'}", f"--out={tmp_path / 'm'}", "--profile=minimal"])
    B.main(["report", f"--data={synth / 'prep'}", f"--split={synth / 'split.json'}",
            f"--pred={tmp_path / 'm' / 'pred.h5ad'}", "--profile=minimal"])
    assert os.listdir(work) == [] and (tmp_path / "m" / "baselines" / "real.h5ad").exists()


# --- 7. simulate from raw counts: the recipe's library size, every row checked ---------------------

@pytest.mark.slow
def test_simulate_counts_libsize_duplicates_and_every_row(synth, trained, tmp_path):
    pert = json.load(open(trained / "meta.json"))["pert_names"][1]

    def sim(src, out, *extra, ok=True):
        return run_script("predict.py", "simulate", f"--run={trained}", f"--adata={src}", f"--perts={pert}",
                          f"--out={out}", *extra, ok=ok)

    def pred(path):
        from state.h5ad import H5AD
        with H5AD(path) as h:
            isp = np.asarray(h.column("is_predicted")).astype(bool)
            return h.matrix("X").block(0, h.n_obs)[isp]
    base = sim(controls_file(synth, tmp_path / "c.h5ad"), tmp_path / "a.h5ad")
    extra = sim(controls_file(synth, tmp_path / "e.h5ad", extra_genes=1000), tmp_path / "b.h5ad")
    assert "1000 other genes of the file left out" in extra.stdout, extra.stdout
    np.testing.assert_allclose(pred(tmp_path / "b.h5ad"), pred(tmp_path / "a.h5ad"), atol=1e-5)
    r = sim(controls_file(synth, tmp_path / "d.h5ad", dup=(0, 5)), tmp_path / "x.h5ad", ok=False)
    one_line(r, "occur more than once")
    # a fractional value in a row past the first 20,000 (the old check looked at those only)
    src = controls_file(synth, tmp_path / "f.h5ad", n_rep=150, late_fraction_row=-3)
    from state.h5ad import H5AD
    with H5AD(src) as h:
        assert h.n_obs > 20000
    one_line(sim(src, tmp_path / "y.h5ad", ok=False), "fractional value")
    assert not (tmp_path / "y.h5ad").exists()


@pytest.mark.slow
def test_simulate_log1p_at_another_target_sum_is_rescaled(synth, trained, tmp_path):
    """Log1p values normalised to 1e6 given to a run whose data were at 1e4: rescaled exactly (they only
    warned before, and every expression level was off by log(100))."""
    from state.h5ad import H5AD, write_h5ad
    pert = json.load(open(trained / "meta.json"))["pert_names"][1]
    src = controls_file(synth, tmp_path / "c.h5ad", counts=False)
    with H5AD(src) as h:
        X, genes = h.matrix("X").block(0, h.n_obs), list(h.var_names())
        ctx = np.asarray(h.column("cell_type")).astype(str)
    hi = np.log1p(np.expm1(X.astype(np.float64)) * 100).astype(np.float32)
    write_h5ad(str(tmp_path / "hi.h5ad"), hi, [f"c{i}" for i in range(len(X))], genes,
               obs={"perturbation": np.array(["control"] * len(X)), "cell_type": ctx})
    outs = []
    for f in ("c.h5ad", "hi.h5ad"):
        r = run_script("predict.py", "simulate", f"--run={trained}", f"--adata={tmp_path / f}", f"--perts={pert}",
                       f"--out={tmp_path / ('o_' + f)}")
        with H5AD(tmp_path / ("o_" + f)) as h:
            outs.append(h.matrix("X").block(0, h.n_obs))
    assert "rescaled to the run's target_sum" in r.stdout
    np.testing.assert_allclose(outs[1], outs[0], atol=2e-3)


# --- 8. ensembles: every member compared, the right one named --------------------------------------

@pytest.mark.slow
def test_ensemble_members_compared_by_name(synth, trained, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(trained, other, symlinks=True)
    meta_f = other / "ckpt" / "meta.json"
    meta = json.load(open(meta_f))
    meta["recipe"] = {**meta.get("recipe", {}), "target_sum": 123.0}
    json.dump(meta, open(meta_f, "w"))
    d = synth
    r = run_script("predict.py", "test", f"--run={trained},{trained},{other}", f"--data={d / 'prep'}",
                   f"--split={d / 'split.json'}", f"--out={tmp_path / 't'}", ok=False)
    one_line(r, "names a run twice")
    r = run_script("predict.py", "test", f"--run={trained},{other}", f"--data={d / 'prep'}",
                   f"--split={d / 'split.json'}", f"--out={tmp_path / 't'}", ok=False)
    one_line(r, f"ensemble member {other} has another recipe")
    assert not (tmp_path / "t").exists()


# --- 11. every script and module: --help exits 0; a mistake is one line --------------------------

@pytest.mark.slow
@pytest.mark.parametrize("cmd", [["train.py"], ["predict.py"], ["embed.py"], ["-m", "state.data"],
                                 ["-m", "state.splits"], ["-m", "state.baselines"], ["-m", "state.eval"],
                                 ["-m", "state.experiment"], ["-m", "state.synth"], ["-m", "state.demo"],
                                 ["bench/bench_scale.py"], ["bench/bench_train.py"], ["dev/se_intrinsic.py"],
                                 ["dev/zeroshot_transfer.py"], ["dev/st_decoder_ceiling.py"]])
def test_help_everywhere(cmd):
    r = run_script(*cmd, "--help", ok=False)
    assert r.returncode == 0 and len(r.stdout) > 100 and "Traceback" not in r.stderr, (cmd, r.stderr[-1000:])


@pytest.mark.parametrize("cmd", [["train.py"], ["predict.py", "test"], ["embed.py", "fit"], ["-m", "state.data"],
                                 ["-m", "state.splits"], ["-m", "state.splits", "make"], ["-m", "state.baselines"],
                                 ["-m", "state.eval"], ["-m", "state.experiment"], ["-m", "state.synth"],
                                 ["-m", "state.demo"], ["-m", "state.convert"]])
def test_command_line_mistakes_are_one_line(cmd):
    """An unknown option (or a missing command or argument) to any script: one line, exit 2 (`python -m
    state.splits make` without --data was an argparse traceback)."""
    one_line(run_script(*cmd, "--no_such_option=1", ok=False))


@pytest.mark.slow
def test_mistakes_are_one_line(synth, trained, tmp_path):
    d = synth
    one_line(run_script(*train_args(d, tmp_path / "x", 4, "--bogus=1"), ok=False), "unknown config key --bogus")
    one_line(run_script("predict.py", "frobnicate", ok=False), "unknown command")
    one_line(run_script("predict.py", "simulate", f"--run={tmp_path}", "--adata=x.h5ad", "--perts=A",
                        f"--out={tmp_path / 'o.h5ad'}", ok=False), "not a finished train.py run")
    one_line(run_script("-m", "state.experiment", "table", str(tmp_path / "missing"), ok=False),
             "not a protocol run folder")
    one_line(run_script("-m", "state.experiment", "run", "--seeds=0,x", f"--out={tmp_path / 'e'}", ok=False),
             "--seeds=0,x")
    assert not (tmp_path / "x").exists()  # a refused run leaves no folder behind
    r = run_script(*train_args(d, tmp_path / "big", 1, "--set_size=4096"))
    assert "larger than every perturbed group" in r.stdout


# --- round 2 (a hostile tester's 90 cases against the fixes above): the classes it found ------------

@pytest.mark.slow
def test_outputs_never_name_a_prepared_or_run_folders_own_files(synth, trained, tmp_path):
    """`splits make --out=DATA/index.json` replaced the data's index with a split (exit 0)."""
    data = tmp_path / "prep"
    shutil.copytree(synth / "prep", data)
    before = (data / "index.json").read_bytes()
    r = run_script("-m", "state.splits", "make", f"--data={data}", "--task=zeroshot", "--context=ctxA",
                   f"--out={data / 'index.json'}", ok=False)
    one_line(r, "is a file of the prepared folder")
    assert (data / "index.json").read_bytes() == before and not (data / "index.toml").exists()
    from state.errors import UserError, output_file
    for p in (trained / "meta.json", trained / "state.pt", trained / "ckpt" / "x.h5ad"):
        with pytest.raises(UserError, match="run folder|checkpoint"):
            output_file(str(p), [], "t")
    output_file(str(data / "split.json"), [], "t")  # the README's place for a split stays allowed


def test_reprepare_keeps_the_users_files(synth, tmp_path):
    """Re-preparing a folder swapped it whole and deleted the split.json the README puts there."""
    from state.prepare import prepare
    data = tmp_path / "prep"
    shutil.copytree(synth / "prep", data)
    shutil.copy(synth / "split.json", data / "split.json")
    (data / "notes").mkdir()
    (data / "notes" / "a.txt").write_text("mine")
    prepare([str(synth / "s.h5ad")], data, pert_col="perturbation", control="control", context_col="cell_type",
            batch_col="batch")
    assert (data / "split.json").read_bytes() == (synth / "split.json").read_bytes()
    assert (data / "notes" / "a.txt").read_text() == "mine"


def test_codes_out_of_their_group_are_refused_at_open(synth, tmp_path):
    from state.data import Prepared
    from state.errors import UserError
    data = tmp_path / "prep"
    shutil.copytree(synth / "prep", data)
    c = np.load(data / "codes.npy")
    c[5, 1] = 99
    np.save(data / "codes.npy", c)
    with pytest.raises(UserError, match="codes.npy: a row's codes"):
        Prepared(data)


@pytest.mark.slow
def test_damaged_or_nan_weights_are_refused(synth, trained, tmp_path):
    from safetensors.torch import load_file, save_file
    run = tmp_path / "r"
    shutil.copytree(trained, run, symlinks=False)
    sd = load_file(run / "model.safetensors")
    k = next(iter(sd))
    sd[k] = torch.full_like(sd[k], float("nan"))
    save_file(sd, str(run / "model.safetensors"))
    d = synth
    test = ["predict.py", "test", f"--run={run}", f"--data={d / 'prep'}", f"--split={d / 'split.json'}",
            f"--out={tmp_path / 't'}"]
    one_line(run_script(*test, ok=False), f"tensor '{k}' has NaN/Inf")
    (run / "model.safetensors").write_bytes(b"\xff" * 64)
    one_line(run_script(*test, ok=False), "cannot read model.safetensors")
    assert not (tmp_path / "t").exists()


@pytest.mark.slow
@pytest.mark.parametrize("opt", ["--mlp_dropout=2", "--n_heads=3", "--hidden=0", "--set_size=0", "--head_dim=-4",
                                 "--anchor=bogus", "--mixer=bogus", "--mapping=bogus", "--lr=1e400"])
def test_bad_settings_are_one_line_and_leave_no_folder(synth, tmp_path, opt):
    r = run_script(*train_args(synth, tmp_path / "x", 4, opt), ok=False)
    one_line(r, opt.split("=")[0].lstrip("-"))
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_diverging_run_and_resume_below_the_checkpoint(synth, trained, tmp_path):
    r = run_script(*train_args(synth, tmp_path / "x", 6, "--lr=1e30", "--grad_clip=0"), ok=False)
    one_line(r, "not finite")
    assert not (tmp_path / "x").exists()  # no checkpoint was ever committed: no folder left behind
    run = tmp_path / "r"
    shutil.copytree(trained, run, symlinks=True)
    one_line(run_script(*train_args(synth, run, 4, "--resume"), ok=False), "below the checkpoint's step 8")


@pytest.mark.slow
def test_full_disk_in_the_sharded_save(synth, tmp_path):
    """ENOSPC inside DCP's writer (wrapped by DCP in its own exception): one line, the staging folder
    removed, and a run that never committed leaves no folder."""
    out = tmp_path / "r"
    r = train_patched("import torch.distributed.checkpoint as dcp\n"
                      "from torch.distributed.checkpoint.api import CheckpointException\n"
                      "def full(*a, **k):  # what DCP raises when a rank's write fails\n"
                      "    raise CheckpointException('save', {0: (OSError(errno.ENOSPC, 'No space left on device'), None)})\n"
                      "dcp.save = full\n", train_args(synth, out, 4))
    one_line(r, "No space left on device", "free space")
    assert not out.exists()


@pytest.mark.slow
def test_eval_and_report_write_every_file_or_none(synth, trained, tmp_path, monkeypatch):
    from state import eval as E
    d = synth
    run_script("predict.py", "test", f"--run={trained}", f"--data={d / 'prep'}", f"--split={d / 'split.json'}",
               f"--out={tmp_path / 't'}")
    real_plot = E.plot

    def fails(*a, **k):  # the last file of the results fails to write (a full disk)
        import errno
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ev" / "metrics.png"))
    monkeypatch.setattr(E, "plot", fails)
    args = [f"--pred={tmp_path / 't' / 'pred.h5ad'}", f"--real={tmp_path / 't' / 'real.h5ad'}",
            "--pert_col=perturbation", "--control=control", f"--out={tmp_path / 'ev'}", "--profile=minimal"]
    with pytest.raises(OSError):
        E.main(args)
    assert not (tmp_path / "ev").exists() and not any(".tmp" in f for f in os.listdir(tmp_path))
    monkeypatch.setattr(E, "plot", real_plot)
    E.main(args)
    assert (tmp_path / "ev" / "results.csv").exists()
    r = run_script("-m", "state.synth", str(tmp_path), ok=False)  # a folder as OUT: refused, no temp file
    one_line(r, "is a folder")
    assert not any(".tmp" in f for f in os.listdir(tmp_path.parent))
    one_line(run_script("-m", "state.demo", "--bogus", ok=False), "unrecognized arguments")


# --- output pipe closed by its reader (`| head`): one line, no traceback, nothing half-written --------

@pytest.mark.slow
@pytest.mark.parametrize("cmd", [["-m", "state.splits", "make", "--data={data}", "--task=zeroshot",
                                  "--context=ctxA", "--out={out}"],
                                 ["train.py", "--data={data}", "--split={split}", "--preset=tiny", "--max_steps=3",
                                  "--out={out}"]])
def test_closed_stdout_is_one_line(synth, tmp_path, cmd):
    out = tmp_path / "o"
    args = [a.format(out=out, split=synth / "split.json", data=synth / "prep") for a in cmd]
    p = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    p.stdout.close()  # the reader leaves before the first line
    err = p.stderr.read().decode()
    assert p.wait() == 2, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "output pipe was closed" in lines[0] and "Traceback" not in err, err
    assert not out.exists()  # the split file was not written; the run folder was removed


@pytest.mark.slow
def test_outputs_under_a_file_or_into_a_prepared_folder(synth, trained, tmp_path):
    """simulate --out=FILE/x.h5ad said 'File exists; it exists already' (os.makedirs on a file); predict.py
    test --out=a prepared folder wrote pred.h5ad/real.h5ad into it (eval, baselines, convert refuse one)."""
    f = tmp_path / "afile"
    f.write_text("x")
    real = tmp_path / "o" / "real.h5ad"
    base = ["predict.py", "test", f"--run={trained}", f"--data={synth / 'prep'}", f"--split={synth / 'split.json'}"]
    run_script(*base, f"--out={tmp_path / 'o'}")
    pert = json.load(open(trained / "meta.json"))["pert_names"][1]
    r = run_script("predict.py", "simulate", f"--run={trained}", f"--adata={real}", f"--perts={pert}",
                   f"--out={f / 's.h5ad'}", ok=False)
    one_line(r, "afile: is a file where a folder is needed")
    data = tmp_path / "prep"
    shutil.copytree(synth / "prep", data)
    before = sorted(os.listdir(data))
    one_line(run_script(*base, f"--out={data}", ok=False), "is a prepared folder")
    one_line(run_script(*base, f"--out={synth / 'prep'}", ok=False), "is the input folder")
    assert sorted(os.listdir(data)) == before and f.read_text() == "x"


@pytest.mark.slow
def test_predict_test_writes_the_pair_or_nothing(synth, trained, tmp_path):
    """predict.py test wrote pred.h5ad, then real.h5ad: a failed second write (a full disk) left a new pred.h5ad
    beside the previous real.h5ad in a reused --out, a pair of two runs. Now both (and spread.txt) or none."""
    out = tmp_path / "o"
    base = ["predict.py", "test", f"--run={trained}", f"--data={synth / 'prep'}", f"--split={synth / 'split.json'}",
            f"--out={out}"]
    run_script(*base)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    code = ("import errno, runpy, sys\nimport state.h5ad as h\nw = h.write_h5ad\n"
            "def bad(path, *a, **k):\n    if path.endswith('real.h5ad'):\n"
            "        raise OSError(errno.ENOSPC, 'No space left on device', path)\n    return w(path, *a, **k)\n"
            f"h.write_h5ad = bad\nsys.argv = {base + ['--seed=1']!r}\n"
            "runpy.run_path('predict.py', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    one_line(r, "No space left on device")
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
