"""
ST training throughput (cells/s) next to arc-state 0.11.1's `state tx train` on a matching config:
sets of 64 cells, hidden 256, 4 LLaMA layers, 4 heads of 64, SwiGLU 1024, 4-layer encoder/decoder MLPs,
batch 8 sets; data = the 500-gene GBM/perturbench file, plus a 2,000-gene synthetic config.

    python bench/bench_train.py                  # both configs, ours + arc-state (when installed)
    python bench/bench_train.py --no_ref         # skip the arc-state column
    python bench/bench_train.py --flops          # print the FLOP model and exit
    python bench/bench_train.py --device=cuda    # GPU (--dtypes=bfloat16 for bf16 autocast only)

Ours: burn-in steps, then timed steps of the full training step (sampler batch from the memory-mapped
prepared data, forward, fp32 energy loss, backward, clip 10, Adam), synchronised, median of repeats.
arc-state: `state tx train` run as a subprocess (same data as an obsm['X_hvg'] copy, num_workers=0,
fp32 + matmul precision "medium" as it sets itself), once per repeat; cells/s = Lightning's own it/s
for the finished epoch bar x B x S, so start-up (imports, Lightning, data indexing) is excluded.
Both sides use torch.set_float32_matmul_precision("medium") (printed). On a shared box, look at the
best repeat as well as the median: other processes stretch individual repeats by up to 20x.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from state.config import dashes  # noqa: E402  (--key-name spellings still parse)

from state.st import STConfig, StateTransition  # noqa: E402

# -----------------------------------------------------------------------------
# config matching the reference run
S, B = 64, 8
MODEL = dict(set_size=S, hidden=256, n_layers=4, n_heads=4, head_dim=64, ff=1024, n_enc=4, n_dec=4,
             basal_proj=True, mlp_dropout=0.1)
GBM = ROOT.parent / "shared" / "data" / "perturbench_devel_norman19_mcfaline23.h5ad"
REF_OVERRIDES = [
    "data.kwargs.embed_key=X_hvg", "data.kwargs.output_space=gene", "data.kwargs.pert_col=perturbation",
    "data.kwargs.cell_type_key=cell_type", "data.kwargs.control_pert=control", "data.kwargs.batch_col=batch",
    "data.kwargs.num_workers=0", "data.kwargs.pin_memory=false", f"training.batch_size={B}",
    "training.val_freq=1000000", "training.ckpt_every_n_steps=1000000", "model=state",
    f"model.kwargs.cell_set_len={S}", "model.kwargs.hidden_dim=256", "model.kwargs.n_encoder_layers=4",
    "model.kwargs.n_decoder_layers=4", "model.kwargs.transformer_backbone_kwargs.intermediate_size=1024",
    "model.kwargs.transformer_backbone_kwargs.num_hidden_layers=4",
    "model.kwargs.transformer_backbone_kwargs.num_attention_heads=4",
    "model.kwargs.transformer_backbone_kwargs.num_key_value_heads=4",
    "model.kwargs.transformer_backbone_kwargs.head_dim=64", "use_wandb=false", "overwrite=true",
]


def flop_model(G, n_pert):
    with torch.device("meta"):
        m = StateTransition(STConfig(n_in=G, n_pert=n_pert, **MODEL))
    n_mm = m.num_params(matmul_only=True)
    c = m.cfg
    mm = 6 * n_mm * B * S
    att = 12 * c.n_layers * c.n_heads * c.head_dim * S * S * B
    return m.num_params(), n_mm, mm, att

# -----------------------------------------------------------------------------
# data: prepared dirs for ours, obsm['X_hvg'] h5ad + TOML for the reference


def make_data(work, name, G):
    from state.prepare import prepare
    from state.h5ad import H5AD, write_h5ad
    src = work / f"{name}.h5ad"
    if name == "gbm500":
        if not GBM.exists():
            sys.exit(f"bench_train: {GBM} not found")
        with H5AD(GBM) as f:
            X = f.matrix("X").block(0, f.n_obs)
            obs = {"perturbation": np.asarray(f.column("perturbation")).astype(str).astype(object),
                   "cell_type": np.asarray(f.column("cell_type")).astype(str).astype(object),
                   "batch": np.asarray(f.column("dataset")).astype(str).astype(object)}
            names, genes = np.asarray(f.obs_names, dtype=object), list(f.var_names())
    else:
        from state.synth import make_synthetic
        tmp = work / f"{name}_raw.h5ad"
        make_synthetic(tmp, n_cells=6000, n_genes=G, n_perts=20, n_contexts=3, seed=0)
        with H5AD(tmp) as f:
            X = f.matrix("X").block(0, f.n_obs)
            obs = {"perturbation": np.asarray(f.column("perturbation")).astype(str).astype(object),
                   "cell_type": np.asarray(f.column("cell_type")).astype(str).astype(object),
                   "batch": np.asarray(f.column("batch")).astype(str).astype(object)}
            names, genes = np.asarray(f.obs_names, dtype=object), list(f.var_names())
    write_h5ad(src, X, names, genes, obs=obs, obsm={"X_hvg": X})
    (work / f"{name}.toml").write_text(f'[datasets]\n{name} = "{src}"\n[training]\n{name} = "train"\n')
    D = prepare([str(src)], work / f"{name}_prep", pert_col="perturbation", control="control",
                context_col="cell_type")
    return D

# -----------------------------------------------------------------------------
# ours


def bench_ours(D, device, dtype, steps, warmup, repeats):
    from state.sampler import SetSampler
    dev = torch.device(device)
    cfg = STConfig(n_in=D.n_genes, n_pert=len(D.pert_names), **MODEL)
    torch.manual_seed(0)
    m = StateTransition(cfg).to(dev)
    opt = m.configure_optimizer(lr=1e-4, device_type=dev.type)
    s = SetSampler(D, np.arange(D.n_cells), set_size=S, batch_size=B, seed=0)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step():
        b = s.next()
        b = {k: v.to(dev, non_blocking=True) for k, v in b.items()}
        with amp:
            loss, _ = m(b["ctrl"], b["pert"], tgt=b["tgt"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 10.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(warmup):
        step()
    sync()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        rates.append(steps * B * S / (time.perf_counter() - t0))
    return float(np.median(rates)), rates, m.num_params()

# -----------------------------------------------------------------------------
# arc-state


def state_bin(refvenv):
    p = Path(refvenv) / "bin" / "state"
    return p if p.exists() else None


def bench_ref(work, name, refvenv, steps, repeats, timeout, threads=0):
    """cells/s of `state tx train` from Lightning's own progress bar (it/s of the finished epoch bar,
    so start-up is excluded); one run per repeat. Returns (median, all rates)."""
    import re
    exe = state_bin(refvenv)
    rates = []
    for i in range(repeats):
        out = work / f"ref_{name}_{i}"
        cmd = [str(exe), "tx", "train", f"data.kwargs.toml_config_path={work / (name + '.toml')}",
               f"training.max_steps={steps}", f"output_dir={out}", "name=ref", *REF_OVERRIDES]
        r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "WANDB_MODE": "disabled",
                                **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
                                   if threads else {})})
        log = r.stdout + r.stderr
        (work / f"ref_{name}_{i}.log").write_text(log)
        its = re.findall(rf"{steps}/{steps}\s.*?([0-9.]+)(it/s|s/it)", log)
        if r.returncode != 0 or not its:
            print(f"  arc-state run failed ({r.returncode}); log: {work / f'ref_{name}_{i}.log'}")
            print("\n".join(log.splitlines()[-15:]))
            return None, rates
        v, unit = float(its[-1][0]), its[-1][1]
        rates.append((v if unit == "it/s" else 1.0 / v) * B * S)
    return float(np.median(rates)), rates

# -----------------------------------------------------------------------------
# main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="gbm500,synth2000")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="autocast dtypes to time for ours (bf16 matmuls use avx512_bf16 on these CPUs)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for ours and OMP_NUM_THREADS for arc-state (0 = defaults); on a "
                         "shared, oversubscribed box 1 thread is 3-4x faster than 2")
    ap.add_argument("--no_ref", action="store_true")
    ap.add_argument("--ref_steps", type=int, default=20, help="steps per arc-state run")
    ap.add_argument("--refvenv", default="/work/refvenv")
    ap.add_argument("--ref_timeout", type=int, default=900)
    ap.add_argument("--flops", action="store_true", help="print the FLOP model and exit")
    ap.add_argument("--json", default="")
    ap.add_argument("--keep", default="", help="work directory to keep (default: a temp dir)")
    a = ap.parse_args(dashes(argv))
    torch.set_float32_matmul_precision("medium")
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f'torch.set_float32_matmul_precision("medium") | torch {torch.__version__} | device {a.device} | '
          f"threads {torch.get_num_threads()}")
    dtypes = [d for d in a.dtypes.split(",") if d]
    configs = {"gbm500": 500, "synth2000": 2000}
    names = [c for c in a.configs.split(",") if c]
    print(f"config: S {S}, B {B} sets ({B * S} cells/step), {MODEL}")
    if a.flops:
        for n in names:
            tot, n_mm, mm, att = flop_model(configs[n], 40)
            print(f"{n}: params {tot:,}, N_mm {n_mm:,}; FLOPs/step = 6*N_mm*B*S + 12*n_layers*H*S^2*B = "
                  f"{mm / 1e9:.3f} + {att / 1e9:.3f} = {(mm + att) / 1e9:.3f} GFLOP "
                  f"({(mm + att) / (B * S) / 1e6:.2f} MFLOP/cell)")
        return
    ref_ok = not a.no_ref and state_bin(a.refvenv) is not None
    if not a.no_ref and not ref_ok:
        print(f"arc-state not found in {a.refvenv}: skipping its column")
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in names:
            D = make_data(work, n, configs[n])
            ours, best = {}, {}
            for dtype in dtypes:
                ours[dtype], rates, n_params = bench_ours(D, a.device, dtype, a.steps, a.warmup, a.repeats)
                best[dtype] = max(rates)
                _, _, mm, att = flop_model(D.n_genes, len(D.pert_names))
                gf = (mm + att) * ours[dtype] / (B * S) / 1e9
                print(f"{n}: ours {dtype} {ours[dtype]:,.0f} cells/s median, best {max(rates):,.0f} (repeats "
                      f"{', '.join(f'{r:,.0f}' for r in rates)}; {n_params:,} params; {gf:.1f} GFLOP/s)")
            ref, ref_rates = None, []
            if ref_ok:
                ref, ref_rates = bench_ref(work, n, a.refvenv, a.ref_steps, a.repeats, a.ref_timeout,
                                           a.threads)
                if ref:
                    print(f"{n}: arc-state {ref:,.0f} cells/s median, best {max(ref_rates):,.0f} (repeats "
                          f"{', '.join(f'{r:,.0f}' for r in ref_rates)})")
            for dtype in dtypes:
                rb = max(ref_rates) if ref_rates else None
                rows.append(dict(config=n, genes=D.n_genes, ours=ours[dtype], ours_best=best[dtype],
                                 arc_state=ref, arc_state_best=rb, dtype=dtype, device=a.device,
                                 speedup=ours[dtype] / ref if ref else None,
                                 speedup_best=best[dtype] / rb if rb else None))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| config | genes | nanostate cells/s (median / best) | arc-state 0.11.1 (median / best) | "
          "speedup (median / best) |")
    print("|---|---|---|---|---|")
    for r in rows:
        ref = f"{r['arc_state']:,.0f} / {r['arc_state_best']:,.0f}" if r["arc_state"] else "-"
        sp = f"{r['speedup']:.2f}x / {r['speedup_best']:.2f}x" if r["speedup"] else "-"
        print(f"| {r['config']} (S {S}, B {B}, {r['dtype']}, {a.device}) | {r['genes']} | "
              f"{r['ours']:,.0f} / {r['ours_best']:,.0f} | {ref} | {sp} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
