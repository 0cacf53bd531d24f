"""
SE (State Embedding): pre-train on prepared folders, then write obsm['X_state'] (SPEC 7, 8).

Pre-training (fit) reads prepared folders (python -m state.data prepare FILE DIR; one folder per gene
panel: each keeps its genes, mapped by upper-case symbol into one vocabulary), through the training
data path of train.py: one global cursor over a seeded permutation of all cells (state.sampler.CellSampler),
loader processes, FSDP2 (default) or DDP under torchrun, and the checkpoint of train.py: a sharded DCP
checkpoint of weights + optimizer (`dcp/`) that resumes at another world size:
    CPU:      python embed.py fit --data=data/a,data/b --out=runs/se_tiny --preset=tiny --max_steps=300
    1 GPU:    python embed.py fit --data=data/a,data/b --out=runs/se --preset=default --gene_emb=esm2.pt
    N GPUs:   torchrun --standalone --nproc_per_node=8 embed.py fit --data=data/a,data/b --out=runs/se --preset=default
              (--parallel=ddp: replicated weights, no per-block all-gathers; for small presets)
    resume:   python embed.py fit --data=data/a,data/b --out=runs/se_tiny --resume   (same args; exact replay)
The cells fit sees are the prepared rows: log1p of counts normalised to the folder's target sum (or the
file's log1p values); meta.json records that recipe, and transform applies it to raw counts.
Embedding (transform), streamed in row blocks, memory bounded whatever the file size:
    python embed.py transform --ckpt=runs/se_tiny data.h5ad                 (adds/replaces obsm/X_state in place)
    python embed.py transform --ckpt=runs/se_tiny data.h5ad --output=out.h5ad   (copy, then add)
    python embed.py transform --ckpt=runs/se_tiny data.h5ad --output=emb.npy
Settings are `--key=value` (state/config.py: ast.literal_eval, type-checked); unknown keys are rejected. The model preset's
fields (d_model, n_layer, pad_length, P, N, S, ...) can be overridden the same way.

Gene vectors: `--gene_emb=FILE` ({gene: vector} .safetensors/.pt/.npz, e.g. ESM2) or the fallbacks
`pca` (default; top 256 right singular vectors of the centred log1p training matrix) or `onehot`.
Schedule (SPEC 7): AdamW(lr, wd 0.01), linear warmup over 3% of the steps from 0.33*lr, then cosine
to 0.3*lr at max_steps; grad-norm clip 0.8; bf16 autocast on GPU.
A checkpoint is `dcp/` (torch.distributed.checkpoint: weights + optimizer, sharded per rank) + the consolidated
model.safetensors (weights + frozen gene table, what transform reads) + meta.json + state.pt (step, global
data cursor, every rank's RNG), committed together (state/ckpt.py: `ckpt-<step>/` behind the `ckpt` link).
"""

import contextlib
import gc
import json
import math
import os
import shutil
import time
from dataclasses import MISSING, fields

import numpy as np
import torch

from state import ckpt
from state.config import configure
from state.errors import UserError, die, need_space, output_file, run, stale_tmp
from state.dist import compute_cleanup, compute_init, mfu, print0, set_sync, wrap
from state.sampler import StepSampler
from state.h5ad import H5AD
from state.se import (GeneMap, SEConfig, StateEmbedding, file_hash, is_raw, load_gene_vectors, se_table,
                      load_model, model_files, norm_gene, pca_gene_vectors)

# ---------------------------------------------------------------------------------------------------
# settings


