"""
Scale bench (issue 14): how the data path's memory and time grow with the number of cells, and how
fast the loader feeds a step with 0, 1 and 2 worker threads.

    python bench/bench_scale.py                                   # 250k, 2M, 10M cells; loader section
    python bench/bench_scale.py --sizes=250000,2000000 --loader=False    # quick
    python bench/bench_scale.py --scale=False --step_ms=5         # loader only

Scale section, per size: a synthetic file (python -m state.synth, 8 genes, 8 perturbations, 50
contexts, 4 batches; made once under --dir and kept), then each step in its own process, its peak RSS
from the kernel's rusage of that process (wait4): `state.data prepare`, `state.splits make`,
`train.py` start-up + 1 step (tiny preset), and the same with the anchored cpu preset (its shift table
from the group sums prepare writes, and again with sums.npy hidden: every training row read). In this process: SetSampler set-up on the split's train
part and the batch on each side of an epoch boundary. Then the per-cell RSS growth between sizes
(bytes per cell) and the growth exponent of wall time (log t2/t1 / log n2/n1; 1 = linear, 0 = flat).

Simulate section: a tiny ST trained 20 steps on a 2,000-gene synthetic set (2 contexts, 50
perturbations), then `predict.py simulate` of every perturbation in both contexts with --n_cells
controls each (default 2M predicted cells x 2,000 genes, 16 GB as float32): wall and peak RSS (its
output is written in row blocks).

Loader section: the same prepared 2,000-gene set; batches of 16 sets x 256 cells (plus as many
controls) through StepSampler with 0, 1, 2 worker threads: cells/s (target cells), and the share of
wall time spent waiting for data when each step takes --step_ms (a sleep: an accelerator step, during
which the host's cores are free for the workers).
"""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from state.config import configure  # noqa: E402
from state.errors import guard  # noqa: E402

guard("bench/bench_scale.py", __doc__)

dir = "/tmp/nsscale"     # work folder (synthetic files and prepared folders are kept for reruns)
sizes = "250000,2000000,10000000"
scale = True             # run the scale section
loader = True            # run the loader section
simulate = True          # run the virtual-screen section (predict.py simulate, streamed output)
sim_cells = 20000        # control cells drawn per (context, perturbation): 2 x 50 x 20,000 = 2M predicted
loader_cells = 60000     # cells of the 2,000-gene loader set
sets = 16                # loader batch: sets x set_size cells
set_size = 256
steps = 300              # loader steps per throughput measurement (40 left the 1-worker rate +-6% noisy)
wait_steps = 40          # loader steps per data-wait measurement (each sleeps step_ms)
repeats = 3              # loader measurements per worker count (median reported)
child = ""               # internal: "workers,sleep" = one loader measurement in this process
step_ms = 40.0           # simulated accelerator step (ms) for the data-wait share
KEYS = ("dir", "sizes", "scale", "loader", "loader_cells", "sets", "set_size", "steps", "wait_steps", "step_ms",
        "repeats", "child", "simulate", "sim_cells")
cfg = {k: v for k, v in dict(globals()).items() if k in KEYS}
configure(sys.argv[1:], cfg)
globals().update(cfg)
W = Path(dir)
W.mkdir(parents=True, exist_ok=True)
PY = sys.executable


def cpu_name():
    info = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    return f"{model}, {os.cpu_count()} threads, AVX-512 {'yes' if 'avx512f' in flags else 'no'}"


