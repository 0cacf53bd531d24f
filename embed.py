"""
SE (State Embedding): pre-train on .h5ad files, then write obsm['X_state'] (SPEC 7, 8).

Pre-training (fit), one or many files, genes aligned by upper-case symbol across files:
    CPU:      python embed.py fit a.h5ad b.h5ad --out=runs/se_tiny --preset=tiny --max_steps=300
    1 GPU:    python embed.py fit a.h5ad b.h5ad --out=runs/se --preset=default --gene_emb=esm2.pt
    N GPUs:   torchrun --standalone --nproc_per_node=8 embed.py fit *.h5ad --out=runs/se --preset=default
    resume:   python embed.py fit a.h5ad b.h5ad --out=runs/se_tiny --resume   (same args; exact replay)
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
A checkpoint is model.safetensors (weights + frozen gene table) + meta.json + state.pt (optimizer,
step, data cursor), committed together (state/ckpt.py: `ckpt-<step>/` behind the `ckpt` link).
"""

import contextlib
import gc
import json
import math
import os
import shutil
import sys
import time
from dataclasses import MISSING, fields

import numpy as np
import torch

from state import ckpt
from state.config import configure
from state.dist import all_reduce_sum, compute_cleanup, compute_init, mfu, print0
from state.h5ad import H5AD
from state.se import (PRESETS, GeneMap, SEConfig, StateEmbedding, file_hash, load_gene_vectors,
                      load_model, norm_gene, pca_gene_vectors, save_model)

# ---------------------------------------------------------------------------------------------------
# settings