FIT = dict(
    data="",                  # prepared folder(s), comma-separated (python -m state.data prepare FILE DIR;
                              # one per gene panel: each keeps its genes, mapped into one vocabulary)
    out="runs/se",            # run directory
    preset="tiny",            # SE preset: tiny | default | se600m
    gene_emb="pca",           # FILE | pca | onehot
    pca_dim=256,              # width of the pca fallback
    pca_cells=200_000,        # cells sampled for the pca fallback
    ds_col="",                # dataset label: "" = one per folder, or the prepared "context" or "batch" code
    batch_size=128,           # cells per step per process (per micro-step)
    grad_accum=1,             # micro-steps per optimizer step
    max_steps=1000,
    lr=-1.0,                  # peak lr; -1 = preset default (tiny 1e-3, others 1e-5 as the reference)
    wd=0.01,
    warmup=0.03,              # warmup fraction of max_steps (from 0.33*lr)
    min_lr_frac=0.3,          # cosine floor as a fraction of lr
    clip=0.8,
    dtype="auto",             # auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float32
    workers=-1,               # loader processes (state.sampler.StepSampler); -1 = 2 on cuda, 0 on cpu
    val_cells=256,            # held-out cells per folder for the validation loss
    eval_every=200,
    save_every=500,
    log_every=10,
    seed=0,
    resume=False,
    stop_at=-1,               # save and exit after this step (a time slot); --resume continues exactly
    compile=False,
    parallel="fsdp",          # multi-process: fsdp (FSDP2: sharded weights, grads, optimizer) | ddp
    threads=0,                # torch.set_num_threads on CPU; 0 = torch's default (1 helps on a busy box)
)

TRANSFORM = dict(ckpt="", output="", key="X", batch_size=256, seed=0, dtype="auto",
                 obsm_key="X_state", device="auto", threads=0)


def parse(argv, defaults, model=False):
    """`--key=value` overrides through state.config.configure (unknown keys and wrong types are errors);
    `model=True` also accepts SEConfig fields. -> (settings, model overrides, positional args)."""
    pos = [a for a in argv if not a.startswith("--")]
    flags = []
    for a in argv:
        if a.startswith("--"):
            k, eq, v = a[2:].partition("=")
            flags.append(f"--{k.replace('-', '_')}{eq}{v}")
    cfg = dict(defaults)
    mdef = {f.name: (None if f.default is MISSING else f.default) for f in fields(SEConfig)} if model else {}
    try:
        seen = configure(flags, cfg, mdef)
    except ValueError as e:
        die(f"embed.py: {e}")
    return cfg, {k: mdef[k] for k in seen if k in mdef}, pos


def autocast(device, dtype):
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def to_batch(b, labels, cls_of, masks, offs, device):
    """A CellSampler batch -> model inputs on device: x (B, V), valid (B, V), rows (B,) global ids (the
    per-cell draws are seeded by them), ds (B,) dataset labels, cls (B,) vocab row whose count CLS gets."""
    f, r = b["folder"].numpy(), b["row"].numpy()
    ds = np.empty(len(f), np.int64)
    for k in np.unique(f):
        ds[f == k] = labels[k](r[f == k])
    ft = torch.from_numpy(f).to(device)
    return (b["x"].to(device, non_blocking=True), masks[ft], torch.from_numpy(offs[f] + r).to(device),
            torch.from_numpy(ds).to(device), cls_of[ft])


def peak_lr(C):
    """--lr, or the preset's: tiny 1e-3, the others 1e-5 as the reference."""
    return C["lr"] if C["lr"] > 0 else (1e-3 if C["preset"] == "tiny" else 1e-5)


def lr_at(step, T, lr, warmup, floor):
    """3% linear warmup from 0.33*lr, then cosine to floor*lr at step T (SPEC 7)."""
    w = max(1, math.ceil(warmup * T))
    if step < w:
        return lr * (0.33 + 0.67 * step / w)
    t = min(1.0, (step - w) / max(1, T - w))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


# ---------------------------------------------------------------------------------------------------
# fit: settings and run folder, data, model, resume, loop (train.py's sections; the run folder is
# state/ckpt.py's)