def measure(cmd, log):
    """Run cmd (list) as a child; -> (wall s, peak RSS bytes of that child). Output goes to `log`."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    dt = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"bench_scale: {' '.join(map(str, cmd))} failed ({p.returncode}); see {log}")
    return dt, ru.ru_maxrss * 1024


def g2000():
    """The 2,000-gene synthetic set (file, prepared folder), made once."""
    h5, prep = W / f"g2000_{loader_cells}.h5ad", W / f"g2000_{loader_cells}"
    if not h5.exists():
        measure([PY, "-m", "state.synth", h5, "--n_cells", str(loader_cells), "--n_genes", "2000", "--n_perts", "50",
                 "--n_contexts", "2"], W / "synth.log")
    if not (prep / "index.json").exists():
        measure([PY, "-m", "state.data", "prepare", h5, prep], W / "prepare.log")
    return h5, prep


def human(n):
    return f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1e3:g}k"


child or print(f"CPU: {cpu_name()} | torch {torch.__version__} | {time.strftime('%Y-%m-%d %H:%M')}")

# -----------------------------------------------------------------------------
# scale section
if scale:
    from state.data import Prepared
    from state.sampler import SetSampler
    from state.splits import Split
    rows = []
    for n in [int(float(x)) for x in sizes.split(",")]:
        h5, prep, sp, run = W / f"s{n}.h5ad", W / f"p{n}", W / f"split{n}.json", W / f"run{n}"
        if not h5.exists():
            measure([PY, "-m", "state.synth", h5, "--n_cells", str(n), "--n_genes", "8", "--n_perts", "8",
                     "--n_contexts", "50", "--n_batches", "4"], W / "synth.log")
        r = dict(n=n)
        if prep.exists():
            shutil.rmtree(prep)
        r["prepare"] = measure([PY, "-m", "state.data", "prepare", h5, prep, "--batch_col", "batch"], W / "prepare.log")
        r["split"] = measure([PY, "-m", "state.splits", "make", "--data", prep, "--task", "fewshot", "--context",
                              "ctx7", "--out", sp], W / "split.log")
        r["split_bytes"] = sp.stat().st_size
        if run.exists():
            shutil.rmtree(run)
        r["train"] = measure([PY, "train.py", f"--data={prep}", f"--split={sp}", "--preset=tiny", "--max_steps=1",
                              "--val_batches=1", "--threads=1", f"--out={run}"], W / "train.log")
        # anchored start-up (cpu preset: the shift table from the training part's group means) with the group
        # sums prepare writes, and as a folder without them (every training row read)
        for k, hide in (("anchor", False), ("anchor_all", True)):
            shutil.rmtree(run, ignore_errors=True)
            if hide:
                os.replace(prep / "sums.npy", prep / "sums.hidden")
            try:
                r[k] = measure([PY, "train.py", f"--data={prep}", f"--split={sp}", "--preset=cpu", "--max_steps=1",
                                "--val_batches=1", "--threads=1", f"--out={run}"],
                               W / "train.log")
            finally:
                if hide:
                    os.replace(prep / "sums.hidden", prep / "sums.npy")
        D = Prepared(prep)
        s = Split.load(sp).validate(D)
        t0 = time.perf_counter()
        smp = SetSampler(D, s.part("train"), set_size=32, batch_size=16, seed=0)
        r["sampler_init"] = time.perf_counter() - t0
        last = smp.steps_per_epoch - 1
        smp.batch(0, 0)  # warm
        t0 = time.perf_counter(); smp.batch(0, last); r["batch_end"] = time.perf_counter() - t0
        t0 = time.perf_counter(); smp.batch(1, 0); r["batch_next_epoch"] = time.perf_counter() - t0
        r["x_bytes"] = (prep / "X.bin").stat().st_size
        rows.append(r)
        print(f"{human(n):>5} cells: prepare {r['prepare'][0]:6.1f}s {r['prepare'][1] / 2**20:6.0f} MB | split "
              f"{r['split'][0]:5.1f}s {r['split'][1] / 2**20:5.0f} MB, file {r['split_bytes']:,} B | train start-up + 1 step "
              f"{r['train'][0]:5.1f}s {r['train'][1] / 2**20:5.0f} MB | anchored (cpu preset) start-up "
              f"{r['anchor'][0]:5.1f}s {r['anchor'][1] / 2**20:5.0f} MB, without sums.npy {r['anchor_all'][0]:5.1f}s "
              f"{r['anchor_all'][1] / 2**20:5.0f} MB | sampler init {r['sampler_init'] * 1e3:.0f} ms, "
              f"last batch of epoch 0 {r['batch_end'] * 1e3:.1f} ms, first of epoch 1 {r['batch_next_epoch'] * 1e3:.1f} ms",
              flush=True)
    print("\ngrowth between sizes (RSS bytes per cell; wall-time exponent, 1 = linear):")
    print("| cells | prepare B/cell | split B/cell | train start-up B/cell | prepare t exp | split t exp | "
          "train t exp | train wall ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for a, b in zip(rows[:-1], rows[1:]):
        dn = b["n"] - a["n"]
        per = {k: (b[k][1] - a[k][1]) / dn for k in ("prepare", "split", "train")}
        ex = {k: math.log(b[k][0] / a[k][0]) / math.log(b["n"] / a["n"]) for k in ("prepare", "split", "train")}
        print(f"| {human(a['n'])} -> {human(b['n'])} | {per['prepare']:.1f} | {per['split']:.1f} | {per['train']:.1f} | "
              f"{ex['prepare']:.2f} | {ex['split']:.2f} | {ex['train']:.2f} | {b['train'][0] / a['train'][0]:.2f}x |")
    a, b = rows[-2], rows[-1]
    print("\nprojection to 100M cells (the largest size plus the last step's per-cell growth, linear):")
    for k in ("prepare", "split", "train", "anchor"):
        per = (b[k][1] - a[k][1]) / (b["n"] - a["n"])
        print(f"  {k}: peak RSS {(b[k][1] + per * (1e8 - b['n'])) / 2**30:.2f} GiB")
    print(f"  X.bin {b['x_bytes'] / b['n'] * 1e8 / 2**30:.1f} GiB at 8 float32 features (2,000 genes: x250)")
    json.dump(rows, open(W / "scale.json", "w"), default=str)

# -----------------------------------------------------------------------------
# loader section
if loader:
    from state.data import Prepared
    from state.sampler import SetSampler, StepSampler
    h5, prep = g2000()
    D = Prepared(prep)
    D.rows(np.arange(0, D.n_cells, 1))  # page cache warm: the loader is measured on memory, not disk
    cells = sets * set_size
    child or print(f"\nloader: {D.n_cells:,} cells x {D.n_genes} genes float32, batches of {sets} sets x {set_size} cells "
          f"(+ as many controls), {steps} steps per rate, {wait_steps} per data wait")
    import threading
    rng = np.random.default_rng(0)
    idx = [np.sort(rng.integers(0, D.n_cells, 2 * cells)) for _ in range(80)]

    def copy(ix):
        for i in ix:
            D.X[i]

    def ceiling():
        """The same volume of plain memmap row copies in 1 and in 2 threads (numpy releases the GIL):
        what this machine's memory system allows, whatever the loader does."""
        t0 = time.perf_counter(); copy(idx); t1 = time.perf_counter() - t0
        th = [threading.Thread(target=copy, args=(idx[k::2],)) for k in range(2)]
        t0 = time.perf_counter(); [x.start() for x in th]; [x.join() for x in th]
        return t1 / (time.perf_counter() - t0)

    def one(w, sleep):
        n = wait_steps if sleep else steps
        ss = StepSampler(SetSampler(D, np.arange(D.n_cells), set_size, sets, seed=0), workers=w, prefetch=2)
        for _ in range(n):  # warm-up: queues filled, and each worker process has mapped X's pages once
            ss.next()
            if sleep:
                time.sleep(sleep)
        ss.wait, b0 = 0.0, (ss.built, ss.n_built)
        t0 = time.perf_counter()
        for _ in range(n):
            ss.next()
            if sleep:
                time.sleep(sleep)
        dt = time.perf_counter() - t0
        ss.close()
        return cells * n / dt, ss.wait / dt, ss.capacity(b0) * cells  # the last: the loader's own estimate

    if child:  # one measurement in a fresh process: no allocator or page state left by another one
        w, sleep = child.split(",")
        print(json.dumps(one(int(w), float(sleep))))
        sys.exit(0)

    def fresh(w, sleep):
        r = subprocess.run([PY, __file__, f"--dir={dir}", f"--loader_cells={loader_cells}", f"--sets={sets}",
                            f"--set_size={set_size}", f"--steps={steps}", f"--wait_steps={wait_steps}", "--scale=False",
                            f"--child={w},{sleep}"],
                           capture_output=True, text=True, cwd=ROOT, check=True)
        return json.loads(r.stdout.strip().splitlines()[-1])

    res = {w: [] for w in (0, 1, 2)}
    ceil = []
    for r in range(repeats):  # interleaved, so that a noisy minute hits every worker count
        ceil.append(ceiling())
        for w in (0, 1, 2):
            rate, _, cap = fresh(w, 0.0)
            res[w].append((rate, fresh(w, step_ms / 1e3)[1], cap))
    print(f"plain memmap copies, 2 threads vs 1 (this machine's ceiling for any loader): "
          f"{np.median(ceil):.2f}x (runs {', '.join(f'{c:.2f}' for c in ceil)})")
    print(f"median of {repeats} interleaved runs:")
    print("| workers | cells/s (no step) | loader's own estimate | ratio to 0 workers | ratio to 1 worker (per run) | "
          f"data wait with a {step_ms:.0f} ms step |")
    print("|---|---|---|---|---|---|")
    med = {w: [np.median([x[i] for x in v]) for i in range(3)] for w, v in res.items()}
    for w, (rate, wait, cap) in med.items():
        pair = [a[0] / b[0] for a, b in zip(res[w], res[1])]  # the same repeat: paired
        runs = ", ".join(f"{x:.2f}" for x in pair)
        print(f"| {w} | {rate:,.0f} | {cap:,.0f} | {rate / med[0][0]:.2f}x | "
              f"{f'{np.median(pair):.2f}x ({runs})' if w else '-'} | "
              f"{100 * wait:.1f}% (runs {', '.join(f'{100 * x[1]:.1f}' for x in res[w])}) |", flush=True)

