"""
Train ST (State Transition) on a prepared dataset and a split. One flat script: config, setup, data,
model, loop; no Trainer, no callbacks.

CPU (tiny, ~1-2 min):
    python train.py --data=/tmp/q --split=/tmp/q/split.json --preset=tiny --out=runs/q --max_steps=300
CPU, the recipe the multi-seed protocol chose (anchored on the auto baseline, cosine lr, EMA, support
selection; 2,000 steps, ~2 min on one core for the shared real datasets):
    python train.py --data=DIR --split=split.json --preset=cpu --threads=1 --out=runs/cpu
    python train.py config/st_cpu.py --data=DIR --split=split.json --threads=1 --out=runs/cpu   # the same, as a file
1 GPU (bf16 autocast, fp32 master weights and loss):
    python train.py --data=DIR --split=split.json --preset=default --batch_size=16 --out=runs/st
N GPUs (FSDP2 by default, --parallel=ddp for plain DDP; every rank takes its own block of the
step's micro-batches; --grad_accum=k micro-steps per optimizer step, synced on the last):
    torchrun --standalone --nproc_per_node=8 train.py --data=DIR --split=split.json --out=runs/st
CPU, 2 processes (gloo):
    torchrun --standalone --nproc_per_node=2 train.py --data=DIR --split=split.json --out=runs/st2
Combinations (labels 'A+B' encoded from their parts), fine-tuning a trained run, features without a
download (the target gene's loadings on the training cells' principal axes):
    python train.py --data=DIR --split=combo.json --preset=cpu --combos=+ --anchor=additive --out=runs/combo
    python train.py --data=DIR --split=split.json --preset=cpu --init_from=runs/pre --freeze_steps=200 --out=runs/ft
    python train.py --data=DIR --split=unseen.json --preset=cpu --pert_features=pca --out=runs/unseen
Resume exactly where a run stopped (same batches, same losses): add --resume. The global batch is
batch_size x world x grad_accum sets; 1 process with --grad_accum=4 follows the same trajectory as
2 processes with --grad_accum=2, and a run may resume at another world size (sharded DCP checkpoint
in `dcp-<step>/`, data order from one global cursor). --workers=k loader processes per rank build the
next steps' batches during a step (any k gives the same batches; the log's `data N%` is the wait).

Overrides are `--key=value` over the globals below and over STConfig's fields (`--hidden=128`);
unknown keys and type mismatches are errors. The run directory gets `model.safetensors`, `meta.json`
(config, genes, perturbation vocabulary, data checksum, split hash, step) and `state.pt` (optimizer,
sampler, RNG), all of one step committed at once (state/ckpt.py: `ckpt-<step>/` behind the `ckpt`
link), plus `log.jsonl` (one line per log/val step).
"""

import gc
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist

from state import ckpt
from state.config import configure
from state.errors import die
from state.errors import guard as cli_guard
from state.data import Prepared
from state.dist import (all_reduce_sum, compute_cleanup, compute_init, cpu_has_bf16, mfu, print0, quiet_exit,
                        set_sync, wrap)
from state.sampler import SetSampler, StepSampler
from state.splits import Split
from state.perts import combo_table, load_pert_features, parts_of, pca_pert_features
from state.st import ALIASES, TRAIN_DEFAULTS, STConfig, StateTransition

# -----------------------------------------------------------------------------
# config (every global here can be overridden with --key=value)
data = ""                # prepared dataset directory (python -m state.data prepare ...)
split = ""               # split.json (python -m state.splits make ...)
out = "runs/st"          # run directory; must not exist unless --resume
resume = False           # continue the run in `out` from its last checkpoint
preset = "tiny"          # STConfig preset: tiny | cpu | small | default | paper (cpu also sets the
                         # training recipe it was chosen with: config/st_cpu.py)
max_steps = 1000         # optimizer steps in total (a resumed run continues to this)
batch_size = 16          # sets per step per process (reference 16)
lr = 1e-4                # Adam peak learning rate (reference 1e-4, constant)
schedule = "constant"    # constant (reference) | cosine: linear warmup, then cosine decay to min_lr x lr
warmup = 0               # warmup steps (linear from 0; any schedule)
min_lr = 0.1             # cosine floor as a fraction of lr
ema = 0.0                # weight EMA decay (e.g. 0.999); 0 = off. The EMA weights are the ones predict.py
                         # uses (model.safetensors; ema.safetensors keeps them for --resume)
select = "last"          # which weights model.safetensors holds: last | support (the lowest val loss on
                         # the held-out context's support perturbations: the val that resembles the test;
                         # few-shot splits only; checked every val_every steps)
guard = ""               # anchored runs with support cells: the correction's strength alpha for the held-out
                         # context, chosen from this grid (e.g. "0,0.25,0.5,0.75,1") on the support val loss
                         # of the final weights; alpha = 0 is the anchor itself. Recorded in meta.json
guard_by = "energy"      # the guard's support loss: energy (the training loss: the cells' distribution) |
                         # mean (the squared error of the set means: the shift pearson_delta and MAE score)
guard_rule = "best"      # best (the lowest support loss) | 1se (the weakest correction within one standard
                         # error of the best: the correction must earn its strength beyond set noise)