def fit(argv):
    C, mkw, pos = parse(argv, FIT, model=True)
    if pos or not C["data"]:
        die("embed.py fit: --data=DIR[,DIR2] (prepared folders) is required"
                         + (f"; {pos[0]} is a file: prepare it first (python -m state.data prepare {pos[0]} DIR), "
                            "one folder per gene panel" if pos else ""))
    folders = [p for p in C["data"].split(",") if p]
    if C["parallel"] not in ("fsdp", "ddp"):
        die(f"embed.py fit: --parallel must be fsdp or ddp (got {C['parallel']!r})")
    ddp, rank, local_rank, world, device = compute_init(seed=C["seed"])
    if C["threads"] and device.type == "cpu":
        torch.set_num_threads(C["threads"])
    master, out = rank == 0, C["out"]
    ck = ckpt.open_run(out, C["resume"], "embed.py fit", master, ddp)  # the checkpoint to resume, or None
    C["resume"] = resume = ck is not None
    meta_old, st = ckpt.read(ck, "embed.py fit", "preset", "an SE run") if resume else (None, None)
    print0(f"fit config: {json.dumps(C)} model overrides: {mkw}")

    # --- data: prepared folders (rows as prepared: log1p-normalised expression), vocabulary, vectors
    from state.data import Prepared
    from state.sampler import CellSampler
    datas = [Prepared(p) for p in folders]
    for d in datas:
        if d.index["recipe"]["key"].startswith("obsm/"):
            die(f"embed.py fit: {d.dir} holds an embedding ('{d.index['recipe']['key']}'); SE needs "
                             "gene expression (prepare the counts or log1p matrix)")
    if resume:  # what fixes the data, its order or the model is refused; the rest is applied and said
        ckpt.check_steps(st["step"], C["max_steps"], out, "embed.py fit")
        mc, w_old = meta_old["config"], len(ckpt.rngs(st))
        also = [f"{k} ({mc.get(k)!r} -> {v!r})" for k, v in mkw.items() if mc.get(k) != v]
        if meta_old.get("data_checksums") != [d.checksum for d in datas]:
            also.append("data (the prepared folders or their checksums differ)")
        if w_old * meta_old["fit"]["grad_accum"] != world * C["grad_accum"]:  # world x accum may trade
            also.append(f"global batch ({w_old} processes x {meta_old['fit']['grad_accum']} micro-steps -> "
                        f"{world} x {C['grad_accum']})")
        ckpt.check_resume(meta_old["fit"], C, ("preset", "batch_size", "seed", "ds_col", "gene_emb", "pca_dim",
                          "pca_cells", "val_cells"), "embed.py fit", also, ignore=("resume", "stop_at", "out"))
    genes, maps, emb, src = gene_table(C, datas, meta_old, master)
    ds_names, labels = dataset_labels(C, datas, folders)
    # cells: one global sequence (state.sampler.CellSampler) cut by rank (StepSampler), held-out val cells
    workers = C["workers"] if C["workers"] >= 0 else (2 if device.type == "cuda" else 0)
    try:
        cells = CellSampler(datas, [m.to_vocab for m in maps], len(genes), C["batch_size"], C["seed"],
                            C["val_cells"])
    except ValueError as err:
        die(f"embed.py fit: {err} (x {world} processes)")
    sampler = StepSampler(cells, rank, world, C["grad_accum"], workers=workers, pin=device.type == "cuda")
    offs = np.cumsum([0] + [d.n_cells for d in datas])
    print0(f"data: {len(datas)} prepared folders, {offs[-1]} cells ({int(cells.nv.sum())} held out), {len(genes)} "
           f"genes in the vocabulary, {len(ds_names)} dataset labels | loader: {workers} worker process(es)")

    # --- model (the same initial weights on every rank: FSDP2 does not broadcast them)
    lr = peak_lr(C)
    if resume:  # the frozen gene table from model.safetensors; weights and optimizer from dcp/ below
        cfg = ckpt.check_se_meta(meta_old, f"embed.py fit: {ck}")
        sd = ckpt.load_weights(os.path.join(ck, "model.safetensors"), "embed.py fit")
        raw = ckpt.fit_weights(StateEmbedding(cfg, se_table(sd, meta_old, f"embed.py fit: {ck}"), genes), sd,
                               f"embed.py fit: {ck}")
    else:
        cfg = SEConfig.from_name(C["preset"], n_datasets=len(ds_names), **mkw)
        torch.manual_seed(C["seed"])
        raw = StateEmbedding(cfg, emb, genes)
        torch.manual_seed(C["seed"] + rank)  # per-rank dropout streams
    raw.to(device)
    print0(f"SE {C['preset']}: {raw.num_params() / 1e6:.2f}M params, L={cfg.pad_length + cfg.ds_token}, "
           f"E={cfg.E}, lr {lr:g}" + (f" | {C['parallel']} x {world}" if ddp else ""))
    model, opt = wrap(raw, ddp, C["parallel"], C["compile"], local_rank, lambda m: m.configure_optimizer(lr, C["wd"]))
    masks = torch.from_numpy(np.stack([m.valid() for m in maps])).to(device)  # (F, V)
    cls_of = torch.tensor([m.cls_gene() for m in maps], device=device)  # (F,)
    step0 = 0
    if resume:
        ckpt.restore(ck, raw, opt, C["wd"], "embed.py fit")  # weights + optimizer, resharded to this world
        try:
            sampler.load_state_dict(st["sampler"])  # one global cursor: any world size
        except (ValueError, KeyError, TypeError) as err:  # a state.pt edited or of other data
            die(f"embed.py fit: --resume: {ck}/state.pt: its sampler cursor does not fit this run "
                f"({type(err).__name__}: {err}); copy the run folder again, or start a new run")
        ckpt.restore_rng(st, rank, world, C["seed"], device)
        step0 = st["step"]
        print0(f"resumed from {out} at step {step0}")

    # --- loop
    recipes = [d.index["recipe"] for d in datas]
    meta = dict(preset=C["preset"], fit=C, data=[os.path.abspath(p) for p in folders],
                data_checksums=[d.checksum for d in datas], recipe=recipes[0], recipes=recipes, gene_emb=src,
                datasets=ds_names, ds_col=C["ds_col"], world=world, parallel=C["parallel"] if ddp else None,
                torch=torch.__version__)
    val = [(f, v, maps[f].to_vocab(datas[f].rows(v))) for f in range(len(datas)) if len(v := cells.val_rows(f))]
    batch_of = lambda b: to_batch(b, labels, cls_of, masks, offs, device)
    loop(C, model, raw, opt, sampler, batch_of, val, meta, step0, world, rank, device)
    sampler.close()
    compute_cleanup()


