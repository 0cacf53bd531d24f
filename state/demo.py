"""
The quickstart: the whole pipeline on an embedded synthetic dataset, on CPU, in a few minutes.

    python -m state.demo [--out runs/quickstart] [--max_steps 1500]

It runs, and prints, the same commands a user runs on their own data:
  1. python -m state.synth            a small Perturb-seq-like dataset (3 contexts x 12 perturbations)
  2. python -m state.data prepare     sorted memory-mapped matrix + JSON index
  3. python -m state.splits make      few-shot split: ctxC held out, 30% of its perturbations train
  4. python train.py                  ST with the cpu preset (hidden 128, 4 layers, anchored on the auto
                                      baseline's shift, cosine lr, EMA), energy-distance loss
  5. python predict.py test           pred.h5ad / real.h5ad for the held-out groups
  6. python -m state.baselines report  ST next to the perturbation-mean, context-mean and linear baselines
"""

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time

from state.errors import Parser
from state.errors import run as run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd):
    print(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"[demo] done in {time.time() - t:.1f}s", flush=True)


def main(argv=None):
    ap = Parser(prog="python -m state.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/quickstart", help="work directory (a previous demo's is replaced)")
    ap.add_argument("--max_steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = os.path.join(ROOT, a.out) if not os.path.isabs(a.out) else a.out
    mark = os.path.join(out, ".nanostate-demo")
    if os.path.exists(out) and os.listdir(out) and not os.path.exists(mark):  # never delete a user's folder
        print(f"state.demo: --out={out} exists and was not made by the demo; choose another --out", file=sys.stderr)
        sys.exit(2)
    if os.path.exists(out):
        shutil.rmtree(out)  # the previous demo's files
    os.makedirs(out)
    open(mark, "w").close()
    py = sys.executable
    h5, data, split, run_dir = (os.path.join(out, x) for x in ("synth.h5ad", "data", "split.json", "st"))
    t0 = time.time()
    run([py, "-m", "state.synth", h5, f"--seed={a.seed}"])
    run([py, "-m", "state.data", "prepare", h5, data, "--pert_col=perturbation", "--control=control",
         "--context_col=cell_type"])
    run([py, "-m", "state.splits", "make", f"--data={data}", "--task=fewshot", "--context=ctxC",
         "--support=0.3", f"--seed={a.seed}", f"--out={split}"])
    run([py, "train.py", f"--data={data}", f"--split={split}", "--preset=cpu", f"--out={run_dir}",
         f"--max_steps={a.max_steps}", "--threads=1"])
    run([py, "predict.py", "test", f"--run={run_dir}", f"--data={data}", f"--split={split}",
         f"--out={run_dir}/test"])
    run([py, "-m", "state.baselines", "report", f"--data={data}", f"--split={split}",
         f"--pred=ST={run_dir}/test/pred.h5ad", f"--out={os.path.join(out, 'report')}"])
    print(f"\n[demo] whole pipeline in {time.time() - t0:.0f}s; files in {out}")


if __name__ == "__main__":
    run_cli("python -m state.demo", main, None, __doc__)