weight_decay = 0.0       # reference ignores its weight_decay key: none
grad_clip = 10.0         # global grad-norm clip (reference 10); 0 disables
seed = 42                # data order, controls, init
dtype = "auto"           # autocast dtype: auto (bf16 on cuda, float32 on cpu) | float32 | bfloat16
                         # (bf16 on CPU is ~1.5x faster on avx512_bf16 CPUs; weights and loss stay fp32)
matmul_precision = "high"  # torch.set_float32_matmul_precision: highest | high | medium
device = ""              # "" = cuda when available, else cpu
threads = 0              # torch.set_num_threads on cpu; 0 = torch's default
mapping = "random"       # control matching: random (reference) | batch
control_sets = True      # control cells form their own sets (teaches the identity)
batch_encoder = False    # add a batch embedding to every token
pert_features = ""       # {perturbation: vector} file (.pt/.safetensors/.npz/.tsv); "" = one-hot; "pca" =
                         # from the training data: the target gene's loadings on the top-16 principal axes
missing_pert_features = "error"  # error | zero (reference behaviour, warned)
combos = ""              # separator of combination labels (e.g. "+"): a label is encoded from its parts,
                         # multi-hot over the singles (one-hot runs) or combo_reduce of their feature vectors
combo_reduce = "sum"     # sum | mean of the parts' vectors
decoder = True           # train the gene decoder when the data has gene targets (prepare --genes-key X);
                         # its loss (weight --decoder_weight, reference 1.0, paper 0.1) is logged as `dec`
log_every = 10           # steps between log lines (the only host syncs in the loop)
val_every = 250          # steps between validation losses (0 = only at the end)
val_batches = 8          # batches per validation
ckpt_every = 500         # steps between checkpoints (always one at the end)
compile = False          # torch.compile the model (GPU)
parallel = "fsdp"        # multi-process: fsdp (FSDP2, sharded params/grads/optimizer) | ddp
grad_accum = 1           # micro-steps per optimizer step (gradient sync only on the last)
init_from = ""           # fine-tune: start from this run's weights (every tensor whose name and shape match)
reinit = ""              # pert,decoder: re-initialise these parts even when they match (automatic when the
                         # perturbation vocabulary/features or the gene list differ from the source run's)
init_skip = False        # skip source tensors whose shape differs (else an error naming the first one)
freeze_steps = 0         # keep the transformer blocks frozen for the first k steps (the new parts adapt first)
workers = -1             # loader processes building the next steps' batches during a step (per rank);
                         # -1 = 2 on cuda, 0 (in the step) on cpu. Any value gives the same batches
# model fields (STConfig) are overridable too: --hidden=128 --n_layers=4 ...
st_over = {f.name: f.default for f in fields(STConfig)
           if f.name not in ("n_in", "n_out", "n_pert", "n_batch", "n_genes", "n_ctx")}
train_keys = [k for k, v in list(globals().items()) if not k.startswith("_") and
              isinstance(v, (int, float, bool, str)) and k not in ("st_over",)]
train_cfg = {k: globals()[k] for k in train_keys}
cli_guard("train.py", __doc__, extra=lambda: "options (--key=value, defaults; STConfig fields too: "
      f"{', '.join(st_over)}):\n" + "\n".join(f"  --{k}={v!r}" for k, v in train_cfg.items()))
over = configure(sys.argv[1:], train_cfg, st_over)
for k, v in TRAIN_DEFAULTS.get(ALIASES.get(train_cfg["preset"], train_cfg["preset"]), {}).items():
    if k not in over:  # a preset's training recipe (config/st_cpu.py); explicit --key=value wins
        train_cfg[k] = v
globals().update(train_cfg)

# -----------------------------------------------------------------------------
# setup
ddp, rank, local_rank, world, dev = compute_init(seed, device or None)
master = rank == 0
if threads and dev.type == "cpu":
    torch.set_num_threads(threads)
torch.set_float32_matmul_precision(matmul_precision)
print0(f"torch.set_float32_matmul_precision({matmul_precision!r})  (torch {torch.__version__}, "
       f"device {dev}, world {world}, threads {torch.get_num_threads()})")
if dtype == "auto":
    dtype = "bfloat16" if dev.type == "cuda" else "float32"
amp = dtype == "bfloat16"
if amp and dev.type == "cpu":
    if cpu_has_bf16() is False:
        print0("WARNING: --dtype=bfloat16 on a CPU without native bf16 (no avx512_bf16/amx_bf16 in /proc/cpuinfo): "
               "bf16 autocast was measured 14x SLOWER than fp32 on such a CPU (bench/bench_train.py); use "
               "--dtype=float32 (the default on CPU)")
    else:
        print0("note: bf16 autocast on CPU (fast with avx512_bf16/AMX; the loss stays fp32)")
autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp)
if not data or not split:
    die("train.py: --data=PREPARED_DIR and --split=split.json are required")
bad_f = [k for k, v in train_cfg.items() if isinstance(v, float) and not math.isfinite(v)]
if bad_f:
    die(f"train.py: --{bad_f[0]}={train_cfg[bad_f[0]]} is not a finite number")