def gene_table(C, datas, meta_old, master):
    """The gene vocabulary and its vectors: a resumed run's own (its table is in model.safetensors), a
    --gene_emb file's, or the union of the folders' genes with the pca or onehot fallback. -> (genes,
    GeneMap of each folder, (V, E) vectors or None on resume, their source for meta.json)."""
    emb = None
    if meta_old:
        genes, src = meta_old["genes"], meta_old["gene_emb"]
    elif C["gene_emb"] in ("pca", "onehot"):
        genes = list(dict.fromkeys(norm_gene(g) for d in datas for g in d.genes))  # union, first-seen order
        src = {"kind": C["gene_emb"]}
    else:
        genes, emb = load_gene_vectors(C["gene_emb"])
        src = {"kind": "file", "path": os.path.abspath(C["gene_emb"]), "hash": file_hash(C["gene_emb"])}
        print0(f"gene vectors: {len(genes)} x {emb.shape[1]} from {C['gene_emb']}")
    maps = [GeneMap(d, genes, quiet=not master) for d in datas]
    V = len(genes)
    if not meta_old and C["gene_emb"] == "onehot":
        emb = torch.eye(V)
        print0(f"WARNING: gene_emb=onehot: a {V} x {V} identity table (reference fallback); no prior")
    if not meta_old and C["gene_emb"] == "pca":
        t0 = time.time()
        emb = pca_gene_vectors(list(zip(datas, maps)), V, k=C["pca_dim"], max_cells=C["pca_cells"],
                               seed=C["seed"])
        print0(f"WARNING: gene_emb=pca: {emb.shape[1]} right singular vectors of the centred log1p "
               f"training matrix ({time.time() - t0:.1f}s). They carry no protein prior, cover only the "
               f"{V} training genes, and are not comparable with ESM2-based SE embeddings.")
    return genes, maps, emb, src


def dataset_labels(C, datas, folders):
    """One label per folder, or the prepared context/batch codes (one vocabulary across folders). ->
    (label names, per folder a function of its rows giving their label codes)."""
    col = C["ds_col"]
    if col in ("context", "batch"):
        names = sorted({n for d in datas for n in getattr(d, f"{col}_names")})
        lut = {n: i for i, n in enumerate(names)}
        luts = [np.array([lut[n] for n in getattr(d, f"{col}_names")]) for d in datas]
        return names, [lambda r, d=d, t=t: t[np.asarray(getattr(d, col)[r])] for d, t in zip(datas, luts)]
    if col:
        die(f"embed.py fit: --ds_col must be '', context or batch (got {col!r})")
    return ([os.path.basename(os.path.normpath(p)) for p in folders],
            [lambda r, f=f: np.full(len(r), f, np.int64) for f in range(len(datas))])