FIT = dict(
    out="runs/se",            # run directory
    preset="tiny",            # SE preset: tiny | default | se600m
    gene_emb="pca",           # FILE | pca | onehot
    pca_dim=256,              # width of the pca fallback
    pca_cells=200_000,        # cells sampled for the pca fallback
    key="X",                  # matrix: X | layers/counts | raw/X
    ds_col="",                # obs column giving the dataset label; "" = one label per file
    batch_size=128,           # cells per step per process (per micro-step)
    grad_accum=1,             # micro-steps per optimizer step
    max_steps=1000,
    lr=-1.0,                  # peak lr; -1 = preset default (tiny 1e-3, others 1e-5 as the reference)
    wd=0.01,
    warmup=0.03,              # warmup fraction of max_steps (from 0.33*lr)
    min_lr_frac=0.3,          # cosine floor as a fraction of lr
    clip=0.8,
    dtype="auto",             # auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float32
    block=1024,               # rows read per h5ad block
    mix=8,                    # blocks shuffled together (memory: mix*block*genes floats)
    val_cells=256,            # held-out cells per file for the validation loss
    eval_every=200,
    save_every=500,
    log_every=10,
    seed=0,
    resume=False,
    stop_at=-1,               # save and exit after this step (a time slot); --resume continues exactly
    compile=False,
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
        raise SystemExit(f"embed.py: {e}")
    return cfg, {k: mdef[k] for k in seen if k in mdef}, pos


def autocast(device, dtype):
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


# ---------------------------------------------------------------------------------------------------
# streaming cells: shuffled row blocks mixed across files

class CellStream:
    """Infinite stream of global batches (B * world cells) from row blocks of several files.

    An epoch shuffles every file's blocks together (seed + epoch); consecutive blocks are gathered
    into groups of >= max(mix * block, global batch) rows, whose rows are permuted (seed, epoch,
    group) and cut into batches (a tail < one global batch is dropped). The state is
    (epoch, group, batch), so a resumed run reads the same cells in the same order."""

    def __init__(self, mats, train, B, world=1, rank=0, seed=0, block=1024, mix=8):
        self.mats, self.train, self.B, self.world, self.rank = mats, train, B, world, rank
        self.seed, self.block, self.mix = seed, block, mix
        n_train = sum(int(t.sum()) for t in train)
        if n_train < B * world:
            raise SystemExit(f"only {n_train} training cells for a global batch of {B * world}")
        self.epoch, self.g, self.i = 0, 0, 0
        self._plan = self._cache = None

    def plan(self, epoch):
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        blocks = [(f, a, min(a + self.block, m.shape[0])) for f, m in enumerate(self.mats)
                  for a in range(0, m.shape[0], self.block)]
        rng = np.random.default_rng([self.seed, epoch])
        blocks = [blocks[j] for j in rng.permutation(len(blocks))]
        groups, cur, n = [], [], 0
        need = max(self.mix * self.block, self.B * self.world)
        for f, a, b in blocks:
            cur.append((f, a, b))
            n += int(self.train[f][a:b].sum())
            if n >= need:
                groups.append(cur)
                cur, n = [], 0
        if cur:
            groups.append(cur)
        self._plan = (epoch, groups)
        return groups

    def group(self, epoch, g):
        """-> list of (file, local rows (n,), x (n, G_file)) and the permuted (slot, row) order."""
        if self._cache is not None and self._cache[0] == (epoch, g):
            return self._cache[1]
        parts = []
        for f, a, b in self.plan(epoch)[g]:
            keep = np.flatnonzero(self.train[f][a:b])
            if len(keep):
                x = self.mats[f].block(a, b)[keep]
                parts.append((f, a + keep, x))
        slot = np.concatenate([np.full(len(p[1]), s) for s, p in enumerate(parts)]) if parts else np.zeros(0, int)
        pos = np.concatenate([np.arange(len(p[1])) for p in parts]) if parts else np.zeros(0, int)
        o = np.random.default_rng([self.seed, epoch, g, 7]).permutation(len(slot))
        out = (parts, slot[o], pos[o])
        self._cache = ((epoch, g), out)
        return out

    def next(self):
        """-> this rank's cells: list of (file, local rows, x rows) (one entry per file present)."""
        GB = self.B * self.world
        while True:
            groups = self.plan(self.epoch)
            if self.g >= len(groups):
                self.epoch, self.g, self.i = self.epoch + 1, 0, 0
                continue
            parts, slot, pos = self.group(self.epoch, self.g)
            if (self.i + 1) * GB > len(slot):
                self.g, self.i = self.g + 1, 0
                continue
            a = self.i * GB + self.rank * self.B
            s, p = slot[a:a + self.B], pos[a:a + self.B]
            self.i += 1
            out = []
            for k in np.unique(s):
                sel = p[s == k]
                f, rows, x = parts[k]
                out.append((f, rows[sel], x[sel]))
            return out

    def state_dict(self):
        return {"epoch": self.epoch, "g": self.g, "i": self.i}

    def load_state_dict(self, d):
        self.epoch, self.g, self.i = d["epoch"], d["g"], d["i"]


def to_batch(cells, maps, offs, labels, cls_of, masks, device):
    """Stream cells -> model inputs on device: x (B, V), valid (B, V), rows (B,) global ids,
    ds (B,) dataset labels, cls (B,) vocab row whose count CLS gets."""
    xs, fs, rows, ds = [], [], [], []
    for f, r, x in cells:
        xs.append(maps[f].to_vocab(x))
        fs.append(np.full(len(r), f))
        rows.append(r + offs[f])
        ds.append(labels[f][r])
    f = torch.from_numpy(np.concatenate(fs)).to(device)
    x = torch.from_numpy(np.concatenate(xs)).to(device, non_blocking=True)
    return (x, masks[f], torch.from_numpy(np.concatenate(rows)).to(device),
            torch.from_numpy(np.concatenate(ds)).long().to(device), cls_of[f])


def lr_at(step, T, lr, warmup, floor):
    """3% linear warmup from 0.33*lr, then cosine to floor*lr at step T (SPEC 7)."""
    w = max(1, math.ceil(warmup * T))
    if step < w:
        return lr * (0.33 + 0.67 * step / w)
    t = min(1.0, (step - w) / max(1, T - w))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


# ---------------------------------------------------------------------------------------------------
# fit

def fit(argv):
    C, mkw, files = parse(argv, FIT, model=True)
    if not files:
        raise SystemExit("embed.py fit: give one or more .h5ad files")
    ddp, rank, local_rank, world, device = compute_init(seed=C["seed"])
    if C["threads"] and device.type == "cpu":
        torch.set_num_threads(C["threads"])
    master = rank == 0
    out = C["out"]
    if os.path.isdir(out) and os.listdir(out) and not C["resume"]:
        raise SystemExit(f"embed.py fit: run directory {out} exists and is not empty; pass --resume to continue "
                         "it or choose another --out")
    ck = ckpt.latest(out) if C["resume"] else None  # the last committed checkpoint (one step throughout)
    if C["resume"] and ck is None:
        if not (os.path.isdir(out) and ckpt.leftovers_only(out)):
            raise SystemExit(f"embed.py fit: --resume but {out} holds no committed checkpoint")
        print0(f"note: --resume: {out} holds no committed checkpoint: starting at step 0")
        if master:
            ckpt.clear(out)
        C["resume"] = False
    if C["resume"] and json.load(open(os.path.join(ck, "meta.json"))).get("preset") is None:
        raise SystemExit(f"embed.py fit: {out} is not an SE run (its meta.json has no SE preset)")
    os.makedirs(out, exist_ok=True)
    print0(f"fit config: {json.dumps(C)} model overrides: {mkw}")
    resume = C["resume"]

    # --- data: files, gene vocabulary, gene vectors
    h5s = [H5AD(p) for p in files]
    mats = [h.matrix(C["key"]) for h in h5s]
    meta_old = json.load(open(os.path.join(ck, "meta.json"))) if resume else None
    if resume:
        genes = meta_old["genes"]
        emb = None  # restored from model.safetensors
        src = meta_old["gene_emb"]
    elif C["gene_emb"] in ("pca", "onehot"):
        genes, seen = [], set()  # union of the training genes, first-seen order, upper-case
        for h in h5s:
            for g in h.var_names():
                g = norm_gene(g)
                if g not in seen:
                    seen.add(g)
                    genes.append(g)
        src = {"kind": C["gene_emb"]}
    else:
        genes, emb = load_gene_vectors(C["gene_emb"])
        src = {"kind": "file", "path": os.path.abspath(C["gene_emb"]), "hash": file_hash(C["gene_emb"])}
        print0(f"gene vectors: {len(genes)} x {emb.shape[1]} from {C['gene_emb']}")
    maps = [GeneMap(h, genes, quiet=not master) for h in h5s]
    V = len(genes)
    if not resume and C["gene_emb"] == "onehot":
        emb = torch.eye(V)
        print0(f"WARNING: gene_emb=onehot: a {V} x {V} identity table (reference fallback); no prior")
    if not resume and C["gene_emb"] == "pca":
        t0 = time.time()
        emb = pca_gene_vectors(list(zip(mats, maps)), V, k=C["pca_dim"], max_cells=C["pca_cells"],
                               seed=C["seed"])
        print0(f"WARNING: gene_emb=pca: {emb.shape[1]} right singular vectors of the centred log1p "
               f"training matrix ({time.time() - t0:.1f}s). They carry no protein prior, cover only the "
               f"{V} training genes, and are not comparable with ESM2-based SE embeddings.")

    # dataset labels: one per file, or an obs column (vocabulary across files)
    if C["ds_col"]:
        cols = [np.asarray([str(v) for v in h.column(C["ds_col"])]) for h in h5s]
        ds_names = sorted(set(np.concatenate(cols).tolist()))
        lut = {n: i for i, n in enumerate(ds_names)}
        labels = [np.asarray([lut[v] for v in c], np.int64) for c in cols]
    else:
        ds_names = [os.path.basename(p) for p in files]
        labels = [np.full(m.shape[0], f, np.int64) for f, m in enumerate(mats)]

    # validation cells: a seeded random subset of each file, never trained on
    train, val = [], []
    for f, m in enumerate(mats):
        n = m.shape[0]
        nv = min(C["val_cells"], n // 10)
        v = np.sort(np.random.default_rng([C["seed"], f, 99]).choice(n, nv, replace=False))
        t = np.ones(n, bool)
        t[v] = False
        train.append(t)
        val.append(v)
    offs = np.cumsum([0] + [m.shape[0] for m in mats])
    print0(f"data: {len(files)} files, {offs[-1]} cells ({sum(len(v) for v in val)} held out), "
           f"{V} genes in the vocabulary, {len(ds_names)} dataset labels")

    # --- model
    lr = C["lr"] if C["lr"] > 0 else (1e-3 if C["preset"] == "tiny" else 1e-5)
    if resume:
        mc = {{"d": "d_model", "out": "d_out"}.get(k, k): v for k, v in meta_old["config"].items() if k != "k"}
        cfg = SEConfig(**mc)
        from safetensors.torch import load_file
        sd = load_file(os.path.join(ck, "model.safetensors"))
        model = StateEmbedding(cfg, sd["emb"], genes)
        model.load_state_dict(sd)
    else:
        cfg = SEConfig.from_name(C["preset"], n_datasets=len(ds_names), **mkw)
        model = StateEmbedding(cfg, emb, genes)
    model.to(device)
    raw = model
    print0(f"SE {C['preset']}: {model.num_params() / 1e6:.2f}M params, L={cfg.pad_length + cfg.ds_token}, "
           f"E={cfg.E}, lr {lr:g}")
    opt = model.configure_optimizer(lr, C["wd"])
    if C["compile"]:
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    masks = torch.from_numpy(np.stack([m.valid() for m in maps])).to(device)  # (F, V)
    cls_of = torch.tensor([m.cls_gene() for m in maps], device=device)  # (F,)

    stream = CellStream(mats, train, C["batch_size"], world, rank, C["seed"], C["block"], C["mix"])
    step0 = 0
    if resume:
        from state.dist import load_state
        st = load_state(os.path.join(ck, "state.pt"))
        if st["step"] != meta_old["step"]:  # a crash between the two atomic writes
            raise SystemExit(f"{out}: model.safetensors/meta.json are at step {meta_old['step']} but state.pt "
                             f"at step {st['step']}; cannot resume exactly")
        opt.load_state_dict(st["opt"])
        if len(st["ranks"]) != world:
            raise SystemExit(f"{out}/state.pt was written by {len(st['ranks'])} processes; resume with as many")
        mine = st["ranks"][rank]  # per-rank data cursor and RNG (dropout) state
        stream.load_state_dict(mine["stream"])
        torch.set_rng_state(mine["rng"])
        if device.type == "cuda" and mine.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(mine["cuda_rng"])
        step0 = st["step"]
        print0(f"resumed from {out} at step {step0}")

    val_batch = [(f, v, mats[f].rows(v)) for f, v in enumerate(val) if len(v)]

    def evaluate(step):
        """Validation loss on the held-out cells (eval mode, draws seeded by the cell ids)."""
        model.eval()
        tot, n = {}, 0
        with torch.no_grad(), autocast(device, C["dtype"]):
            for f, v, x in val_batch:
                for a in range(0, len(v), C["batch_size"]):
                    b = to_batch([(f, v[a:a + C["batch_size"]], x[a:a + C["batch_size"]])], maps, offs,
                                 labels, cls_of, masks, device)
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

    def save(step, val_loss=None):
        # the cursor before the prefetched batch (resume re-reads it) and the RNG, of every rank
        mine = dict(stream={k: int(v) for k, v in cursor.items()}, rng=torch.get_rng_state(),
                    cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        ranks = [mine]
        if ddp:
            import torch.distributed as dist
            ranks = [None] * world
            dist.all_gather_object(ranks, mine)
        if not master:
            return
        meta = dict(step=step, preset=C["preset"], fit=C, files=[os.path.abspath(p) for p in files],
                    gene_emb=src, datasets=ds_names, ds_col=C["ds_col"], key=C["key"], val_loss=val_loss,
                    torch=torch.__version__)
        d = ckpt.begin(out, step)  # one commit: weights, meta and state of this step together
        h = save_model(raw, d, meta)
        ckpt._done()
        st = dict(step=step, opt=opt.state_dict(), ranks=ranks)
        ckpt.write(os.path.join(d, "state.pt"), lambda p: torch.save(st, p))
        ckpt.commit(out, step)
        print0(f"saved {out} at step {step} (se_hash {h})")

    # --- loop
    flops = raw.estimate_flops(C["batch_size"])  # per micro-batch (fwd + bwd)
    T = C["max_steps"]
    B = C["batch_size"]
    model.train()
    t0, dt_acc, n_acc = time.time(), 0.0, 0
    cursor = stream.state_dict()
    cells = stream.next()
    for step in range(step0, T + 1):
        last = step == T
        stop = step == C["stop_at"] and step > step0
        if (step % C["eval_every"] == 0 and step > step0) or last:
            vl = evaluate(step)
        if last or stop or (step % C["save_every"] == 0 and step > step0):
            save(step, vl if last else None)
        if last or stop:
            break
        if step > step0 and (step % C["eval_every"] == 0 or step % C["save_every"] == 0):
            t0, n_acc = time.time(), 0  # keep eval/save time out of the throughput figures
        lrs = lr_at(step, T, lr, C["warmup"], C["min_lr_frac"])
        for g in opt.param_groups:
            g["lr"] = lrs
        for micro in range(C["grad_accum"]):
            x, valid, rows, ds, cg = to_batch(cells, maps, offs, labels, cls_of, masks, device)
            if ddp:
                model.require_backward_grad_sync = micro == C["grad_accum"] - 1
            with autocast(device, C["dtype"]):
                loss, parts = model(x, valid, rows, step * C["grad_accum"] + micro, ds, cg)
            cursor = stream.state_dict()
            cells = stream.next()  # read the next batch while the device works
            (loss / C["grad_accum"]).backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), C["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        n_acc += B * C["grad_accum"] * world
        if step == step0:
            gc.collect()
            gc.freeze()
        if step % C["log_every"] == 0 or step == T - 1:
            lv = loss.item()  # sync point (log steps only)
            t1 = time.time()
            dt = (t1 - t0) / max(1, n_acc / (B * C["grad_accum"] * world))
            cps = n_acc / max(1e-9, t1 - t0)
            u = mfu(flops * cps / B, 1.0, device, world)  # FLOP/s of all ranks over all ranks' peak
            mfu_s = f" | mfu {100 * u:.1f}%" if u is not None else ""
            eta = (T - step - 1) * dt
            print0(f"step {step}/{T} | loss {lv:.4f} | gene {parts['gene'].item():.4f} | "
                   f"cell {parts['cell'].item():.4f}"
                   + (f" | ds {parts['ds'].item():.3f}" if "ds" in parts else "")
                   + f" | lr {lrs:.2e} | gnorm {gn.item():.2f} | dt {1000 * dt:.0f}ms | "
                   f"cells/s {cps:,.0f}{mfu_s} | eta {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m{int(eta % 60):02d}s")
            t0, n_acc = time.time(), 0
    for h in h5s:
        h.close()
    compute_cleanup()


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
        raise SystemExit("usage: embed.py transform --ckpt=RUN_DIR IN.h5ad [--output=OUT.h5ad|OUT.npy]")
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
        raise SystemExit(f"{inp} is marked read-only; not writing into it. Use --output=OUT.h5ad "
                         "(a copy plus obsm/X_state) or --output=OUT.npy")
    target = o if o else inp
    tmp = f"{target}.tmp{os.getpid()}"
    if o and not npy:
        shutil.copyfile(inp, tmp)  # copy, then add: the source file is never touched
    if npy:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, D))
    else:
        try:
            f = h5py.File(tmp if o else inp, "r+")
        except OSError as e:
            raise SystemExit(f"{inp}: cannot open for writing ({e}); write a copy with "
                             "--output=OUT.h5ad or --output=OUT.npy") from None
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
        for a in tqdm(range(0, n, bs), total=math.ceil(n / bs), desc=f"X_state {os.path.basename(inp)}",
                      unit="batch", disable=None):
            b = min(a + bs, n)
            x = torch.from_numpy(gm.to_vocab(mat.block(a, b))).to(dev)
            rows = torch.arange(a, b, device=dev)
            e = model.embed(x, valid.expand(b - a, -1), rows, C["seed"], cls.expand(b - a))
            arr[a:b] = e.float().cpu().numpy()
    if npy:
        arr.flush()
        del arr
        os.replace(tmp, o)
        json.dump(info, open(o[:-4] + ".json", "w"), indent=1)
    else:
        k = C["obsm_key"]
        if k in f["obsm"]:
            del f["obsm"][k]
        f["obsm"].move(tname, k)
        f["obsm"][k].attrs["encoding-type"], f["obsm"][k].attrs["encoding-version"] = "array", "0.2.0"
        _write_uns_group(f, "nanostate_se", info)
        f.close()
        if o:
            os.replace(tmp, o)
    print(f"wrote {target} ({'npy' if npy else 'obsm/' + C['obsm_key']}) {n} x {D}, se_hash {meta['se_hash']}")
    return target


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("fit", "transform"):
        print(__doc__)
        raise SystemExit("usage: embed.py fit|transform ...")
    return fit(argv[1:]) if argv[0] == "fit" else transform(argv[1:])


if __name__ == "__main__":
    main()
    from state.dist import quiet_exit
    quiet_exit(0)
