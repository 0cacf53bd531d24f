"""
Benchmark: state.eval vs cell-eval 0.8.2 (`cell-eval run`, --profile full) on the same synthetic
pred/real pair: wall time, peak RSS, and the largest difference between the shared metrics.

    python bench/bench_eval.py [--perts 100] [--cells 200] [--genes 2000] [--ctrl 200] \
        [--cell_eval /work/refvenv/bin/cell-eval] [--dir /tmp/bench_eval] [--skip_celleval]

Both run single-threaded as subprocesses (ours: torch threads 1; cell-eval: --num-threads 1).
The pair: log1p(normalize_total(NB counts)) with 10% of genes moved per perturbation; the "pred"
file has the same controls and 0.7x the effects with fresh noise, so DE and every metric are
non-trivial. Peak memory is each child's max RSS (getrusage of a wrapper process).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from state.config import dashes  # noqa: E402  (--key-name spellings still parse)


def make_pair(d, P, n, G, nc, seed=0):
    from state.h5ad import write_h5ad
    rng = np.random.default_rng(seed)
    mu = np.exp(rng.normal(-1.0, 1.2, G))
    eff = np.zeros((P + 1, G))
    for p in range(1, P + 1):
        j = rng.choice(G, G // 10, replace=False)
        eff[p, j] = rng.normal(0, 0.8, len(j))
    lab = np.array(["non-targeting"] * nc + [f"P{p:03d}" for p in range(1, P + 1) for _ in range(n)])
    code = np.r_[np.zeros(nc, int), np.repeat(np.arange(1, P + 1), n)]

    def sample(scale):
        lib = rng.lognormal(np.log(3000), 0.3, len(code))[:, None]
        rate = mu[None, :] * np.exp(scale * eff[code]) * lib / mu.sum()
        c = rng.poisson(rng.gamma(4.0, rate / 4.0))
        return np.log1p(c / c.sum(1, keepdims=True) * 1e4).astype(np.float32)

    real = sample(1.0)
    pred = sample(0.7)
    pred[:nc] = real[:nc]  # real controls copied through, as the pred/real contract says
    obs = {"target_gene": lab, "is_predicted": code > 0}
    names = [f"c{i}" for i in range(len(lab))]
    genes = [f"G{j:05d}" for j in range(G)]
    write_h5ad(os.path.join(d, "real.h5ad"), real, names, genes, obs=obs)
    write_h5ad(os.path.join(d, "pred.h5ad"), pred, names, genes, obs=obs)


def child(cmd):
    """Run cmd; print wall seconds and the child's peak RSS (MiB) as JSON."""
    import resource
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"rc": r.returncode, "wall_s": dt, "peak_mib": rss, "err": r.stderr[-2000:]}))


def measure(cmd, env=None):
    out = subprocess.run([sys.executable, __file__, "--child", "--", *cmd], capture_output=True,
                         text=True, env=env)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"]:
        raise RuntimeError(f"{cmd[0]} failed:\n{res['err']}")
    return res


def compare(a, b):
    import csv

    def read(p):
        with open(p) as f:
            rows = list(csv.DictReader(f))
        return {r["perturbation"]: r for r in rows}
    A, Bm = read(a), read(b)
    worst, n = 0.0, 0
    for p, ra in A.items():
        for k, v in ra.items():
            if k == "perturbation" or k not in Bm[p] or v == "" or Bm[p][k] == "":
                continue
            x, y = float(v), float(Bm[p][k])
            if np.isnan(x) and np.isnan(y):
                continue
            worst, n = max(worst, abs(x - y)), n + 1
    return worst, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--perts", type=int, default=100)
    ap.add_argument("--cells", type=int, default=200)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--ctrl", type=int, default=200)
    ap.add_argument("--cell_eval", default="/work/refvenv/bin/cell-eval")
    ap.add_argument("--dir", default="/tmp/bench_eval")
    ap.add_argument("--skip_celleval", action="store_true")
    a = ap.parse_args(dashes(None))
    os.makedirs(a.dir, exist_ok=True)
    t = time.perf_counter()
    make_pair(a.dir, a.perts, a.cells, a.genes, a.ctrl)
    print(f"pair: {a.perts} perturbations x {a.cells} cells + {a.ctrl} controls x {a.genes} genes "
          f"({time.perf_counter() - t:.1f}s to write)")
    pred, real = os.path.join(a.dir, "pred.h5ad"), os.path.join(a.dir, "real.h5ad")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ours = measure([sys.executable, "-m", "state.eval", "--pred", pred, "--real", real,
                    "--pert-col", "target_gene", "--control", "non-targeting", "--profile", "full",
                    "--out", os.path.join(a.dir, "ns")], env)
    print(f"state.eval  full: {ours['wall_s']:6.1f} s  peak {ours['peak_mib']:7.0f} MiB")
    if a.skip_celleval:
        return
    ce = measure([a.cell_eval, "run", "-ap", pred, "-ar", real, "--pert-col", "target_gene",
                  "--control-pert", "non-targeting", "--profile", "full", "--num-threads", "1",
                  "-o", os.path.join(a.dir, "ce")])
    print(f"cell-eval   full: {ce['wall_s']:6.1f} s  peak {ce['peak_mib']:7.0f} MiB "
          "(includes clustering_agreement, which state.eval does not compute)")
    worst, n = compare(os.path.join(a.dir, "ce", "results.csv"), os.path.join(a.dir, "ns", "results.csv"))
    print(f"speed-up {ce['wall_s'] / ours['wall_s']:.1f}x, memory ratio "
          f"{ce['peak_mib'] / ours['peak_mib']:.1f}x; max |diff| over {n} shared per-perturbation "
          f"values: {worst:.2e}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[3:])
    else:
        main()