for k, ok in (("batch_size", batch_size >= 1), ("max_steps", max_steps >= 1), ("grad_accum", grad_accum >= 1),
              ("lr", lr > 0), ("log_every", log_every >= 1), ("ckpt_every", ckpt_every >= 1),
              ("val_every", val_every >= 0), ("val_batches", val_batches >= 1), ("grad_clip", grad_clip >= 0)):
    if not ok:
        die(f"train.py: --{k}={globals()[k]} is out of range (batch_size, max_steps, grad_accum, "
                 "log_every, ckpt_every, val_batches >= 1; lr > 0; val_every, grad_clip >= 0)")


def file_sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()[:16]


ck = ckpt.open_run(out, resume, "train.py", master, ddp)  # the checkpoint to resume, or None: from step 0
resume = ck is not None

# -----------------------------------------------------------------------------
# data
D = Prepared(data)
sp = Split.load(split)
sp.validate(D)
split_hash = file_sha(split)
recipe = D.index.get("recipe", {})
key = recipe.get("key", "X")
# embeddings (obsm/X_state etc.) are signed: no ReLU; gene-valued inputs (X, layers, X_hvg) are
gene_space = not (str(key).startswith("obsm/") and not str(key).endswith("X_hvg"))
pert_table, combo_parts, feats, feat_from = None, None, pert_features or None, None
if pert_features == "pca":  # features without a download, for perturbations that name a measured gene
    need = sorted({p for n in D.pert_names for p in parts_of(n, combos)} - {D.control}) if combos else \
        [n for n in D.pert_names if n != D.control]
    feats, lacking = pca_pert_features(D, sp.train, need)
    feats[D.control] = np.zeros(len(next(iter(feats.values()), np.zeros(16))), np.float32)  # no perturbation
    feat_from = {"pca of training cells": sorted(set(feats) - {D.control}), "none (no measured target gene)": lacking}
    print0(f"perturbation features: {len(feats) - 1}/{len(need)} from the pca of the training cells (the target "
           f"gene's loadings)" + (f"; {len(lacking)} name no measured gene: {lacking[:10]}" if lacking else ""))
    if lacking and missing_pert_features != "zero":
        die(f"train.py: --pert_features=pca: {len(lacking)} perturbations name no measured gene "
                 f"({lacking[:10]}): give a features file (--pert_features=FILE, e.g. ESM2 gene vectors) or "
                 "--missing_pert_features=zero for zero vectors")
try:
    if combos:  # combinations from their parts (state/perts.py combo_table)
        pert_table, combo_parts = combo_table(list(D.pert_names), D.control, combos, combo_reduce,
                                              features=feats, missing=missing_pert_features)
    elif pert_features:
        pert_table = load_pert_features(feats, list(D.pert_names), missing=missing_pert_features)
except (KeyError, ValueError) as e:
    die(f"train.py: {e.args[0]}")
if combos:
    n_combo = sum(len(parts_of(n, combos)) > 1 for n in D.pert_names)
    how = f"{combo_reduce} of the parts' feature vectors" if pert_features else \
        f"multi-hot over {len(combo_parts)} singles ({combo_reduce})"
    print0(f"combinations: {n_combo} of {len(D.pert_names)} labels have several parts ('{combos}'): {how}")
cfg = STConfig.from_name(preset, **{k: st_over[k] for k in over if k in st_over and k != "gene_space"},
                         n_in=D.n_genes, n_pert=(pert_table.shape[1] if pert_table is not None
                                                 else len(D.pert_names)), n_ctx=len(D.context_names),
                         n_batch=len(D.batch_names) if batch_encoder else 0,
                         n_genes=D.n_genes_out if decoder else 0,  # decoder only with a gene target
                         gene_space=st_over["gene_space"] if "gene_space" in over else gene_space)
S, B = cfg.set_size, batch_size
train_part = sp.part("train")  # Rows: O(groups), never one index per training cell
val_rows = sp.part("val")  # Rows: val_frac of the cells of every training group
if parallel not in ("fsdp", "ddp") or grad_accum < 1:
    die(f"train.py: --parallel must be fsdp or ddp (got {parallel!r}), --grad_accum >= 1")
if schedule not in ("constant", "cosine") or warmup < 0 or not 0 <= min_lr <= 1 or not 0 <= ema < 1:
    die(f"train.py: --schedule must be constant or cosine (got {schedule!r}), --warmup >= 0, "
             f"0 <= --min_lr <= 1, 0 <= --ema < 1")
if (ema or select != "last") and ddp and parallel == "fsdp":
    die("train.py: --ema / --select with FSDP are not supported yet; use --parallel=ddp")
if select not in ("last", "support"):
    die(f"train.py: --select must be last or support (got {select!r})")
if guard_by not in ("energy", "mean"):
    die(f"train.py: --guard_by must be energy or mean (got {guard_by!r})")
if guard_rule not in ("best", "1se"):
    die(f"train.py: --guard_rule must be best or 1se (got {guard_rule!r})")
