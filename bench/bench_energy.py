"""Benchmark the energy distance (value + dX): Triton kernel vs plain-torch reference vs geomloss.

    python bench/bench_energy.py                      # ST shapes: B 16, set 32..512, D 64..2058
    python bench/bench_energy.py --sets 128 --dims 2058 --reps 5

GPU: triton.testing.do_bench (median, 20/80% quantiles) of forward (x needs no grad), forward with
grad (the Triton kernel writes dX there), backward, and both; TFLOP/s from SPEC 12.1's FLOP model
(forward 2D(NM+N^2+M^2), dX 2D(NM+N^2) per set); peak memory = max_memory_allocated over the inputs.
geomloss is timed when importable.
CPU (no Triton: the interpreter is a test tool, not a path): each (implementation, shape) runs in a
fresh subprocess so its peak memory is its own: peak RSS growth over the inputs (ru_maxrss) and the
median wall time over --reps repetitions after one warm-up. geomloss SamplesLoss("energy") runs in
/work/refvenv (it is not a dependency of nanostate).

    python bench/bench_energy.py --aot 90         # no GPU needed: compile every GPU config for sm_90

--aot compiles both plans' kernels with the launch configurations `kernels/energy.py` would use on a
GPU (Triton's backend and ptxas) and prints registers, spill stack and shared memory: a check that the
GPU code compiles and fits, not a timing. Both use the same thread count (--threads;
default torch's).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFPY = Path(os.environ.get("NANOSTATE_REFPY", "/work/refvenv/bin/python"))


def flops(B, N, M, D):
    fwd = 2 * B * D * (N * M + N * N + M * M)
    dx = 2 * B * D * (N * M + N * N)
    return fwd, dx


# ----------------------------------------------------------------------------------------------------
# CPU worker: one implementation, one shape, in its own process

def worker(impl, B, N, M, D, reps, threads):
    import torch
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(B, N, D)
    y = torch.randn(B, M, D) + 0.1
    if impl == "ref":
        sys.path.insert(0, str(ROOT))
        from kernels.energy import energy_ref as fn
    elif impl == "geomloss":
        from geomloss import SamplesLoss
        fn = SamplesLoss("energy")
    else:
        raise ValueError(impl)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    xg = x.clone().requires_grad_(True)
    t_fwd, t_fg, t_bwd = [], [], []
    t_start = time.perf_counter()
    i = -1
    while True:  # at least `reps` timed repetitions, more (up to 50) while under 2 s: the CPU is shared
        i += 1
        if i > reps and (i > 50 or time.perf_counter() - t_start > 2.0):
            break
        t0 = time.perf_counter()
        with torch.no_grad():
            fn(x, y)
        t1 = time.perf_counter()
        v = fn(xg, y)
        t2 = time.perf_counter()
        v.sum().backward()
        t3 = time.perf_counter()
        xg.grad = None
        del v
        if i:  # first iteration is warm-up
            t_fwd.append(t1 - t0)
            t_fg.append(t2 - t1)
            t_bwd.append(t3 - t2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    med = statistics.median
    both = [a + b for a, b in zip(t_fg, t_bwd)]
    return {"impl": impl, "fwd_s": med(t_fwd), "fwd_grad_s": med(t_fg), "bwd_s": med(t_bwd),
            "both_s": med(both), "both_min_s": min(both), "n_reps": len(both), "peak_mib": (peak - base) / 1024,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def run_worker(python, impl, B, N, M, D, reps, threads):
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", impl, "--batch", str(B),
           "--n", str(N), "--m", str(M), "--d", str(D), "--reps", str(reps), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"impl": impl, "error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_cpu(args):
    print(f"CPU bench, B={args.batch}, N=M in {args.sets}, D in {args.dims}, reps>={args.reps}, "
          f"rounds={args.rounds}, "
          f"threads={args.threads or 'torch default'} "
          f"(median of per-round medians, min; GFLOP/s from the median; peak = max RSS growth over inputs, fwd+bwd)")
    hdr = f"{'N=M':>5} {'D':>5} | {'impl':>8} | {'fwd ms':>8} {'fwd+g ms':>8} {'bwd ms':>8} " \
          f"{'both ms':>8} {'min ms':>8} {'GFLOP/s':>8} | {'peak MiB':>8} {'reps':>4}"
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for N in args.sets:
        for D in args.dims:
            B, M = args.batch, N
            f_fwd, f_dx = flops(B, N, M, D)
            impls = [("ref", sys.executable)]
            if REFPY.exists() and not args.no_geomloss:
                impls.append(("geomloss", REFPY))
            # alternate the implementations over --rounds so both see the same (shared-CPU) load
            runs = {impl: [] for impl, _ in impls}
            for _ in range(args.rounds):
                for impl, py in impls:
                    runs[impl].append(run_worker(py, impl, B, N, M, D, args.reps, args.threads))
            for impl, _ in impls:
                ok = [r for r in runs[impl] if "error" not in r]
                if not ok:
                    print(f"{N:>5} {D:>5} | {impl:>8} | error: {runs[impl][0]['error']}")
                    continue
                med = statistics.median
                r = {"impl": impl, "N": N, "D": D, "B": B, "rounds": ok,
                     "fwd_s": med([o["fwd_s"] for o in ok]), "fwd_grad_s": med([o["fwd_grad_s"] for o in ok]),
                     "bwd_s": med([o["bwd_s"] for o in ok]), "both_s": med([o["both_s"] for o in ok]),
                     "both_min_s": min(o["both_min_s"] for o in ok), "n_reps": sum(o["n_reps"] for o in ok),
                     "peak_mib": max(o["peak_mib"] for o in ok)}
                rows.append(r)
                gf = (f_fwd + f_dx) / r["both_s"] / 1e9
                print(f"{N:>5} {D:>5} | {impl:>8} | {r['fwd_s']*1e3:8.1f} {r['fwd_grad_s']*1e3:8.1f} "
                      f"{r['bwd_s']*1e3:8.1f} {r['both_s']*1e3:8.1f} {r['both_min_s']*1e3:8.1f} {gf:8.1f} | "
                      f"{r['peak_mib']:8.1f} {r['n_reps']:4d}")
            sys.stdout.flush()
    return rows


# ----------------------------------------------------------------------------------------------------
# AOT compile check (no GPU needed)

def bench_aot(args):
    import importlib
    import torch
    import triton.language as tl
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_attention import aot_compile
    E = importlib.import_module("kernels.energy_tl")

    def types(dt):
        def f(n):
            if n in ("A", "P"):
                return "*" + dt
            if n in ("C", "DA", "PART", "W"):
                return "*fp32"
            if n in ("LA", "LP"):
                return "*i32"
            if n in ("scale", "coef"):
                return "fp32"
            return "i32"
        return f

    print(f"AOT compile for sm_{args.aot} (Triton's ptxas; spills show as stack bytes)")
    for dt, tdt, tt in (("bf16", tl.bfloat16, torch.bfloat16), ("fp16", tl.float16, torch.float16),
                        ("fp32", tl.float32, torch.float32)):
        for D in (16, 64, 128, 256):
            BN, BM, BD, w = E._plan_a_blocks(D, tt)
            c = dict(U_STAT=False, BN=BN, BM=BM, BD=BD, DOT_DTYPE=tdt, PREC=E._F32_DOT)
            r1 = aot_compile(E._energy_rows_kernel, types(dt), dict(c, TERM_P=True, NEED_GRAD=True), w, args.aot)
            r2 = aot_compile(E._energy_rows_kernel, types(dt), dict(c, TERM_P=False, NEED_GRAD=False), w, args.aot)
            print(f"{dt} plan A BD {BD:3d} {(BN, BM, BD, w)} | x rows + dX: {r1} | y rows: {r2}")
            sys.stdout.flush()
        BN, BM, BK, w = E._plan_b_blocks(2058, tt)
        c = dict(U_STAT=False, BN=BN, BM=BM, BK=BK, DOT_DTYPE=tdt, PREC=E._F32_DOT)
        r1 = aot_compile(E._energy_tile_kernel, types(dt), dict(c, DIAG=False, WRITE_W=True), w, args.aot)
        r2 = aot_compile(E._energy_tile_kernel, types(dt), dict(c, DIAG=True, WRITE_W=True), w, args.aot)
        r3 = aot_compile(E._energy_tile_kernel, types(dt), dict(c, DIAG=True, WRITE_W=False), w, args.aot)
        print(f"{dt} plan B {(BN, BM, BK, w)} | XY->W: {r1} | XX->V: {r2} | YY: {r3}")
        sys.stdout.flush()


# ----------------------------------------------------------------------------------------------------
# GPU

def bench_gpu(args):
    import torch
    from triton.testing import do_bench
    sys.path.insert(0, str(ROOT))
    from kernels.energy import energy_ref, energy_triton
    impls = {"triton": energy_triton, "ref": energy_ref}
    try:
        from geomloss import SamplesLoss
        impls["geomloss"] = SamplesLoss("energy")
    except ImportError:
        pass
    dtype = getattr(torch, args.dtype)
    print(f"GPU bench on {torch.cuda.get_device_name()}, {args.dtype}, B={args.batch}, "
          f"median [20%, 80%] of do_bench")
    for N in args.sets:
        for D in args.dims:
            B, M = args.batch, N
            f_fwd, f_dx = flops(B, N, M, D)
            x = torch.randn(B, N, D, device="cuda", dtype=dtype)
            y = torch.randn(B, M, D, device="cuda", dtype=dtype) + 0.1
            for name, fn in impls.items():
                xg = x.clone().requires_grad_(True)

                def fwd():
                    with torch.no_grad():
                        fn(x, y)

                def both():
                    fn(xg, y).sum().backward()
                    xg.grad = None

                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                both()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                q = [0.5, 0.2, 0.8]
                tf = do_bench(fwd, quantiles=q)
                tb_all = do_bench(both, quantiles=q)
                v = fn(xg, y).sum()
                tbw = do_bench(lambda: v.backward(retain_graph=True), quantiles=q)
                print(f"N=M {N:4d} D {D:5d} {name:>8}: fwd {tf[0]*1e3:8.1f} us ({f_fwd/tf[0]/1e9:6.1f} TFLOP/s)"
                      f" | bwd {tbw[0]*1e3:8.1f} us | both {tb_all[0]*1e3:8.1f} us [{tb_all[1]*1e3:.1f},"
                      f" {tb_all[2]*1e3:.1f}] ({(f_fwd+f_dx)/tb_all[0]/1e9:6.1f} TFLOP/s) | peak {peak:7.1f} MiB")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sets", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 512, 2058])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", help="GPU input dtype")
    ap.add_argument("--rounds", type=int, default=2, help="CPU: alternating worker runs per impl")
    ap.add_argument("--threads", type=int, default=0, help="CPU: torch threads per worker (0: default)")
    ap.add_argument("--no_geomloss", action="store_true")
    ap.add_argument("--json", help="write the CPU rows here")
    ap.add_argument("--aot", type=int, help="compile the GPU configs for sm_AOT and report (no GPU needed)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--m", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--d", type=int, help=argparse.SUPPRESS)
    sys.path.insert(0, str(ROOT))
    from state.config import dashes  # --key-name spellings still parse
    args = ap.parse_args(dashes(None))
    if args.aot:
        bench_aot(args)
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.n, args.m, args.d, args.reps, args.threads)))
        return
    import torch
    if torch.cuda.is_available():
        bench_gpu(args)
    else:
        rows = bench_cpu(args)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
