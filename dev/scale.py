"""
Scale model for dev/SCALE.md: what training ST on N cells takes. Every figure is computed here from a
stated model (printed with the table), from the ST presets (meta-device models, nothing allocated),
and from the measured loader rate passed in (dev/LOG.md "## Loader (issue 3)").

    python dev/scale.py                       # 100M cells, 35% MFU of H100 bf16 dense 989 TFLOP/s
    python dev/scale.py --cells=1e8 --mfu=0.30 --loader=92000
"""

import argparse

import torch

from state.st import STConfig, StateTransition

GPU_PEAK = 989e12  # H100 SXM bf16 dense FLOP/s (SPEC 12)


def preset_model(name, D, n_pert=2000):
    with torch.device("meta"):
        return StateTransition(STConfig.from_name(name, n_in=D, n_pert=n_pert))


def flops_per_set(m, D):
    """Training FLOPs of one set (fwd+bwd): 6*N_mm*S + 12*n_layers*nh*d*S^2 (SPEC 7) + energy loss
    fwd 2D(NM+N^2+M^2) + dX 2D(NM+N^2) with N = M = S (SPEC 12.1) = 10*D*S^2."""
    c = m.cfg
    S = c.set_size
    mm = 6 * m.num_params(matmul_only=True) * S
    att = 12 * c.n_layers * c.n_heads * c.head_dim * S * S
    energy = 10 * D * S * S
    assert mm + att == m.estimate_flops(1, S)
    return mm, att, energy


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=float, default=1e8)
    ap.add_argument("--mfu", type=float, default=0.35)
    ap.add_argument("--gpus_per_node", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16, help="sets per GPU per step")
    ap.add_argument("--loader", type=float, default=92_000, help="measured loader cells/s per process")
    a = ap.parse_args(argv)
    N, gpn = a.cells, a.gpus_per_node

    print(f"## Prepared data for {N:,.0f} cells (X.bin memmap, rows x features x bytes)\n")
    print("| features | float32 | bfloat16/float16 | + obs codes (3 x int32) + obs_names (~24 B) |")
    print("|---|---|---|---|")
    for D, what in ((2000, "2,000 HVGs"), (2058, "2,058-d embedding")):
        print(f"| {what} | {N * D * 4 / 1e9:,.0f} GB | {N * D * 2 / 1e9:,.0f} GB | {N * 36 / 1e9:,.1f} GB |")
    print("\nEvery rank samples sets from the whole dataset, so every node needs all of it on local disk "
          "(or in page cache): per-node footprint = the full figure above, not 1/n_nodes.\n")

    print(f"## FLOPs, step time and GPU-hours ({a.batch} sets/GPU/step, {a.mfu:.0%} MFU of "
          f"{GPU_PEAK / 1e12:.0f} TFLOP/s)\n")
    print("| preset | D | S | params | N_mm | matmul | attention | energy | FLOP/cell | step (ms) | "
          "cells/s/GPU needed | read GB/s/GPU (bf16) | GPU-h/epoch compute-bound | GPU-h/epoch "
          "loader-bound | model.safetensors | DCP (w + Adam) |")
    print("|" + "---|" * 16)
    for name in ("tiny", "small", "default", "paper"):
        for D in (2000, 2058):
            m = preset_model(name, D)
            S = m.cfg.set_size
            mm, att, en = flops_per_set(m, D)
            f_set = mm + att + en
            f_cell = f_set / S
            step = a.batch * f_set / (a.mfu * GPU_PEAK)
            cps = a.batch * S / step
            gpuh_epoch = N * f_cell / (a.mfu * GPU_PEAK) / 3600
            gpuh_loader = N / min(a.loader, cps) / 3600  # one loader process per GPU
            rd = cps * 2 * D * 2 / 1e9  # target + control row per cell, bf16 storage
            P = m.num_params()
            print(f"| {name} | {D} | {S} | {P / 1e6:.1f}M | {m.num_params(True) / 1e6:.1f}M | "
                  f"{mm / f_set:.0%} | {att / f_set:.0%} | {en / f_set:.0%} | {f_cell / 1e6:.0f} M | "
                  f"{step * 1e3:.2f} | {cps:,.0f} | {rd:,.1f} | {gpuh_epoch:,.2f} | {gpuh_loader:,.2f} | "
                  f"{P * 4 / 1e6:.0f} MB | {P * 12 / 1e6:.0f} MB |")
    print(f"\nLoader: measured {a.loader:,.0f} target cells/s per process (each target cell also reads one "
          "control row). A GPU needs the 'cells/s/GPU needed' column; the ratio is the number of loader "
          "processes (or the overlap) each GPU needs.")
    print("\n## Sampler plan memory per rank (every rank materialises the epoch plan of ALL sets)\n")
    print(f"T (n_sets x S) int64 = 8 B/cell -> {N * 8 / 1e9:.1f} GB per rank, x{gpn} ranks = "
          f"{N * 8 * gpn / 1e9:.1f} GB per node (plus ~2x transient during the shuffle)")


if __name__ == "__main__":
    main()