held = sorted({D.context_names.index(c) for c, _ in sp.test_groups})  # held-out context codes
# the data that resembles the test, for support selection and the guard: the split's guard_perts, held
# out of training as the test ones are (all their cells are val), or else the val cells of the held-out
# context's support perturbations (few-shot; these train)
gcodes = [D.pert_names.index(q) for q in sp.guard_perts]
sup_rows = sp.part("val", contexts=held, perturbed=True, perts=gcodes or None)
if gcodes:
    print0(f"guard perturbations (held out of training, scored as unseen): {sp.guard_perts}, "
           f"{len(sup_rows):,} cells")
if select == "support" and len(sup_rows) == 0:
    print0(f"note: --select=support: the {sp.task} split has no val cells of support perturbations in the "
           "held-out context (zero-shot, or --val-frac 0): keeping the last weights")
    select = train_cfg["select"] = "last"
try:
    grid = sorted({float(a) for a in guard.split(",") if a.strip()})
except ValueError:
    die(f"train.py: --guard={guard!r}: give a comma-separated grid of correction strengths, e.g. 0,0.5,1")
if any(not 0 <= a <= 1 for a in grid):
    die(f"train.py: --guard={guard!r}: strengths must lie in [0, 1]")
if grid and (len(sup_rows) == 0 or cfg.anchor == "none"):
    print0("note: --guard needs an anchored model and support cells in the held-out context: alpha stays 1")
    grid = []
if grid and not gcodes and sp.task in ("unseen", "combo"):
    print0(f"note: the {sp.task} split has no guard perturbations, so --guard scores the val cells of "
           "perturbations that train, unlike the test's; make the split with --guard_perts=N")
anchor_table = None
if cfg.anchor != "none":  # baseline shifts from training rows only, cross-fitted (state/baselines.py)
    from state.baselines import group_means, shift_table
    means = group_means(D, train_part, shard=True)  # each rank reads 1/world of the rows, then all-reduce
    anchor_table, choice = shift_table(D, means, cfg.anchor, return_choice=True, sep=combos or "+")
    print0(f"anchored output: y = ctrl + {cfg.anchor} shift[context, perturbation] + correction "
           f"(table {anchor_table.shape}, from {len(train_part):,} training rows)"
           + (f"; per context: {choice}" if choice else ""))
sizes = np.diff(D.group_table[:, 3:5], axis=1)[:, 0]  # cells per group (training groups are these less val)
big = int(sizes[D.group_table[:, 1] != D.control_code].max(initial=0))
if big and S > big:  # sets are padded by resampling: every set would repeat its cells
    print0(f"WARNING: --set_size={S} is larger than every perturbed group (the largest has {big} cells): each "
           f"set repeats its cells about {S / big:.1f}x; a smaller --set_size (<= {big}) wastes no compute")
# one global sequence of B-set micro-batches; this rank takes its block of each step (state/dist.py)
if workers < 0:
    workers = 2 if dev.type == "cuda" else 0
sampler = StepSampler(SetSampler(D, train_part, set_size=S, batch_size=B, seed=seed, train=True,
                                 control_sets=control_sets, mapping=mapping), rank, world, grad_accum,
                      workers=workers, pin=dev.type == "cuda")
print0(f"data {data}: {D.n_cells:,} cells x {D.n_genes} features ({key}), {len(D.pert_names)} "
       f"perturbations, {len(D.context_names)} contexts | split {split} ({sp.task}, held out "
       f"{sp.context}): train {len(train_part):,} val {len(val_rows):,} test {len(sp.part('test')):,} rows"
       f" | loader: {workers} worker process(es)")
if cfg.n_genes:
    print0(f"gene decoder: {cfg.n_out} -> {list(cfg.decoder_hidden)} -> {cfg.n_genes} genes ('{D.genes_key}'), "
           f"loss weight {cfg.decoder_weight}")
elif D.n_genes_out:
    print0(f"note: the data has gene targets ('{D.genes_key}', {D.n_genes_out} genes) but --decoder=False")


def to_dev(b):
    nb = dev.type == "cuda"
    return {k: v.to(dev, non_blocking=nb) for k, v in b.items()}


def model_inputs(b):
    return dict(ctrl=b["ctrl"], pert=b["pert"], batch=b.get("batch") if cfg.n_batch else None,
                tgt=b["tgt"], tgt_genes=b.get("tgt_genes") if cfg.n_genes else None, ctx=b["context"])


# -----------------------------------------------------------------------------
# model / optimizer
if ddp:
    torch.manual_seed(seed)  # the same initial weights on every rank, and as one process
model = StateTransition(cfg, pert_table=pert_table, anchor_table=anchor_table).to(dev)
raw = model
init_note = None
if init_from and not resume:  # transfer (state.ckpt.init_from): before sharding, on the full model
    try:
        init_note = ckpt.init_from(raw, init_from, list(D.pert_names), list(D.genes), combo_parts,
                               [x for x in reinit.split(",") if x], init_skip, say=print0)
    except (ValueError, FileNotFoundError) as e:
        die(f"train.py: {e}")
