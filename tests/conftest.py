import os
from pathlib import Path

# The Triton interpreter flag is read when @triton.jit decorates, so it must be set before any
# kernel module is imported: here, at collection time, whenever there is no GPU.
try:
    import torch
    _cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NANOSTATE_DATA", ROOT.parent / "shared" / "data"))
FILES = {
    "gbm": "perturbench_devel_norman19_mcfaline23.h5ad",
    "kang": "kang2018_ifnb_pbmc_muscat_counts.h5ad",
    "papalexi": "papalexi2021_thp1_eccite_sceptre.h5ad",
}


def real_file(name):
    """Path of one of the three shared real datasets, or skip the test saying where it looked."""
    p = DATA / FILES[name]
    if not p.exists():
        pytest.skip(f"real data file {p} not found (set NANOSTATE_DATA to the folder holding it)")
    return p


@pytest.fixture
def gbm_path():
    return real_file("gbm")


@pytest.fixture
def kang_path():
    return real_file("kang")


@pytest.fixture
def papalexi_path():
    return real_file("papalexi")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI (CI=true) a skipped test fails the run: real-data and parity tests must run there.
    Only GPU tests (marked gpu) may skip on a CPU machine."""
    outcome = yield
    rep = outcome.get_result()
    if os.environ.get("CI") and rep.skipped and "gpu" not in item.keywords:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"skipped under CI, which must run every real-data and parity test: {reason}"


def pytest_unconfigure(config):
    """After pytest has printed its summary: exit without interpreter teardown, where Triton's nanobind
    extension (imported by torch's optimizer when Triton is installed) prints dozens of leak lines."""
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(getattr(config, "_nanostate_status", 0))


def pytest_sessionfinish(session, exitstatus):
    session.config._nanostate_status = int(exitstatus)


def pytest_collection_modifyitems(config, items):
    if _cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for it in items:
        if "gpu" in it.keywords:
            it.add_marker(skip)


def run_script(*args, ok=True, threads=2, env=None):
    """Run a repo script (train.py, predict.py, embed.py) as a user does, from the repo root; raise
    with its output unless it succeeds (ok=False: return the result whatever happened)."""
    import subprocess
    import sys
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), **(env or {})}
    r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=e, capture_output=True, text=True)
    if ok and r.returncode != 0:
        raise AssertionError(f"{args} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def make_synth_prepared(d):
    """A small synthetic dataset prepared in d/prep with a few-shot split in d/split.json (train/dist tests)."""
    from state.prepare import prepare
    from state.splits import make_split
    from state.synth import make_synthetic
    make_synthetic(d / "s.h5ad", n_cells=1200, n_genes=40, n_perts=6, n_contexts=3, seed=0)
    D = prepare([str(d / "s.h5ad")], d / "prep", pert_col="perturbation", control="control",
                context_col="cell_type")
    make_split(D, task="fewshot", context=D.context_names[0], support=0.3, seed=0).save(d / "split.json")
    return d
