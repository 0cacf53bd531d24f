"""Distributed training on CPU (gloo) under torchrun, as a user launches it: FSDP2, gradient
accumulation normalised by the global set count, the world-size-independent data order, sharded DCP
checkpoints resumed at another world size, and the consolidated model.safetensors predict.py loads.
Budget: ~60 s on 2 cores (three 2-process runs, three 1-process runs; loader processes in two)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_synth_prepared
import torch

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # fp32 sums in another order (gradient reduce, accumulation): relative


def run(nproc, d, out, steps, accum, *extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable] if nproc == 0 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launch, "train.py", f"--data={d / 'prep'}", f"--split={d / 'split.json'}", "--preset=tiny",
           f"--out={out}", f"--max_steps={steps}", f"--grad_accum={accum}", "--batch_size=4",
           "--log_every=1", "--val_every=3", "--val_batches=3", "--ckpt_every=100",
           *extra]  # dropout on (preset 0.1): its masks are seeded per global micro-batch
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        err = "\n".join(l for l in r.stderr.splitlines() if "leaked" not in l and "nanobind" not in l)
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{err[-6000:]}")
    return r


def log(out):
    rows = [json.loads(l) for l in open(Path(out) / "log.jsonl")]
    return ({x["step"]: x["loss"] for x in rows if "loss" in x},
            {x["step"]: x["val_loss"] for x in rows if "val_loss" in x})


def close(a, b):
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    for k in a:
        assert abs(a[k] - b[k]) <= TOL * max(1.0, abs(a[k])), (k, a[k], b[k])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = make_synth_prepared(tmp_path_factory.mktemp("dist"))
    run(0, d, d / "one", 6, 4)        # 1 process x 4 micro-steps
    run(2, d, d / "two", 6, 2, "--workers=1")  # 2 processes x 2 micro-steps (the same global batch of
    # 16 sets), each rank fed by a loader process: the batches do not depend on where they are built
    return d


@pytest.mark.slow
def test_two_procs_equal_one_proc_with_twice_the_accumulation(runs):
    d = runs
    l1, v1 = log(d / "one")
    l2, v2 = log(d / "two")
    assert sorted(l1) == list(range(1, 7))
    close(l1, l2)
    close(v1, v2)  # the val batches do not depend on the world size either
    assert len({round(x, 5) for x in l1.values()}) > 1  # training moves the loss: the test can fail
    # checkpoints: consolidated fp32 weights equal; a DCP dir with one shard file per rank
    from safetensors.torch import load_file
    w1, w2 = load_file(d / "one" / "model.safetensors"), load_file(d / "two" / "model.safetensors")
    assert w1.keys() == w2.keys() and all(v.dtype == torch.float32 for v in w2.values())
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-4)
    assert sorted(f for f in os.listdir(d / "two" / "ckpt" / "dcp") if f.endswith(".distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]
    meta = json.load(open(d / "two" / "meta.json"))
    assert meta["world"] == 2 and meta["global_batch"] == 16 and meta["parallel"] == "fsdp"
    st = torch.load(d / "two" / "state.pt", weights_only=True)
    assert st["sampler"]["cursor"] == 6 * 4 and len(st["rng_ranks"]) == 2
    # predict.py loads the consolidated file of the 2-process run
    sys.path.insert(0, str(ROOT))
    from predict import load_run
    model, m = load_run(str(d / "two"))
    x = torch.rand(2, model.cfg.set_size, model.cfg.n_in)
    assert model(x, torch.tensor([1, 2])).shape == x.shape


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [(2, 0), (0, 2)])
def test_resume_at_another_world_size(runs, first, then):
    """Stopped at step 3 (checkpoint) under one world size, resumed to 6 under another: the losses
    and the final weights follow the uninterrupted run."""
    d = runs
    out = d / f"resume{first}{then}"
    run(first, d, out, 3, 4 // max(first, 1))
    run(then, d, out, 6, 4 // max(then, 1), "--resume", f"--workers={2 if then == 0 else 0}")  # any workers
    l, v = log(out)
    lu, vu = log(d / "one")
    close(lu, l)
    close(vu, v)
    from safetensors.torch import load_file
    a, b = load_file(d / "one" / "model.safetensors"), load_file(out / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert sorted(f for f in os.listdir(out) if f.startswith("ckpt-")) == ["ckpt-6"]  # older ones pruned


def test_step_sampler_shards_without_overlap():
    """Rank blocks of a step are disjoint, their union is the world=1 step, and a cursor saved at one
    world size resumes at another."""
    from state.sampler import StepSampler

    class Fake:  # a SetSampler stand-in: batch (epoch, step) -> the set ids it holds
        seed, S, B, steps_per_epoch = 0, 16, 4, 5

        def batch(self, e, s):
            return (e, s)

    one = StepSampler(Fake(), 0, 1, 4)
    two = [StepSampler(Fake(), r, 2, 2) for r in range(2)]
    for _ in range(4):  # crosses epochs (5 micro-batches each)
        want = one.next()
        got = [b for s in two for b in s.next()]
        assert got == want and len(set(got)) == 4
    sd = two[0].state_dict()
    again = StepSampler(Fake(), 0, 1, 4)
    again.load_state_dict(sd)
    assert again.next() == one.next()
    with pytest.raises(ValueError):
        bad = Fake()
        bad.B = 8
        StepSampler(bad, 0, 1, 4).load_state_dict(sd)


@pytest.mark.slow
def test_embed_fit_under_torchrun_resumes_at_another_world_size(tmp_path):
    """SE pre-training on the same data path and checkpoint as train.py: 2 processes (FSDP2, gloo) stopped
    at step 2 and resumed from the sharded DCP checkpoint by 1 process with twice the accumulation (the same
    global batch, from the global cursor) end with the weights of 1 process run straight through."""
    from safetensors.torch import load_file
    from state.prepare import prepare
    from state.synth import make_synthetic
    make_synthetic(tmp_path / "a.h5ad", n_cells=300, n_genes=30, n_perts=2, n_contexts=2, seed=5, counts=True)
    prepare(tmp_path / "a.h5ad", tmp_path / "pa", pert_col="")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    common = ["embed.py", "fit", f"--data={tmp_path / 'pa'}", "--batch_size=8", "--save_every=2", "--pca_dim=6",
              "--val_cells=4", "--eval_every=100", "--log_every=100", "--d_model=16", "--ff=32", "--n_head=2",
              "--n_layer=1", "--d_out=12", "--pad_length=16", "--count_hidden=8", "--P=4", "--N=4", "--S=4",
              "--dropout=0.0", "--max_steps=4"]  # no dropout: per-rank dropout streams differ by design
    tr = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

    def fit(launch, out, *extra):
        r = subprocess.run([*launch, *common, f"--out={tmp_path / out}", *extra], cwd=ROOT, env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        return r.stdout

    fit([sys.executable], "one", "--grad_accum=2")
    o = fit(tr, "se", "--stop_at=2")
    assert "fsdp x 2" in o
    assert (tmp_path / "se" / "ckpt" / "dcp" / ".metadata").exists()
    o = fit([sys.executable], "se", "--grad_accum=2", "--resume")
    assert "resuming a world-2 run at world 1" in o, o[-2000:]
    assert json.load(open(tmp_path / "se" / "meta.json"))["step"] == 4
    st = torch.load(tmp_path / "se" / "state.pt", weights_only=True)
    assert st["sampler"]["cursor"] == 2 * 2 + 2 * 2  # 2 steps x 2 ranks, then 2 steps x 2 micro-batches
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "se" / "model.safetensors")
    assert a.keys() == b.keys()
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)  # one Adam step moves a weight by ~lr = 1e-3
    assert gap < 1e-4, gap


@pytest.mark.slow
def test_group_means_sharded_over_ranks_equal_one_process(tmp_path):
    """The anchor table's group means under torchrun: each rank reads every world-th segment, the sums
    are all-reduced, and every rank gets what one process computes alone."""
    import numpy as np
    from state.baselines import group_means
    from state.data import Prepared
    from state.splits import Split
    d = make_synth_prepared(tmp_path)
    script = tmp_path / "gm.py"
    script.write_text(
        "import sys\nimport numpy as np\nimport torch.distributed as dist\n"
        "from state.baselines import group_means\nfrom state.data import Prepared\nfrom state.splits import Split\n"
        "dist.init_process_group('gloo')\n"
        "D = Prepared(sys.argv[1]); sp = Split.load(sys.argv[2]); sp.validate(D)\n"
        "M = group_means(D, sp.part('train'), shard=True); ks = sorted(M)\n"
        "np.savez(f'{sys.argv[3]}{dist.get_rank()}.npz', keys=np.array(ks), means=np.stack([M[k][0] for k in ks]),"
        " n=np.array([M[k][1] for k in ks]))\n"
        "dist.destroy_process_group()\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
                        d / "prep", d / "split.json", tmp_path / "m"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    D = Prepared(d / "prep")
    sp = Split.load(d / "split.json")
    sp.validate(D)
    M = group_means(D, sp.part("train"))
    ks = sorted(M)
    for rank in (0, 1):
        z = np.load(tmp_path / f"m{rank}.npz")
        assert [tuple(k) for k in z["keys"]] == ks and list(z["n"]) == [M[k][1] for k in ks]
        np.testing.assert_allclose(z["means"], np.stack([M[k][0] for k in ks]), rtol=1e-12, atol=1e-12)
