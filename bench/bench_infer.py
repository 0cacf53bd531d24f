"""
Inference bench (issue 21): nanostate on an imported arc-state ST model vs arc-state itself (`state tx infer`),
same model, same input file, same CPU, same thread count, in one run; cells/s end to end and forward only.

    python bench/bench_infer.py --arc_python=/work/arcvenv/bin/python            # state_sm, 1 thread
    python bench/bench_infer.py --arc_python=... --threads=2 --cells=1024 --perts=8

arc-state runs only as a subprocess of its own venv (--arc_python; its top-level module is also called
`state`). Steps:
  1. a real arc-state run of the chosen preset (`state tx train`, --train_steps steps on the Papalexi file:
     all 299 genes as X_hvg, 25 knockouts; kept in --dir for reruns) and its import (python -m state.convert);
  2. an input file: per perturbation (the first --perts of the run, plus the control) --cells cells of
     one cell type, the controls real Papalexi control cells: what `state tx infer` predicts (every row)
     and what `predict.py simulate --n_cells=--cells` predicts (the same number of cells per perturbation);
  3. end to end: each tool's command, wall time of the whole process (start-up, loading, forward, writing);
  4. forward only: the model calls on the same windows of S cells in each tool's own process, model loaded
     beforehand: arc-state's predict_step one window per call (as `state tx infer` calls it), nanostate's
     forward one window per call, and batched as predict.py does (--max_cells per call); on a CPU with
     bf16 units (AMX/avx512_bf16) also nanostate's batched forward under bf16 autocast, with its max |diff|
     to fp32 (predict.py computes in fp32 by default, the parity-tested path; with bf16 units the end to
     end row is also run with `predict.py --dtype=bfloat16`).
Prints the CPU (model, AVX-512, threads), each figure and the ratios side by side.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from state.config import configure  # noqa: E402
from state.errors import guard  # noqa: E402

guard("bench/bench_infer.py", __doc__)

arc_python = ""          # python of a venv with arc-state (required)
dir = "/tmp/nsbench_infer"  # work folder (the arc-state run, its import and the input file are kept)
preset = "state_sm"      # arc-state model preset: state_sm (hidden 672, 4 layers, S 128) | state (768, 8, S 512)
train_steps = 2          # steps of `state tx train` that make the run (weights only need to exist)
threads = 1              # torch threads (and OMP_NUM_THREADS) in every process of both tools
cells = 512              # cells per perturbation (controls and each perturbation)
perts = 8                # perturbations predicted (plus the control)
repeats = 3              # forward-only passes (median)
max_cells = 8192         # nanostate's batched forward: cells per call (predict.py's default)
data = str(ROOT.parent / "shared" / "data" / "papalexi2021_thp1_eccite_sceptre.h5ad")
KEYS = ("arc_python", "dir", "preset", "train_steps", "threads", "cells", "perts", "repeats", "max_cells", "data")
cfg = {k: v for k, v in dict(globals()).items() if k in KEYS}
configure(sys.argv[1:], cfg)
globals().update(cfg)
if not arc_python or not os.path.isfile(arc_python):
    from state.errors import die
    die(f"bench/bench_infer.py: --arc_python={arc_python!r}: give the python of a venv with arc-state installed")
W = Path(dir)
W.mkdir(parents=True, exist_ok=True)
ENV = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "WANDB_MODE": "disabled",
       "TQDM_DISABLE": "1"}
ARC_CLI = str(Path(arc_python).parent / "state")


def sh(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, **kw)
    if r.returncode:
        sys.exit(f"bench/bench_infer.py: failed ({r.returncode}): {' '.join(map(str, cmd))}\n{r.stderr[-3000:]}")
    return r


def cpu():
    info = open("/proc/cpuinfo").read()
    model = re.search(r"model name\s*:\s*(.*)", info).group(1).strip()
    flags = set(re.search(r"flags\s*:\s*(.*)", info).group(1).split())
    avx = sorted(f for f in flags if f.startswith(("avx512", "amx")))
    return f"{model}, {os.cpu_count()} logical CPUs, AVX-512: {'yes (' + ' '.join(avx[:6]) + ' ...)' if avx else 'no'}"


# --- 1. the arc-state run and its import -------------------------------------------------------------

def make_inputs():
    """The training file (all Papalexi cells, obsm X_hvg = the 299 log1p genes), its TOML and the infer input."""
    import numpy as np

    from state.h5ad import H5AD, write_h5ad
    with H5AD(data) as f:
        genes = [str(g) for g in f.var_names()]
        X = f.matrix("X").rows(np.arange(f.n_obs))
        tg = np.asarray(f.column("target_gene")).astype(str)
        ct = np.asarray(f.column("cell_type")).astype(str)
        rep = np.asarray(f.column("bio_rep")).astype(str)
        names = np.asarray(f.obs_names).astype(str)
    obs = {"target_gene": tg, "cell_type": ct, "bio_rep": rep}
    var = {"gene_name": np.array(genes, dtype=object), "highly_variable": np.ones(len(genes), bool)}
    (W / "train").mkdir(exist_ok=True)
    write_h5ad(str(W / "train" / "pap.h5ad"), X, names, genes, obs=obs, var=var, obsm={"X_hvg": X})
    (W / "split.toml").write_text(f'[datasets]\npap = "{W / "train"}"\n\n[training]\npap = "train"\n\n'
                                  '[fewshot."pap.THP-1"]\nval = ["ATF2"]\ntest = ["CD86"]\n')
    labels = sorted(set(tg) - {"non-targeting"})[:perts]
    ctrl = np.flatnonzero(tg == "non-targeting")[:cells]
    rows = np.concatenate([ctrl] * (len(labels) + 1))  # the labelled rows are placeholders: infer redraws controls
    lab = np.concatenate([["non-targeting"] * len(ctrl)] + [[p] * len(ctrl) for p in labels])
    write_h5ad(str(W / "cells.h5ad"), X[rows], [f"c{i}" for i in range(len(rows))], genes,
               obs={"target_gene": lab, "cell_type": ct[rows], "bio_rep": rep[rows]}, var=var, obsm={"X_hvg": X[rows]})
    return labels, len(ctrl)


def arc_run():
    run = W / "runs" / preset
    if (run / "checkpoints" / "final.ckpt").exists():
        return run
    sh([ARC_CLI, "tx", "train", f"data.kwargs.toml_config_path={W / 'split.toml'}", "data.kwargs.embed_key=X_hvg",
        "data.kwargs.output_space=gene", "data.kwargs.pert_col=target_gene", "data.kwargs.control_pert=non-targeting",
        "data.kwargs.cell_type_key=cell_type", "data.kwargs.batch_col=bio_rep", "data.kwargs.num_workers=0",
        "data.kwargs.pin_memory=false", f"training.max_steps={train_steps}", "training.batch_size=2",
        "training.val_freq=1000", "training.ckpt_every_n_steps=1000", "use_wandb=false", "wandb.local_wandb_dir=/tmp",
        f"output_dir={W / 'runs'}", f"name={preset}", "overwrite=true", f"model={preset}"])
    return run


# --- 3. / 4. timing ----------------------------------------------------------------------------------

ARC_FORWARD = r"""
import sys, time, json, numpy as np, torch, anndata as ad
torch.set_num_threads(int(sys.argv[3]))
from state.tx.models.state_transition import StateTransitionPerturbationModel
m = StateTransitionPerturbationModel.load_from_checkpoint(sys.argv[1] + "/checkpoints/final.ckpt", map_location="cpu").eval()
pmap = torch.load(sys.argv[1] + "/pert_onehot_map.pt", weights_only=False)
w = np.load(sys.argv[2])
X, win, pert = w["X"], w["win"], [str(p) for p in w["pert"]]
times = []
with torch.no_grad():
    for r in range(int(sys.argv[4])):
        t0 = time.perf_counter()
        for i in range(len(win) - 1):
            x = torch.from_numpy(X[win[i]:win[i + 1]])
            b = {"ctrl_cell_emb": x, "pert_emb": pmap[pert[i]].float()[None].repeat(len(x), 1), "pert_name": [pert[i]] * len(x)}
            m.predict_step(b, batch_idx=0, padded=False)
        times.append(time.perf_counter() - t0)
