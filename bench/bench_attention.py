"""Benchmark bidirectional attention forward/backward: Triton kernel vs reference vs SDPA.

    python bench/bench_attention.py                          # ST shapes: B 16, L 129/513, heads 8..12
    python bench/bench_attention.py --lens 129 513 2049 --heads 8:64 12:58 --dtype bfloat16

GPU: triton.testing.do_bench (median, 20/80% quantiles) of forward, backward, both, for the Triton
kernel (full sets and ragged `lens`), `attention_ref` (SDPA with a boolean key mask) and plain SDPA
(no mask: flash backend); TFLOP/s from SPEC 12.2's model, forward 4 B H L^2 d (true d, ragged:
sum len_b^2), backward 2.5x forward; peak memory = max_memory_allocated over the inputs.
CPU (the Triton interpreter is a test tool, not a path): the reference paths only, each
(implementation, shape) in a fresh subprocess: median/min wall time and peak RSS growth.

    python bench/bench_attention.py --aot 90      # no GPU needed: compile every GPU config for sm_90

--aot compiles the kernels with the launch configurations `kernels/attention.py` would use on a GPU,
through Triton's own backend (ptxas), and prints registers, spilled bytes and shared memory per
kernel: a check that the GPU code compiles and fits, not a timing.
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


def flops_fwd(B, H, L, d, lens=None):
    s = B * L * L if lens is None else sum(int(n) ** 2 for n in lens)
    return 4 * H * s * d


def ragged_lens(B, L):
    """Deterministic ragged lengths between L/2 and L (last one full)."""
    return [L // 2 + (L - L // 2) * i // max(B - 1, 1) for i in range(B)]


# ----------------------------------------------------------------------------------------------------
# CPU worker

def worker(impl, B, H, L, d, reps, threads):
    import torch
    import torch.nn.functional as F
    if threads:
        torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from kernels.attention import attention_ref
    torch.manual_seed(0)
    q, k, v = [torch.randn(B, H, L, d) for _ in range(3)]
    lens = torch.tensor(ragged_lens(B, L))
    fn = {"ref": lambda q, k, v: attention_ref(q, k, v),
          "ref_lens": lambda q, k, v: attention_ref(q, k, v, lens=lens),
          "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v)}[impl]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    qg, kg, vg = [t.clone().requires_grad_(True) for t in (q, k, v)]
    do = torch.randn_like(q)
    t_fwd, t_bwd = [], []
    t_start, i = time.perf_counter(), -1
    while True:
        i += 1
        if i > reps and (i > 50 or time.perf_counter() - t_start > 2.0):
            break
        t0 = time.perf_counter()
        o = fn(qg, kg, vg)
        t1 = time.perf_counter()
        o.backward(do)
        t2 = time.perf_counter()
        qg.grad = kg.grad = vg.grad = None
        del o
        if i:
            t_fwd.append(t1 - t0)
            t_bwd.append(t2 - t1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    both = [a + b for a, b in zip(t_fwd, t_bwd)]
    med = statistics.median
    return {"impl": impl, "fwd_s": med(t_fwd), "bwd_s": med(t_bwd), "both_s": med(both),
            "both_min_s": min(both), "n_reps": len(both), "peak_mib": (peak - base) / 1024,
            "lens": lens.tolist() if impl == "ref_lens" else None}


def bench_cpu(args):
    print(f"CPU bench (reference paths), B={args.batch}, L in {args.lens}, H:d in {args.heads}, "
          f"threads={args.threads or 'torch default'} (median, min; GFLOP/s from the median)")
    hdr = f"{'L':>5} {'H':>3} {'d':>4} | {'impl':>8} | {'fwd ms':>8} {'bwd ms':>8} {'both ms':>8} " \
          f"{'min ms':>8} {'GFLOP/s':>8} | {'peak MiB':>8} {'reps':>4}"
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for L in args.lens:
        for hd in args.heads:
            H, d = map(int, hd.split(":"))
            for impl in ("sdpa", "ref", "ref_lens"):
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, "--batch",
                       str(args.batch), "--worker_shape", f"{H}:{L}:{d}", "--reps", str(args.reps),
                       "--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"{L:>5} {H:>3} {d:>4} | {impl:>8} | error {out.stderr.strip()[-200:]}")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r.update(L=L, H=H, d=d, B=args.batch)
                rows.append(r)
                f = flops_fwd(args.batch, H, L, d, r["lens"]) * 3.5
                print(f"{L:>5} {H:>3} {d:>4} | {impl:>8} | {r['fwd_s']*1e3:8.1f} {r['bwd_s']*1e3:8.1f} "
                      f"{r['both_s']*1e3:8.1f} {r['both_min_s']*1e3:8.1f} {f/r['both_s']/1e9:8.1f} | "
                      f"{r['peak_mib']:8.1f} {r['n_reps']:4d}")
                sys.stdout.flush()
    return rows


# ----------------------------------------------------------------------------------------------------
# AOT compile check (no GPU needed)

def aot_compile(fn, types, consts, num_warps, arch=90):
    """Compile a @triton.jit kernel for CUDA sm_<arch> without a GPU; returns 'regs/spill/smem'."""
    import re
    import tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = fn.arg_names
    sig = {n: ("constexpr" if n in consts else types(n)) for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    out = subprocess.run([str(bindir / "cuobjdump"), "--dump-resource-usage", f.name],
                         capture_output=True, text=True).stdout
    os.unlink(f.name)
    reg = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return f"regs {reg.group(1) if reg else '?'} stack {stack.group(1) if stack else '?'} B " \
           f"smem {k.metadata.shared} B"


def bench_aot(args):
    import importlib
    import torch
    import triton.language as tl
    sys.path.insert(0, str(ROOT))
    A = importlib.import_module("kernels.attention_tl")

    def types(dt):
        def f(n):
            if n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
                return "*" + dt
            if n in ("LSE", "DELTA"):
                return "*fp32"
            if n == "LENS":
                return "*i32"
            if n in ("qk_scale", "sm_scale"):
                return "fp32"
            return "i32"
        return f

    print(f"AOT compile for sm_{args.aot} (Triton's ptxas; spills show as stack bytes)")
    for dt, tdt, tt in (("bf16", tl.bfloat16, torch.bfloat16), ("fp16", tl.float16, torch.float16),
                        ("fp32", tl.float32, torch.float32)):
        for BD in (16, 64, 128, 256):
            fm, fn_, fw = A._blocks(0, BD, False, tt)
            bm, bn, bw = A._blocks(0, BD, True, tt)
            c = dict(BD=BD, DOT_DTYPE=tdt, PREC=A._F32_DOT)
            r1 = aot_compile(A._attn_fwd_kernel, types(dt), dict(c, BM=fm, BN=fn_), fw, args.aot)
            r2 = aot_compile(A._attn_bwd_dkdv_kernel, types(dt), dict(c, BM=bm, BN=bn), bw, args.aot)
            r3 = aot_compile(A._attn_bwd_dq_kernel, types(dt), dict(c, BM=bm, BN=bn), bw, args.aot)
            print(f"{dt} BD {BD:3d} | fwd {(fm, fn_, fw)}: {r1} | dkdv {(bm, bn, bw)}: {r2} | dq: {r3}")
            sys.stdout.flush()


# ----------------------------------------------------------------------------------------------------
# GPU

def bench_gpu(args):
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench
    sys.path.insert(0, str(ROOT))
    from kernels.attention import attention_ref, attention_triton
    dtype = getattr(torch, args.dtype)
    print(f"GPU bench on {torch.cuda.get_device_name()}, {args.dtype}, B={args.batch}, "
          f"median [20%, 80%] of do_bench")
    for L in args.lens:
        for hd in args.heads:
            H, d = map(int, hd.split(":"))
            B = args.batch
            q, k, v = [torch.randn(B, H, L, d, device="cuda", dtype=dtype) for _ in range(3)]
            do = torch.randn_like(q)
            lens = torch.tensor(ragged_lens(B, L), device="cuda")
            impls = {
                "triton": (lambda q, k, v: attention_triton(q, k, v), None),
                "triton_lens": (lambda q, k, v: attention_triton(q, k, v, lens=lens), lens.tolist()),
                "ref_lens": (lambda q, k, v: attention_ref(q, k, v, lens=lens), lens.tolist()),
                "sdpa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), None),
            }
            for name, (fn, ln) in impls.items():
                qg, kg, vg = [t.clone().requires_grad_(True) for t in (q, k, v)]
                ff = flops_fwd(B, H, L, d, ln)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn(qg, kg, vg).backward(do)
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                qs = [0.5, 0.2, 0.8]
                with torch.no_grad():
                    tf = do_bench(lambda: fn(q, k, v), quantiles=qs)
                o = fn(qg, kg, vg)
                tb = do_bench(lambda: o.backward(do, retain_graph=True), quantiles=qs)
                ta = do_bench(lambda: fn(qg, kg, vg).backward(do), quantiles=qs)
                print(f"L {L:5d} H {H:2d} d {d:3d} {name:>11}: fwd {tf[0]*1e3:8.1f} us "
                      f"({ff/tf[0]/1e9:6.1f} TFLOP/s) | bwd {tb[0]*1e3:8.1f} us ({2.5*ff/tb[0]/1e9:6.1f}) | "
                      f"both {ta[0]*1e3:8.1f} us [{ta[1]*1e3:.1f}, {ta[2]*1e3:.1f}] "
                      f"({3.5*ff/ta[0]/1e9:6.1f}) | peak {peak:7.1f} MiB")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lens", type=int, nargs="+", default=[129, 513])
    ap.add_argument("--heads", nargs="+", default=["8:58", "12:64"], help="H:d pairs")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="CPU: torch threads per worker (0: default)")
    ap.add_argument("--dtype", default="bfloat16", help="GPU input dtype")
    ap.add_argument("--json", help="write the CPU rows here")
    ap.add_argument("--aot", type=int, help="compile the GPU configs for sm_AOT and report (no GPU needed)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker_shape", help=argparse.SUPPRESS)
    sys.path.insert(0, str(ROOT))
    from state.config import dashes  # --key-name spellings still parse
    args = ap.parse_args(dashes(None))
    if args.aot:
        bench_aot(args)
        return
    if args.worker:
        H, L, d = map(int, args.worker_shape.split(":"))
        print(json.dumps(worker(args.worker, args.batch, H, L, d, args.reps, args.threads)))
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
