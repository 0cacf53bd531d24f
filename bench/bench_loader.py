"""
Loader benchmark: cells/s and peak RSS for building training batches (B sets x S cells x G genes, with
matched controls) from a prepared memmap (state.sampler.SetSampler) vs reading the same rows from the
original gzip-compressed .h5ad with h5py (state.h5ad.Matrix.rows).

    python bench/bench_loader.py --dir /tmp/nsbench                       # 200k cells x 2000 genes
    python bench/bench_loader.py --dir /tmp/nsbench --n_cells 20000 --steps 20   # quick

The synthetic file and its prepared folder are made once under --dir (kept for reruns). Each method runs
in its own process so that its peak RSS (ru_maxrss, which includes memmap pages it touched) is its own.
cells/s counts target cells (B*S per batch); each batch also reads as many control cells. "per CPU-s"
divides by the process's CPU time (user + system, page faults included), which is what one uncontended
core would give on a shared machine.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from state.config import dashes  # noqa: E402  (--key-name spellings still parse)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def rss_mb():
    """Peak resident set of this process (VmHWM; ru_maxrss would carry over the parent's peak)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def anon_mb():
    """Current anonymous (non-file) resident memory: RSS minus the memmap's page-cache pages."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(a):
    from state.data import Prepared
    from state.sampler import SetSampler
    d = Prepared(Path(a.dir) / "prep")
    s = SetSampler(d, np.arange(d.n_cells), a.set_size, a.sets, seed=0)
    cells = a.sets * a.set_size
    if a.mode == "memmap":
        for _ in range(3):  # warm-up: page cache, plan
            s.next()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(a.steps):
            b = s.next()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        n = a.steps
    else:
        from state.h5ad import H5AD
        with H5AD(Path(a.dir) / "syn.h5ad") as h:
            pos = {nm: i for i, nm in enumerate(h.obs_names)}
            src = np.array([pos[nm] for nm in d.obs_names])  # prepared row -> file row
            m = h.matrix("X")
            n = max(1, a.steps // 20)
            bs = [s.indices(0, 3 + i)[:2] for i in range(n)]  # the same batches as memmap mode, indices only
            m.rows(src[bs[0][0].ravel()[:8]])  # open / first chunk
            t0, c0 = time.perf_counter(), time.process_time()
            for t, ci in bs:
                tgt = torch.from_numpy(m.rows(src[t.ravel()])).view(t.shape + (-1,))  # (B,S,G)
                ctrl = torch.from_numpy(m.rows(src[ci.ravel()])).view(t.shape + (-1,))
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps(dict(mode=a.mode, steps=n, sec=dt, cells_per_s=cells * n / dt, cells_per_cpu_s=cells * n / cpu, peak_rss_mb=rss_mb(), anon_mb=anon_mb(),
                          shape=[a.sets, a.set_size, d.n_genes])))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/nsbench")
    ap.add_argument("--n_cells", type=int, default=200_000)
    ap.add_argument("--n_genes", type=int, default=2000)
    ap.add_argument("--sets", type=int, default=16)
    ap.add_argument("--set_size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--mode", choices=["all", "memmap", "h5ad"], default="all")
    a = ap.parse_args(dashes(None))
    if a.mode != "all":
        return run(a)
    from state.prepare import prepare
    from state.synth import make_synthetic
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "syn.h5ad").exists():
        t0 = time.perf_counter()
        make_synthetic(d / "syn.h5ad", n_cells=a.n_cells, n_genes=a.n_genes, n_perts=50, n_contexts=4,
                       compression="gzip", seed=0)
        print(f"synthetic gzip h5ad: {time.perf_counter() - t0:.1f}s, {os.path.getsize(d / 'syn.h5ad') / 1e6:.0f} MB")
    if not (d / "prep" / "index.json").exists():
        t0 = time.perf_counter()
        prepare(d / "syn.h5ad", d / "prep")
        print(f"prepare: {time.perf_counter() - t0:.1f}s, X.bin {os.path.getsize(d / 'prep' / 'X.bin') / 1e6:.0f} MB")
    res = []
    for mode in ("memmap", "h5ad"):
        cmd = [sys.executable, __file__, "--mode", mode] + sum([[f"--{k}", str(v)] for k, v in
                                                                vars(a).items() if k != "mode"], [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        res.append(json.loads(out))
        r = res[-1]
        print(f"{mode:7s} {r['cells_per_s']:>12,.0f} cells/s wall, {r['cells_per_cpu_s']:>10,.0f} per CPU-s  peak RSS {r['peak_rss_mb']:,.0f} MB "
              f"(anon {r['anon_mb']:,.0f} MB)  "
              f"({r['steps']} batches of {r['shape']})")
    print(f"speed-up {res[0]['cells_per_s'] / res[1]['cells_per_s']:.0f}x")


if __name__ == "__main__":
    main()