print(json.dumps({"seconds": sorted(times)[len(times) // 2], "cells": int(win[-1])}))
"""


def windows(m, S, labels):
    """The same windows for both tools: per perturbation, m controls in windows of S (the last short)."""
    import numpy as np

    from state.h5ad import H5AD
    with H5AD(str(W / "cells.h5ad")) as f:
        X = f.matrix("obsm/X_hvg").rows(np.arange(m))
    rng = np.random.default_rng(0)
    xs, win, pert = [], [0], []
    for p in ["non-targeting"] + labels:
        d = X[rng.integers(0, len(X), m)]
        for a in range(0, m, S):
            xs.append(d[a:a + S])
            win.append(win[-1] + len(xs[-1]))
            pert.append(p)
    np.savez(W / "windows.npz", X=np.concatenate(xs), win=np.array(win), pert=np.array(pert))
    return np.concatenate(xs), win, pert


def nano_forward(nano, X, win, pert):
    import numpy as np
    import torch

    from predict import load_run, predict_windows
    torch.set_num_threads(threads)
    model, meta = load_run(str(nano))
    code = {n: i for i, n in enumerate(meta["pert_names"])}
    ws = [(np.arange(win[i], win[i + 1]), code[pert[i]], None, 0) for i in range(len(pert))]
    out = {}
    with torch.no_grad():
        for name, fn in (("one window per call", lambda: [model(torch.from_numpy(X[win[i]:win[i + 1]])[None],
                                                               torch.tensor([code[pert[i]]])) for i in range(len(pert))]),
                         (f"batched ({max_cells} cells per call)", lambda: predict_windows([model], X, ws, "cpu", max_cells))):
            fn()  # warm-up
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            out[name] = sorted(ts)[len(ts) // 2]
        from state.dist import cpu_has_bf16
        if cpu_has_bf16():  # AMX / avx512_bf16: the forward of predict.py --dtype=bfloat16
            ref = predict_windows([model], X, ws, "cpu", max_cells)
            lo = predict_windows([model], X, ws, "cpu", max_cells, dtype="bfloat16")  # predict.py --dtype=bfloat16
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                predict_windows([model], X, ws, "cpu", max_cells, dtype="bfloat16")
                ts.append(time.perf_counter() - t0)
            err = max(float(np.abs(a - b).max()) for a, b in zip(ref, lo))
            out[f"batched, bf16 autocast (max |diff| to fp32 {err:.2g})"] = sorted(ts)[len(ts) // 2]
    return out


def main():
    print(f"CPU: {cpu()}; threads {threads} per process (OMP_NUM_THREADS, torch.set_num_threads)")
    labels, m = make_inputs()  # m cells per label: --cells, or all the file's controls if fewer
    n_total = m * (len(labels) + 1)
    run = arc_run()
    nano = W / "nano" / preset
    if not (nano / "meta.json").exists():
        shutil.rmtree(nano, ignore_errors=True)
        sh([sys.executable, "-m", "state.convert", f"--arc_run={run}", f"--out={nano}"], cwd=ROOT)
    meta = json.load(open(nano / "meta.json"))
    S, c = meta["st"]["set_size"], meta["st"]
    print(f"model: arc-state {preset} (hidden {c['hidden']}, {c['n_layers']} layers, {c['n_heads']} heads, S {S}, "
          f"{c['n_in']} genes in/out, {len(meta['pert_names'])} perturbations); input {n_total} cells "
          f"({m} x {len(labels)} perturbations + control)")
    # end to end: the whole command
    rows = []
    t0 = time.perf_counter()
    sh([ARC_CLI, "tx", "infer", "--model-dir", str(run), "--adata", str(W / "cells.h5ad"), "--embed-key", "X_hvg",
        "--pert-col", "target_gene", "--output", str(W / "arc_out.h5ad"), "--quiet"])
    t_arc = time.perf_counter() - t0
    t0 = time.perf_counter()
    sh([sys.executable, "predict.py", "simulate", f"--run={nano}", f"--adata={W / 'cells.h5ad'}",
        f"--perts={','.join(labels + ['non-targeting'])}", f"--n_cells={m}", f"--out={W / 'nano_out.h5ad'}"], cwd=ROOT)
    t_nano = time.perf_counter() - t0
    rows.append(("end to end (whole command)", n_total / t_arc, n_total / t_nano))
    from state.dist import cpu_has_bf16
    if cpu_has_bf16():  # predict.py --dtype=bfloat16: the same command with the forward under bf16 autocast
        t0 = time.perf_counter()
        sh([sys.executable, "predict.py", "simulate", f"--run={nano}", f"--adata={W / 'cells.h5ad'}",
            f"--perts={','.join(labels + ['non-targeting'])}", f"--n_cells={m}", f"--out={W / 'nano_bf16.h5ad'}",
            "--dtype=bfloat16"], cwd=ROOT)
        rows.append(("end to end, predict.py --dtype=bfloat16 (arc-state in fp32)", n_total / t_arc,
                     n_total / (time.perf_counter() - t0)))
    # forward only
    X, win, pert = windows(m, S, labels)
    r = json.loads(sh([arc_python, "-c", ARC_FORWARD, str(run), str(W / "windows.npz"), str(threads),
                       str(repeats)], cwd=W).stdout.strip().splitlines()[-1])  # cwd: not this repo's `state`
    nf = nano_forward(nano, X, win, pert)
    for name, t in nf.items():
        rows.append((f"forward: arc 1 window/call vs nanostate {name}", r["cells"] / r["seconds"], r["cells"] / t))
    print(f"\n{'':74s} {'arc-state':>12s} {'nanostate':>12s} {'ratio':>7s}")
    for name, a, b in rows:
        print(f"{name:74s} {a:9.0f} c/s {b:9.0f} c/s {b / a:6.2f}x")
    print(f"(end to end: arc `state tx infer` {t_arc:.1f}s, nanostate `predict.py simulate` {t_nano:.1f}s, "
          f"{n_total} cells each, process start-up and file writing included)")


if __name__ == "__main__":
    main()