def evaluate(model, raw, val, batch_of, C, device, step):
    """Validation loss on the held-out cells (eval mode, draws seeded by the cell ids)."""
    model.eval()
    tot, n = {}, 0
    with torch.no_grad(), autocast(device, C["dtype"]):
        for f, v, x in val:
            for a in range(0, len(v), C["batch_size"]):
                n = len(v[a:a + C["batch_size"]])
                b = batch_of({"x": torch.from_numpy(x[a:a + n]), "folder": torch.full((n,), f),
                              "row": torch.from_numpy(v[a:a + n])})
                if len(b[0]) < 2:
                    continue
                loss, parts = raw(b[0], b[1], b[2], 12345, b[3], b[4])
                w = len(b[0])
                for k, t in [("loss", loss)] + list(parts.items()):
                    tot[k] = tot.get(k, 0.0) + t.float().item() * w  # sync point (eval only)
                n += w
    model.train()
    if n:
        print0(f"val step {step} | " + " | ".join(f"{k} {v / n:.4f}" for k, v in tot.items()))
        return tot["loss"] / n


def loop(C, model, raw, opt, sampler, batch_of, val, meta, step0, world, rank, device):
    """Optimizer steps step0 .. max_steps: validation every eval_every, a checkpoint every save_every (the
    sampler's cursor before the step's batches: a resume draws them again), at --stop_at and at the end."""
    out, T, B, k = C["out"], C["max_steps"], C["batch_size"], C["grad_accum"]
    flops = raw.estimate_flops(B)  # per micro-batch (fwd + bwd)
    model.train()
    t0, n_acc, w0, b0 = time.time(), 0, sampler.wait, (sampler.built, sampler.n_built)
    for step in range(step0, T + 1):
        samp_state = sampler.state_dict()  # before this step's batches: what a checkpoint stores
        last = step == T
        stop = step == C["stop_at"] and step > step0
        if (step % C["eval_every"] == 0 and step > step0) or last:
            vl = evaluate(model, raw, val, batch_of, C, device, step)
        if last or stop or (step % C["save_every"] == 0 and step > step0):
            m = {"step": step, **meta, "val_loss": vl if last else None}
            ckpt.save(out, step, raw, opt, device, {"sampler": samp_state}, lambda sd: model_files(raw, m, sd))
            if rank == 0:
                print0(f"saved {out} at step {step} (se_hash {file_hash(os.path.join(out, 'model.safetensors'))})")
        if last or stop:
            break
        if step > step0 and (step % C["eval_every"] == 0 or step % C["save_every"] == 0):
            # keep eval/save time out of the throughput figures
            t0, n_acc, w0, b0 = time.time(), 0, sampler.wait, (sampler.built, sampler.n_built)
        lrs = lr_at(step, T, peak_lr(C), C["warmup"], C["min_lr_frac"])
        for g in opt.param_groups:
            g["lr"] = lrs
        for micro, b in enumerate(sampler.next()):  # this rank's grad_accum micro-batches
            x, valid, rows, ds, cg = batch_of(b)
            set_sync(model, micro == k - 1)  # gradient reduce after the last micro-step only
            with autocast(device, C["dtype"]):
                # draws seeded by the global micro-batch index: the same at any world size x accumulation
                loss, parts = model(x, valid, rows, (step * world + rank) * k + micro, ds, cg)
            (loss / k).backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), C["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        n_acc += B * k * world
        if step == step0:
            gc.collect()
            gc.freeze()
        if step % C["log_every"] == 0 or step == T - 1:
            lv = loss.item()  # sync point (log steps only)
            if hasattr(gn, "full_tensor"):
                gn = gn.full_tensor()  # DTensor norm (FSDP2): a collective, every rank is here
            t1 = time.time()
            dt = (t1 - t0) / max(1, n_acc / (B * k * world))
            cps = n_acc / max(1e-9, t1 - t0)
            u = mfu(flops * cps / B, 1.0, device, world)  # FLOP/s of all ranks over all ranks' peak
            mfu_s = f" | mfu {100 * u:.1f}%" if u is not None else ""
            eta = (T - step - 1) * dt
            wait, cap = (sampler.wait - w0) / max(1e-9, t1 - t0), sampler.capacity(b0) * B  # as train.py's
            print0(f"step {step}/{T} | loss {lv:.4f} | gene {parts['gene'].item():.4f} | "
                   f"cell {parts['cell'].item():.4f}"
                   + (f" | ds {parts['ds'].item():.3f}" if "ds" in parts else "")
                   + f" | lr {lrs:.2e} | gnorm {gn.item():.2f} | dt {1000 * dt:.0f}ms | data {100 * wait:.0f}% "
                   f"(loader {cap:,.0f} cells/s) | cells/s {cps:,.0f}{mfu_s} | "
                   f"eta {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m{int(eta % 60):02d}s")
            t0, n_acc, w0, b0 = time.time(), 0, sampler.wait, (sampler.built, sampler.n_built)


# ---------------------------------------------------------------------------------------------------
# transform

def _write_uns_group(f, name, d):
    from state.h5ad import _attrs, _write_uns
    if "uns" not in f:
        _attrs(f.create_group("uns"), "dict", "0.1.0")
    if name in f["uns"]:
        del f["uns"][name]
    g = f["uns"].create_group(name)
    _attrs(g, "dict", "0.1.0")
    _write_uns(g, d)


def transform(argv):
    import h5py
    from tqdm import tqdm

    C, _, pos = parse(argv, TRANSFORM)
    if not C["ckpt"] or len(pos) != 1:
        die("usage: embed.py transform --ckpt=RUN_DIR IN.h5ad [--output=OUT.h5ad|OUT.npy]")
    inp = pos[0]
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if C["device"] == "auto" else C["device"])
    if C["threads"] and dev.type == "cpu":
        torch.set_num_threads(C["threads"])
    model, meta = load_model(C["ckpt"], dev)
    D = model.cfg.d_out + (model.cfg.n_ds if model.cfg.ds_token else 0)
    with H5AD(inp) as h:
        n = h.n_obs
        gm = GeneMap(h, model.genes)
    valid = torch.from_numpy(gm.valid()).to(dev)
    cls = torch.tensor([gm.cls_gene()], device=dev)
    info = dict(se_hash=meta["se_hash"], ckpt=os.path.abspath(C["ckpt"]), preset=meta.get("preset", ""),
                width=D, out_dim=model.cfg.d_out, ds_dim=D - model.cfg.d_out, key=C["key"], seed=C["seed"],
                gene_column=gm.column, genes_used=int(len(gm.ids)), genes_in_file=int(gm.n_vars),
                obsm_key=C["obsm_key"])
    o = C["output"]
    npy = o.endswith(".npy")
    if not o and not (os.stat(inp).st_mode & 0o222):  # root ignores permissions: honour the marking
        die(f"{inp} is marked read-only; not writing into it. Use --output=OUT.h5ad "
            "(a copy plus obsm/X_state) or --output=OUT.npy")
    target = output_file(o, [inp, C["ckpt"]], "embed.py transform", "--output") if o else inp
    stale_tmp(target)  # temp files of killed transforms at this path
    # everything is written into a temp file beside the target and renamed over it at the end: a kill, a
    # full disk or an error leaves the user's file as it was (in place too: a copy is written, then
    # switched in) and no partial obsm key that anndata would read as an embedding
    need_space(target, 4 * n * D + (0 if npy else os.path.getsize(inp)) + (1 << 20), "embed.py transform")
    tmp = f"{target}.tmp{os.getpid()}"
    f = None
    try:
        if npy:
            arr = open(tmp, "wb")
            np.lib.format.write_array_header_1_0(arr, {"descr": "<f4", "fortran_order": False, "shape": (n, D)})
        else:
            shutil.copyfile(inp, tmp)  # copy, then add: the source file is never touched
            shutil.copymode(inp, tmp)
            f = h5py.File(tmp, "r+")
            if "obsm" not in f:
                g = f.create_group("obsm")
                g.attrs["encoding-type"], g.attrs["encoding-version"] = "dict", "0.1.0"
            tname = f"_{C['obsm_key']}_tmp"
            if tname in f["obsm"]:
                del f["obsm"][tname]
            arr = f["obsm"].create_dataset(tname, shape=(n, D), dtype=np.float32,
                                           chunks=(max(1, min(n, 4096)), D))
        bs = C["batch_size"]
        with H5AD(inp) as h, torch.no_grad(), autocast(dev, C["dtype"]):
            mat = h.matrix(C["key"])
            ts, kind = None, "any"  # raw counts -> the fit's normalisation (state.scale.recipe_scaling)
            if meta.get("recipe"):  # runs fit on prepared folders record their recipe
                from state.scale import check_rows, classify, normalize_log1p, recipe_scaling, sample_rows
                smp = sample_rows(mat, 10_000, 0)
                try:
                    ts = recipe_scaling(smp, meta["recipe"], f"{inp}: '{C['key']}'", "the SE run")
                except ValueError as err:  # raised, not die(): the temp file is removed on the way out
                    raise UserError(f"embed.py transform: {err}") from None
                kind = "counts" if ts else classify(smp, inp).kind
                if ts:
                    print(f"{inp}: raw counts -> normalised to the fit's target_sum {ts:g} and log1p'd")
            for a in tqdm(range(0, n, bs), total=math.ceil(n / bs), desc=f"X_state {os.path.basename(inp)}",
                          unit="batch", disable=None):
                b = min(a + bs, n)
                xb = mat.block(a, b)
                if meta.get("recipe"):  # every row of the scale the sample showed, not only the sample
                    check_rows(xb, kind if kind in ("counts", "log1p") else "any",
                               f"embed.py transform: {inp}: '{C['key']}'", lambda i, a=a: f"row {a + i}")
                if ts:  # the library size over all of the file's genes, as prepare computed it
                    xb = normalize_log1p(xb, ts)
                x = torch.from_numpy(gm.to_vocab(xb)).to(dev)
                raw = is_raw(torch.from_numpy(xb)).to(dev)  # judged on all the file's genes (reference)
                rows = torch.arange(a, b, device=dev)
                e = model.embed(x, valid.expand(b - a, -1), rows, C["seed"], cls.expand(b - a), raw)
                if npy:
                    arr.write(np.ascontiguousarray(e.float().cpu().numpy(), "<f4").tobytes())
                else:
                    arr[a:b] = e.float().cpu().numpy()
        if npy:
            arr.close()
        else:
            k = C["obsm_key"]
            if k in f["obsm"]:
                del f["obsm"][k]
            f["obsm"].move(tname, k)
            f["obsm"][k].attrs["encoding-type"], f["obsm"][k].attrs["encoding-version"] = "array", "0.2.0"
            _write_uns_group(f, "nanostate_se", info)
            f.close()
            f = None
        os.replace(tmp, target)
    except BaseException:
        if f is not None:
            try:
                f.close()
            except Exception:  # noqa: BLE001 (the file is being removed)
                pass
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if npy:
        with open(o[:-4] + ".json", "w") as jf:
            json.dump(info, jf, indent=1)
    print(f"wrote {target} ({'npy' if npy else 'obsm/' + C['obsm_key']}) {n} x {D}, se_hash {meta['se_hash']}")
    return target


def main(argv=None):
    """The CLI (argv None: this process's own arguments); a user's mistake is one line, exit 2 (a
    library caller gets a SystemExit carrying the line)."""
    return run("embed.py", _main, argv, __doc__)


def _main(argv):
    if not argv or argv[0] not in ("fit", "transform"):
        die(f"embed.py: {'unknown command ' + repr(argv[0]) if argv else 'no command'}; usage: "
            "embed.py fit|transform --key=value ... (embed.py --help)")
    return fit(argv[1:]) if argv[0] == "fit" else transform(argv[1:])


if __name__ == "__main__":
    main()
    from state.dist import quiet_exit
    quiet_exit(0)