n_params, n_mm = raw.num_params(), raw.num_params(matmul_only=True)
# FSDP2 (SPEC 13; params become DTensors sharded on dim 0: bf16 compute copies + fp32 reduce on GPU, fp32
# on CPU; the optimizer state is sharded too) or DDP under torchrun (state/dist.py wrap)
model, opt = wrap(raw, ddp, parallel, compile, local_rank,
                  lambda m: m.configure_optimizer(lr=lr, weight_decay=weight_decay, device_type=dev.type))
if ddp:
    torch.manual_seed(seed + rank)  # per-rank dropout streams
# weight EMA (fp32, on the device): what predict.py gets; the raw weights keep training
ema_p = [p.detach().clone().float() for p in raw.parameters()] if ema else None
ema_names = [n for n, _ in raw.named_parameters()]
best = {"loss": None, "step": None, "w": None}  # --select=support: the best weights so far (cpu)
curve = []  # (step, support val loss) of every check: meta.json's support_curve


def lr_at(step):
    """Learning rate of optimizer step `step` (0-based): linear warmup, then constant or cosine."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    t = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * t)))

flops_step = raw.estimate_flops(B * world * grad_accum, S)
print0(f"ST {preset}: {n_params:,} params ({n_mm:,} in matmuls), S {S}, B {B} x {world} proc x "
       f"{grad_accum} accum{f' ({parallel})' if ddp else ''}, {flops_step / 1e9:.2f} GFLOP/step | dtype {dtype}")
print0("config: " + json.dumps({**train_cfg, "st": cfg.to_dict()}))

# -----------------------------------------------------------------------------
# checkpointing


def git_sha():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return None


def save_checkpoint(step, val_loss):
    """Collective: every rank calls it. One commit (state/ckpt.py save): `dcp/` (model + optimizer,
    sharded) and `state.pt` (step, the global sampler cursor, every rank's RNG), then `ema.safetensors`,
    the consolidated fp32 `model.safetensors` (the weights predict.py uses: the EMA or selected ones) and
    `meta.json`."""
    from safetensors.torch import save_file

    def files(sd):  # rank 0, with the consolidated weights
        meta = {"step": step, "val_loss": val_loss, "st": cfg.to_dict(), "train": train_cfg, "ema": bool(ema),
                "select": select, "best_step": best["step"], "best_support_loss": best["loss"],
                "support_curve": curve, "ema_bias_corrected": True, "guard": guard_note,
                "corr_scale": raw.corr_scale.tolist() if raw.corr_scale is not None else None,
                "genes": list(D.genes), "key": key, "recipe": recipe, "gene_space": cfg.gene_space,
                "genes_out": list(D.gene_names_out) if cfg.n_genes else None,  # decoder output genes
                "genes_key": D.genes_key if cfg.n_genes else None,
                "pert_names": list(D.pert_names), "context_names": list(D.context_names),
                "batch_names": list(D.batch_names), "pert_col": D.pert_col, "context_col": D.context_col,
                "batch_col": D.batch_col, "control": D.control, "data": os.path.abspath(data),
                "data_checksum": D.checksum, "split": os.path.abspath(split), "split_hash": split_hash,
                "init_from": init_note, "pert_features": pert_features or None, "combos": combos or None,
                "combo_reduce": combo_reduce, "combo_parts": combo_parts,
                "pert_features_hash": file_sha(pert_features) if pert_features and pert_features != "pca" else None,
                "pert_features_from": feat_from,
                "world": world, "grad_accum": grad_accum, "parallel": parallel if ddp else None,
                "global_batch": B * world * grad_accum, "git": git_sha(), "torch": torch.__version__}
        f = {}
        if ema_p is not None:  # the weights predict.py loads are the EMA ones (or the selected ones)
            sd = {**sd, **{n: e.detach().cpu().contiguous() for n, e in zip(ema_names, ema_p)}}
            f["ema.safetensors"] = lambda p, w=sd: save_file(w, p, {"step": str(step)})
        if best["w"] is not None:
            sd = {**sd, **dict(zip(ema_names, best["w"]))}
        f["model.safetensors"] = lambda p: save_file(sd, p, {"step": str(step)})
        f["meta.json"] = lambda p: ckpt.write_text(p, json.dumps(meta, indent=1))
        return f
    ckpt.save(out, step, raw, opt, dev, {"sampler": samp_state, "grad_accum": grad_accum}, files)


start = 0
if resume:
    meta, state = ckpt.read(ck, "train.py", "st", "an ST run of train.py")
    if meta["data_checksum"] != D.checksum or meta.get("split_hash") != split_hash:
        die("train.py: --resume with a different dataset or split than the run was trained on")
    # fields added since the run was written take their defaults (what the run computed without them)
    was = STConfig.from_dict(meta["st"]).to_dict()
    if was != cfg.to_dict():
        diff = [f"{k} ({was[k]!r} -> {v!r})" for k, v in cfg.to_dict().items() if was.get(k) != v]
        die(f"train.py: --resume with a different model config than the run's meta.json: {', '.join(diff)}; "
            "resume with the run's settings, or start a new run")
    ckpt.check_steps(state["step"], max_steps, out, "train.py")
    if bool(meta.get("ema")) != bool(ema) or meta.get("select", "last") != select:
        die(f"train.py: --resume with --ema={ema} --select={select} but the run was trained with "
                 f"ema={meta.get('ema')} select={meta.get('select', 'last')}")
    # settings that fix the data order or the model are refused (world x accum may trade at one global
    # batch); the others are applied and said
    gb = B * world * grad_accum
    ckpt.check_resume(meta.get("train", {}), train_cfg, ("batch_size", "seed", "mapping", "control_sets",
                      "batch_encoder", "pert_features", "decoder", "combos", "combo_reduce"), "train.py",
                      also=[f"global_batch ({meta['global_batch']!r} -> {gb!r})"] if meta.get("global_batch", gb) != gb
                      else [], ignore=("resume", "out", "init_from", "reinit", "init_skip"))
    if any(train_cfg[k] != meta.get("train", {}).get(k, train_cfg[k]) for k in ("init_from", "reinit", "init_skip")):
        print0("note: --init_from/--reinit/--init_skip act at step 0 only: a resumed run continues from its own "
               "checkpoint, so they are ignored")
    ckpt.restore(ck, raw, opt, weight_decay, "train.py")  # any world size: DCP reshards
    if ema_p is not None:
        esd = ckpt.load_weights(os.path.join(ck, "ema.safetensors"), "train.py")
        for n, e in zip(ema_names, ema_p):
            e.copy_(esd[n])
    if select == "support" and meta.get("best_step") is not None:
        msd = ckpt.load_weights(os.path.join(ck, "model.safetensors"), "train.py")
        best.update(loss=meta["best_support_loss"], step=meta["best_step"], w=[msd[n] for n in ema_names])
        curve.extend(tuple(x) for x in meta.get("support_curve") or [])
    try:
        sampler.load_state_dict(state["sampler"])
    except (ValueError, KeyError, TypeError) as e:  # a state.pt edited or of another data set
        die(f"train.py: --resume: {ck}/state.pt: its sampler cursor does not fit this run ({type(e).__name__}: {e}); "
            "copy the run folder again, or start a new run")
    ckpt.restore_rng(state, rank, world, seed, dev)
    start = state["step"]
    if master:
        ckpt.trim_log(os.path.join(out, "log.jsonl"), start)
    print0(f"resumed {out} at step {start}")

# -----------------------------------------------------------------------------
# validation (val rows are held-back cells of *training* groups; never the test split)


@torch.no_grad()
def val_loss(support=False):
    """Mean per-set energy over `val_batches` batches of val sets, padded to S by resampling as in
    training (the reference's val semantics; unpadded small sets would inflate the V-statistic, whose
    within-set term is biased by ~1/N). A fresh sampler with a fixed seed: the same sets every time.
    support=True: only the support perturbations' val cells of the held-out context, paired with that
    context's training controls."""
    rows = sup_rows if support else val_rows
    if len(rows) == 0:
        return None
    if support:
        rows = rows + sp.part("train", contexts=held, perturbed=False)  # + that context's training controls
    vs = SetSampler(D, rows, set_size=S, batch_size=B, seed=seed + 1, train=True,
                    control_sets=control_sets and not support, mapping=mapping)
    model.eval()
    tot = torch.zeros(4, device=dev)
    per_set = torch.zeros(3, val_batches, B, device=dev)  # (energy, set-mean error, valid) of each set
    # the same val_batches batches at any world size: rank r takes batches r, r+W, ...; every rank
    # runs the same number of forwards (FSDP all-gathers inside), the surplus weighted 0
    for i in range(rank, -(-val_batches // world) * world, world):
        b = to_dev(vs.batch(*divmod(i, vs.steps_per_epoch)))
        with autocast:  # the training loss's own parts, per set (st._loss)
            _, parts = raw(**model_inputs(b), lens=b["lens"], reduction="none")
        v = b["valid"].float() * (i < val_batches)
        tot[0] += (parts["main"] * v).sum()
        tot[1] += v.sum()
        tot[3] += (parts["mean"] * v).sum()
        if "decoder" in parts:  # gene-decoder loss on the same sets (SPEC 4.3: val/decoder_loss)
            tot[2] += (parts["decoder"] * v).sum()
        if i < val_batches:
            per_set[:, i] = torch.stack([parts["main"].float() * v, parts["mean"].float() * v, v])
    model.train()
    if ddp:
        dist.all_reduce(tot)
        dist.all_reduce(per_set)  # each batch was filled by one rank
    ok = per_set[2].flatten() > 0
    val_parts["sets"] = {"energy": per_set[0].flatten()[ok].double().cpu(), "mean": per_set[1].flatten()[ok].double().cpu()}
    val_parts["dec"] = (tot[2] / tot[1].clamp_min(1)).item() if cfg.n_genes else None
    val_parts["mean"] = (tot[3] / tot[1].clamp_min(1)).item()
    return (tot[0] / tot[1].clamp_min(1)).item()


val_parts = {"dec": None, "mean": None, "sets": None}  # the last validation's decoder part, set-mean error, per-set losses
guard_note = None  # --guard: the chosen alpha and the support loss at each strength


@torch.no_grad()
def support_loss(step):
    """Val loss of the weights predict.py would use (EMA if on) on the held-out context's support
    perturbations; keeps a copy of the best ones."""
    params = list(raw.parameters())
    saved = [p.detach().clone() for p in params] if ema_p is not None else None
    if ema_p is not None:
        torch._foreach_copy_(params, ema_p)
    sl = val_loss(support=True)
    curve.append((step, sl))
    if best["loss"] is None or sl < best["loss"]:
        best.update(loss=sl, step=step, w=[p.detach().cpu().clone() for p in params])
    if saved is not None:
        torch._foreach_copy_(params, saved)
    return sl



@torch.no_grad()
def choose_alpha():
    """The guarded correction: with the weights predict.py will use (selected, EMA or last), the support
    val loss (energy and set-mean error) of the held-out context at each alpha of the grid; --guard_by picks
    the loss and --guard_rule the alpha (best: the lowest; 1se: the weakest within one standard error of it;
    alpha 0 = the anchor). Every criterion x rule is recorded, with the alpha it would choose."""
    params = list(raw.parameters())
    saved = [p.detach().clone() for p in params]
    use = best["w"] if best["w"] is not None else ema_p
    if use is not None:
        torch._foreach_copy_(params, [w.to(p.device, p.dtype) for p, w in zip(params, use)])
    losses, means, sets = {}, {}, {}
    for a in grid:
        raw.corr_scale[held] = a
        losses[a] = val_loss(support=True)
        means[a] = val_parts["mean"]
        sets[a] = val_parts["sets"]  # the same sets (same cells, same controls) at every alpha: paired
    by = {}
    for n, d in (("energy", losses), ("mean", means)):
        by[n] = best_a = min(grid, key=lambda k: (d[k], -k))
        # the one-standard-error rule (as in CART / glmnet's lambda.1se): the weakest correction whose
        # loss is within one standard error (of the per-set paired difference) of the best one's
        by[n + "+1se"] = next(k for k in grid if k >= best_a or paired_within_se(sets[k][n], sets[best_a][n]))
    a = by[guard_by + ("+1se" if guard_rule == "1se" else "")]
    raw.corr_scale[held] = a
    torch._foreach_copy_(params, saved)
    print0("guard: support val loss (energy / set-mean error) by correction strength " +
           ", ".join(f"{k:g}: {losses[k]:.4f} / {means[k]:.5f}" for k in grid) +
           f" -> alpha {a:g} for {sp.context} (by {guard_by}, rule {guard_rule}; " +
           ", ".join(f"{k} {v:g}" for k, v in by.items()) + ")")
    return {"alpha": a, "by": guard_by, "rule": guard_rule, "alpha_by": by,
            "losses": {f"{k:g}": v for k, v in losses.items()}, "mean_losses": {f"{k:g}": v for k, v in means.items()}}


def paired_within_se(x, y):
    """Is mean(x - y) <= one standard error of it (x, y: the same sets' losses under two settings)?"""
    d = x - y
    return len(d) > 1 and float(d.mean()) <= float(d.std()) / len(d) ** 0.5


if len(val_rows) == 0:
    print0("WARNING: the split has no val rows: no validation loss (test rows are never used here)")

# -----------------------------------------------------------------------------
# loop
logf = None
if master:
    os.makedirs(out, exist_ok=True)
    logf = open(os.path.join(out, "log.jsonl"), "a")
samp_state = sampler.state_dict()  # state *before* the pending batches: what a checkpoint stores
batches = [to_dev(b) for b in sampler.next()]  # this rank's grad_accum micro-batches of the step
model.train()
t_last, step_last, dt_ema, wait_last = time.perf_counter(), start, None, sampler.wait
built_last = (sampler.built, sampler.n_built)
vl = None
first_bad = torch.full((), -1, dtype=torch.int64, device=dev)  # first step with a non-finite loss (on device)


def check_finite(step):
    """Stop before anything is written when a loss went non-finite (one host sync, at log/ckpt steps)."""
    fb = first_bad.clone()
    if ddp:  # every rank stops together
        dist.all_reduce(fb, op=dist.ReduceOp.MAX)
    b = int(fb.item())
    if b >= 0:
        if master and logf:
            logf.close()
        die(f"train.py: the training loss is not finite (NaN/Inf) at step {b + 1} (checked at step "
                         f"{step}); stopped before writing a checkpoint. The last checkpoint in {out} is "
                         "untouched. Check the input data for NaN/Inf or negative values, or lower --lr")
for step in range(start, max_steps + 1):
    last = step == max_steps
    if (val_every and step % val_every == 0 and step > start) or last:
        vl = val_loss()
        if vl is not None:
            vd = val_parts["dec"]
            print0(f"step {step}/{max_steps} | val_loss {vl:.4f}" + (f" | val_dec {vd:.4f}" if vd is not None else ""))
            sl = support_loss(step) if select == "support" else None
            if sl is not None:
                print0(f"step {step}/{max_steps} | support val {sl:.4f} (best {best['loss']:.4f} at step {best['step']})")
            if logf:
                logf.write(json.dumps({"step": step, "val_loss": vl, **({"val_dec": vd} if vd is not None else {}),
                                       **({"val_support": sl} if sl is not None else {})}) + "\n")
                logf.flush()
    if last and grid:
        guard_note = choose_alpha()
    if (step % ckpt_every == 0 and step > start) or last:
        check_finite(step)
        save_checkpoint(step, vl)  # collective: every rank calls it
    if last:
        break
    # the loss is the mean over the GLOBAL sets of the step (all micro-batches, all ranks), counted
    # and all-reduced on device (no host sync). Each micro-loss is a mean over its own sets, so it is
    # weighted n_j / n_tot; FSDP/DDP average gradients over ranks, hence x world.
    n_sets = torch.stack([(b["lens"] > 0).sum() for b in batches]).float()  # (k,)
    n_tot = all_reduce_sum(n_sets.sum())
    loss_sum = torch.zeros((), device=dev)
    for j, b in enumerate(batches):
        set_sync(model, j == len(batches) - 1)  # gradient reduce only after the last micro-step
        # dropout masks from (seed, global micro-batch index): the same at any world size and on resume
        torch.manual_seed(seed * 1_000_003 + samp_state["cursor"] + rank * grad_accum + j)
        with autocast:
            loss, parts = model(**model_inputs(b), lens=None)
        (loss * (n_sets[j] * world / n_tot)).backward()
        loss_sum += loss.detach() * n_sets[j]
    first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss_sum), step, first_bad)
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip > 0 else None
    lr_now = lr_at(step)
    for g in opt.param_groups:
        g["lr"] = lr_now
    if step < freeze_steps:  # frozen backbone: no gradient, so Adam leaves the blocks as loaded
        for p in raw.blocks.parameters():
            p.grad = None
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ema_p is not None:
        with torch.no_grad():
            # bias-corrected: the mean of the steps' weights so far with weights ema^(t-i), the initial
            # weights excluded (a plain EMA from the init is still ~78% init at step 250 with 0.999)
            torch._foreach_lerp_(ema_p, [p.detach().float() for p in raw.parameters()],
                                 (1.0 - ema) / (1.0 - ema ** (step + 1)))
    # next batches: the sampler state saved in a checkpoint is the one *before* the pending batches,
    # so a resumed run redraws exactly the batches the uninterrupted run would use next
    samp_state = sampler.state_dict()
    batches = [to_dev(b) for b in sampler.next()]
    if step == start:
        gc.collect()
        gc.freeze()
        gc.disable()
    elif step % 1000 == 0:
        gc.collect()
    if (step + 1) % log_every == 0 or step + 1 == max_steps:
        lossf = (all_reduce_sum(loss_sum) / n_tot).item()  # sync point: global mean over the step
        if not math.isfinite(lossf):
            first_bad = torch.where(first_bad < 0, step, first_bad)
        check_finite(step + 1)
        now = time.perf_counter()
        dt = (now - t_last) / (step + 1 - step_last)
        wait = (sampler.wait - wait_last) / max(now - t_last, 1e-9)  # share of wall time waiting for data
        step_last, t_last, wait_last = step + 1, now, sampler.wait
        cap = sampler.capacity(built_last) * B * S  # target cells/s this rank's loader can build
        built_last = (sampler.built, sampler.n_built)
        dt_ema = dt if dt_ema is None else 0.9 * dt_ema + 0.1 * dt
        cells = B * S * world * grad_accum / dt
        eta = dt_ema * (max_steps - step - 1)
        short = {"decoder": "dec"}
        extra = "".join(f" | {short.get(k, k)} {v.item():.4f}" for k, v in parts.items() if k != "main")
        u = mfu(flops_step, dt, dev, world)  # the global step's FLOPs over every rank's peak
        mfu_s = f" | mfu {100 * u:.1f}%" if u is not None else ""
        if hasattr(gnorm, "full_tensor"):
            gnorm = gnorm.full_tensor()  # DTensor norm (FSDP2): a collective, every rank is here
        gn = f" | gnorm {gnorm.item():.2f}" if gnorm is not None else ""
        print0(f"step {step + 1}/{max_steps} | loss {lossf:.4f}{extra} | lr {lr_now:.1e}{gn} | "
               f"dt {dt * 1000:.0f}ms | data {100 * wait:.0f}% (loader {cap:,.0f} cells/s) | cells/s {cells:,.0f}"
               f"{mfu_s} | eta {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m{int(eta % 60):02d}s")
        if logf:
            logf.write(json.dumps({"step": step + 1, "loss": lossf, "dt_ms": dt * 1000, "data_wait": wait,
                                   "loader_cells_s": cap,
                                   **({"dec": parts["decoder"].item()} if "decoder" in parts else {}),
                                   **({"mean": parts["mean"].item()} if "mean" in parts else {})}) + "\n")
            logf.flush()

if logf:
    logf.close()
print0(f"done: {out} (step {max_steps}, val_loss {vl})" + (f"; model.safetensors holds step {best['step']}, "
       f"the lowest support val loss {best['loss']:.4f} (curve: " + ", ".join(f"{k} {v:.4f}" for k, v in curve)
       + ")" if best["step"] is not None else ""))
sampler.close()
compute_cleanup()
quiet_exit(0)