# -----------------------------------------------------------------------------
# virtual screen section
if simulate:
    h5, prep = g2000()
    sp, run, out = W / "g2000_split.json", W / "g2000_run", W / "g2000_screen.h5ad"
    measure([PY, "-m", "state.splits", "make", "--data", prep, "--task", "fewshot", "--context", "ctxB",
             "--out", sp], W / "split.log")
    shutil.rmtree(run, ignore_errors=True)
    measure([PY, "train.py", f"--data={prep}", f"--split={sp}", "--preset=tiny", "--max_steps=20", "--threads=2",
             f"--out={run}"], W / "train.log")
    from state.data import Prepared
    (W / "perts.txt").write_text("\n".join(Prepared(prep).pert_names[1:]))  # every perturbation
    t, rss = measure([PY, "predict.py", "simulate", f"--run={run}", f"--adata={h5}", f"--perts={W / 'perts.txt'}",
                      f"--n_cells={sim_cells}", f"--out={out}"], W / "simulate.log")
    from state.h5ad import H5AD
    with H5AD(out) as f:
        n, g = f.matrix("X").shape
    print(f"\nvirtual screen: {n:,} cells x {g} genes written ({n * g * 4 / 2**30:.1f} GiB of float32) in {t:.0f}s, "
          f"peak RSS {rss / 2**30:.2f} GiB (target < 2 GiB); file {out.stat().st_size / 2**30:.1f} GiB")
    out.unlink()
