"""
SE (State Embedding): a transformer that turns one cell into an embedding (SPEC 8).

A cell becomes a *sentence*: a learnable CLS vector, the cell's top-k expressed genes (each token a
frozen gene vector, e.g. ESM2, plus a soft-binned expression embedding) and a learnable dataset
token, so L = 1 + k + 1. After a post-norm encoder (`norm="pre"` for the paper's layout) the CLS
output gives the cell embedding z = L2norm(dec[:, 0]) (d_out wide; "out" in shape comments) and the dataset token gives the
dataset embedding ds = Linear(dec[:, -1]) (10-d); obsm['X_state'] = [z | ds].

Training (embed.py fit): an expression decoder reads [enc(g), z, rda, ds] for sampled task genes
(P expressed, N unexpressed per cell, S shared across the batch) and predicts log1p expression.
Losses (reference TabularLoss, unsquared norms = energy distance with one sample per side):
    gene = mean_c || yhat_c - y_c ||_2   over the P+N+S task genes of cell c
    cell = mean_g || yhat_g - y_g ||_2   over the B cells, for each of the S shared genes
    total = gene + cell + CE(dataset classifier(dec[:, -1]), dataset label)

Gene vectors (SPEC 8.1), in order of preference: a user {gene: vector} file (.safetensors, .pt,
.npz); `pca` (top right singular vectors of the centred log1p training matrix, seeded randomized SVD
on <= 200k cells, frozen, saved in the checkpoint; they carry no protein prior); `onehot`.

The frozen table `emb` (V, E) is a buffer of the model, so a checkpoint is self-contained; a cell is
given to the model in *vocabulary space*: x (B, V) log1p values and valid (B, V), the genes its file
measured that have a vector. `GeneMap` builds that mapping for one file.
"""

import hashlib
import math
import os
import re
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import attention
from state.errors import UserError


# ----------------------------------------------------------------------------------------------------
# config

@dataclass
class SEConfig:
    d_model: int = 512        # model width
    ff: int = 1024            # feed-forward hidden width
    n_head: int = 16          # attention heads (head dim d / n_head)
    n_layer: int = 8          # encoder layers
    d_out: int = 512          # output_dim: cell-embedding width (X_state = d_out + n_ds)
    n_ds: int = 10            # dataset-embedding width (reference hard-codes 10)
    pad_length: int = 2048    # CLS + top (pad_length - 1) genes; + dataset token => L = pad_length + 1
    n_bins: int = 10          # soft expression bins of count_emb
    count_hidden: int = 512   # hidden width of the count encoder Linear(1, h) -> LeakyReLU -> Linear(h, bins)
    dropout: float = 0.1      # residual/FF dropout in training (attention-probability dropout is not used)
    norm: str = "post"        # "post" (reference, SE-600M layout) | "pre" (paper)
    cls_count: str = "ref"    # "ref": CLS gets the count of the file's 4th valid gene (reference quirk) | "zero"
    ds_token: bool = True     # dataset_correction: append a dataset token, export ds, dataset CE loss
    n_datasets: int = 1       # classes of the dataset classifier (set from the training files)
    P: int = 512              # expressed task genes per cell
    N: int = 512              # unexpressed (log value < 1) task genes per cell
    S: int = 512              # task genes shared by the whole batch (targets 0 where not measured)
    rda_infer: float = 4.0    # rda value fed to the expression decoder at inference
    E: int = 0                # gene-vector width (set from the gene table)

    def __post_init__(self):
        bad = [f"{k}={getattr(self, k)!r} (needs {rule})" for k, ok, rule in (
            ("d_model", self.d_model >= 1, ">= 1"), ("n_head", self.n_head >= 1, ">= 1"),
            ("n_layer", self.n_layer >= 0, ">= 0"), ("ff", self.ff >= 1, ">= 1"), ("d_out", self.d_out >= 1, ">= 1"),
            ("n_ds", self.n_ds >= 1, ">= 1"), ("n_bins", self.n_bins >= 1, ">= 1"),
            ("count_hidden", self.count_hidden >= 1, ">= 1"), ("n_datasets", self.n_datasets >= 1, ">= 1"),
            ("pad_length", self.pad_length >= 2, ">= 2"), ("dropout", 0 <= self.dropout < 1, "0 <= p < 1"),
            ("norm", self.norm in ("post", "pre"), "post or pre"), ("cls_count", self.cls_count in ("ref", "zero"),
                                                                    "ref or zero"),
            ("P", self.P >= 0, ">= 0"), ("N", self.N >= 0, ">= 0"), ("S", self.S >= 0, ">= 0"))
            if not ok]
        if not bad and self.d_model % self.n_head:
            bad.append(f"d_model={self.d_model} with n_head={self.n_head} (d_model must divide by n_head)")
        if bad:
            raise UserError(f"SE model settings out of range: {'; '.join(bad)}")
        self.k = self.pad_length - 1  # genes per sentence

    @classmethod
    def from_name(cls, name, **kw):
        if name not in PRESETS:
            raise UserError(f"unknown SE preset '{name}'; choose from {', '.join(PRESETS)}")
        c = dict(PRESETS[name])
        c.update(kw)
        return cls(**c)

    def to_dict(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}


PRESETS = {
    # seconds on a laptop CPU; what the tests and the CPU evaluation in dev/LOG.md use
    "tiny": dict(d_model=64, ff=128, n_head=4, n_layer=2, d_out=64, pad_length=128, count_hidden=64,
                 P=32, N=32, S=32),
    # reference arc-state `state-defaults.yaml`
    "default": dict(d_model=512, ff=1024, n_head=16, n_layer=8, d_out=512, pad_length=2048, P=512, N=512, S=512),
    # the released SE-600M: output 2048 certain, d_model 2048 / FF 4096 inferred (SPEC 8.2)
    "se600m": dict(d_model=2048, ff=4096, n_head=16, n_layer=16, d_out=2048, pad_length=2048,
                   P=512, N=512, S=512),
}


# ----------------------------------------------------------------------------------------------------
# gene names and gene vectors

def norm_gene(s):
    """Upper-case symbol, Ensembl version suffix stripped (ENSG00000141510.16 -> ENSG00000141510)."""
    s = str(s).strip().upper()
    return re.sub(r"^(ENS[A-Z]*G\d+)\.\d+$", r"\1", s)


def load_gene_vectors(path):
    """A {gene: vector} file (state.perts.read_vectors: .safetensors, .pt, .npz, .tsv, every entry checked)
    -> (names (upper-case, file order; of symbols alike but for case the first), (V, E) float32). Row order
    = the file's insertion order (the reference's checkpoints depend on it)."""
    from state.perts import read_vectors
    if not os.path.exists(str(path)):
        raise FileNotFoundError(f"gene embedding file {path} not found (give a {{gene: vector}} "
                                ".safetensors/.pt/.npz file, or gene_emb=pca / onehot)")
    d = {}
    for k, v in read_vectors(path)[0].items():
        d.setdefault(norm_gene(k), v)
    return list(d), torch.stack(list(d.values()))


def file_hash(path, n=16):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()[:n]


class GeneMap:
    """Maps one .h5ad's (or one prepared folder's) genes onto the vocabulary: for a file, the var column
    (index or a string column) with the largest overlap is used; symbols upper-cased. `cols` (n,) local
    columns, `ids` (n,) vocab rows."""

    def __init__(self, h5, vocab, quiet=False):
        lut = vocab if isinstance(vocab, dict) else {g: i for i, g in enumerate(vocab)}
        best = None
        if hasattr(h5, "genes"):  # a prepared folder (state.data.Prepared): its ordered gene list
            cands, path = [("genes", np.asarray(h5.genes, dtype=object))], str(h5.dir)
        else:
            cands, path = [("index", h5.var_names())], h5.path
            for c in h5.columns("var"):
                try:
                    v = h5.column(c, "var")
                except Exception:
                    continue
                if v.dtype.kind == "O":
                    cands.append((c, v))
        for name, vals in cands:
            up = [norm_gene(x) if x is not None else "" for x in vals]
            hit = sum(u in lut for u in up)
            if best is None or hit > best[2]:
                best = (name, up, hit)
        name, up, hit = best
        self.column, self.n_vars = name, len(up)
        cols, ids, seen = [], [], set()
        for j, u in enumerate(up):
            i = lut.get(u, -1)
            if i >= 0 and i not in seen:  # a duplicated symbol maps once (first column)
                seen.add(i)
                cols.append(j)
                ids.append(i)
        self.cols = np.asarray(cols, np.int64)
        self.ids = np.asarray(ids, np.int64)
        self.V = len(lut)
        if len(self.ids) == 0:
            raise UserError(f"{path}: none of its {len(up)} genes (best var column '{name}') is in the "
                             f"SE vocabulary of {self.V} genes (e.g. {up[:3]}). Mouse symbols do not match "
                             "a human vocabulary; convert them to human orthologues first.")
        self.coverage = len(self.ids) / max(1, len(up))
        if not quiet:
            print(f"{os.path.basename(path)}: genes from var '{name}': {len(self.ids)}/{len(up)} "
                  f"in the SE vocabulary ({100 * self.coverage:.1f}%)")

    def to_vocab(self, xb):
        """(n, n_vars) local rows -> (n, V) vocab-space rows (zeros where not measured)."""
        out = np.zeros((xb.shape[0], self.V), np.float32)
        out[:, self.ids] = xb[:, self.cols]
        return out

    def valid(self):
        m = np.zeros(self.V, bool)
        m[self.ids] = True
        return m

    def cls_gene(self):
        """Vocab row of the file's 4th valid gene (local order): the reference gives CLS its count."""
        return int(self.ids[min(3, len(self.ids) - 1)])  # cols ascend, so ids follow local order


def is_raw(x):
    """Per cell (SPEC 8.2): raw counts when max > 35 or sum expm1 > 5e6. x (B, G) -> (B,) bool. The reference
    judges a cell on all of its file's genes, so transform calls this on the file's rows."""
    x = x.clamp_min(0)
    return (x.amax(1) > 35) | (torch.expm1(x.clamp_max(80)).sum(1) > 5e6)


def to_log1p(x, raw=None):
    """Per cell: ReLU; raw counts (is_raw(x), or the given (B,) `raw`) get log1p. x (B, G)."""
    x = x.clamp_min(0)
    raw = is_raw(x) if raw is None else raw
    return torch.where(raw[:, None], torch.log1p(x), x)


def pca_gene_vectors(sources, V, k=256, max_cells=200_000, seed=0, iters=4, block=4096):
    """Top-k right singular vectors of the centred log1p matrix (cells x V vocab genes) -> (V, k).

    `sources`: list of (Matrix, GeneMap). Seeded randomized SVD streamed over <= max_cells sampled
    rows (memory O(V * (k + 10)) + one block): range finder with `iters` power passes on X^T X."""
    rng = np.random.default_rng(seed)
    n_tot = sum(m.shape[0] for m, _ in sources)
    take = min(n_tot, max_cells)
    pick = np.sort(rng.choice(n_tot, size=take, replace=False))  # global row ids
    offs = np.cumsum([0] + [m.shape[0] for m, _ in sources])

    def blocks():
        for f, (m, gm) in enumerate(sources):
            rows = pick[(pick >= offs[f]) & (pick < offs[f + 1])] - offs[f]
            ok = torch.from_numpy(gm.valid()).double()  # (V,) genes this file measured
            for a in range(0, len(rows), block):
                xb = torch.from_numpy(gm.to_vocab(m.rows(rows[a:a + block])))
                yield to_log1p(xb).double(), ok  # (n, V), (V,)

    # a gene a file did not measure is missing, not zero: centre each gene over the cells that
    # measured it and give missing entries the mean (0 after centring), so that PCs do not just
    # encode which file (gene panel) a cell came from
    mu = torch.zeros(V, dtype=torch.float64)
    n_g = torch.zeros(V, dtype=torch.float64)
    for xb, ok in blocks():
        mu += xb.sum(0)
        n_g += ok * xb.shape[0]
    mu /= n_g.clamp_min(1)
    l = min(k + 10, V, take)
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(V, l, generator=g, dtype=torch.float64))[0]  # (V, l)
    for _ in range(iters):
        Z = torch.zeros(V, l, dtype=torch.float64)
        for xb, ok in blocks():
            xc = (xb - mu) * ok
            Z += xc.T @ (xc @ Q)  # (V, l): X^T X Q, one streamed pass
        Q = torch.linalg.qr(Z)[0]
    M = torch.zeros(l, l, dtype=torch.float64)
    for xb, ok in blocks():
        y = ((xb - mu) * ok) @ Q  # (n, l)
        M += y.T @ y
    ev, U = torch.linalg.eigh(M)  # ascending
    U = U[:, torch.argsort(ev, descending=True)]
    Vt = (Q @ U)[:, :min(k, l)]  # (V, k) right singular vectors
    Vt = Vt * torch.sign(Vt.sum(0, keepdim=True) + 1e-12)  # deterministic sign
    return Vt.float().contiguous()


# ----------------------------------------------------------------------------------------------------
# tokenisation and task genes (vectorised, on device)

_M32 = 0xFFFFFFFF


def hrand(rows, n, salt):
    """(B, n) uniforms in [0, 1) from a counter-based hash of (cell id, column, salt).

    The same cell gets the same numbers in any batch and on any device, so embeddings do not depend
    on the batch size, and a resumed run replays the same draws without generator state."""
    rows = rows.to(torch.int64).reshape(-1, 1) & 0x7FFFFFFF
    c = torch.arange(n, device=rows.device, dtype=torch.int64)[None, :]
    s = int(salt) & 0x7FFFFFFF
    h = (rows * 0x9E3779B1 + c * 0x45D9F3B + s * 0x27D4EB2F + 0x6A09E667) & _M32  # < 2^63: no int64 overflow
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x4C6CA68B) & _M32
    h = h ^ (h >> 16)
    return (h >> 8).to(torch.float32) / float(1 << 24)


def tokenize(x, valid, k, rows, salt=0, cls_gene=None, cls_count="ref"):
    """Cell sentences. x (B, V) log1p, valid (B, V) bool, rows (B,) cell ids -> ids (B, k) vocab
    rows, cnt (B, 1 + k).

    Genes ranked by expression (ties, zeros included, broken by a seeded shuffle); with fewer than k
    valid genes: the expressed genes first, then unexpressed ones sampled with replacement.
    cnt = 100 * w_g with w = x / sum(x) over valid genes; slot 0 is the CLS count."""
    B, V = x.shape
    dev = x.device
    perm = hrand(rows, V, 4 * salt).argsort(1)  # (B, V) random order: the tie-break
    key = torch.where(valid, x, torch.full_like(x, -1.0))  # unmeasured genes rank last
    srt = torch.sort(key.gather(1, perm), dim=1, descending=True, stable=True)[1]
    ranked = perm.gather(1, srt)  # (B, V) genes by expression, ties in shuffled order
    n_val = valid.sum(1)  # (B,)
    n_exp = ((x > 0) & valid).sum(1)
    j = torch.arange(k, device=dev)
    take = ranked.gather(1, j.clamp_max(V - 1).expand(B, k))
    # pool for padding: the unexpressed valid genes, or every valid gene when none is unexpressed
    lo = torch.where(n_val > n_exp, n_exp, torch.zeros_like(n_exp))  # (B,)
    u = hrand(rows, k, 4 * salt + 1)
    pad = ranked.gather(1, (lo[:, None] + (u * (n_val - lo)[:, None]).long()).clamp_max(V - 1))
    need = (n_val < k)[:, None] & (j[None, :] >= n_exp[:, None])
    ids = torch.where(need, pad, take)  # (B, k)
    xs = torch.where(valid, x, torch.zeros_like(x))
    tot = xs.sum(1, keepdim=True)
    w = torch.where(tot > 0, xs / tot.clamp_min(1e-12), valid.float() / n_val.clamp_min(1)[:, None])
    cnt = 100 * w.gather(1, ids)  # (B, k)
    if cls_count == "ref" and cls_gene is not None:
        c0 = 100 * w.gather(1, cls_gene.reshape(B, 1))
    else:
        c0 = torch.zeros(B, 1, device=dev)
    return ids, torch.cat([c0, cnt], 1)


def _sample(mask, n, u_order, u_pick):
    """n vocab rows per cell from `mask` (B, V): without replacement if enough, else with (B, n)."""
    B, V = mask.shape
    order = torch.where(mask, u_order, u_order + 2).argsort(1)  # masked genes first, random order
    cnt = mask.sum(1, keepdim=True)  # (B, 1)
    j = torch.arange(n, device=mask.device).expand(B, n)
    pos = torch.where(cnt >= n, j, (u_pick * cnt).long())
    return order.gather(1, pos.clamp_max(V - 1))


def task_genes(x, valid, P, N, S, rows, salt=0):
    """Task genes and targets: P expressed + N unexpressed (log < 1) per cell, S shared by the batch.
    -> genes (B, P+N+S) vocab rows, y (B, P+N+S) log1p targets (0 where a gene was not measured)."""
    B, V = x.shape
    s = 8 * salt
    ge = _sample((x > 0) & valid, P, hrand(rows, V, s), hrand(rows, P, s + 1))
    gu = _sample((x < 1) & valid, N, hrand(rows, V, s + 2), hrand(rows, N, s + 3))
    anyv = valid.any(0)  # genes measured by some cell of the batch
    r = hrand(torch.zeros(1, dtype=torch.int64, device=x.device), V, s + 4)[0]
    gs = torch.where(anyv, r, r + 2).argsort()  # shared genes: measured ones first
    gs = gs[torch.arange(S, device=x.device) % V]
    genes = torch.cat([ge, gu, gs.expand(B, -1)], 1)  # (B, T)
    y = torch.where(valid, x, torch.zeros_like(x)).gather(1, genes)
    return genes, y


# ----------------------------------------------------------------------------------------------------
# model

class SkipBlock(nn.Module):
    """LN(x + W2 ReLU(W1 x)), W1: n -> 2n."""

    def __init__(self, n):
        super().__init__()
        self.w1 = nn.Linear(n, 2 * n)
        self.w2 = nn.Linear(2 * n, n)
        self.ln = nn.LayerNorm(n)

    def forward(self, x):
        return self.ln(x + self.w2(F.relu(self.w1(x))))


class Block(nn.Module):
    """Encoder layer: fused biased QKV, non-causal attention (kernels.attention), GELU FF.
    post: x = LN1(x + Drop(Wo Attn(x))); x = LN2(x + Drop(W2 Drop(GELU(W1 x))))."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.w1 = nn.Linear(cfg.d_model, cfg.ff)
        self.w2 = nn.Linear(cfg.ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def attn(self, x):
        B, L, D = x.shape
        H = self.cfg.n_head
        q, k, v = self.qkv(x).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, hd)
        y = attention(q, k, v)  # (B, H, L, hd)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))

    def mlp(self, x):
        return self.w2(self.drop(F.gelu(self.w1(x))))

    def forward(self, x):
        if self.cfg.norm == "post":
            x = self.ln1(x + self.drop(self.attn(x)))
            return self.ln2(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class StateEmbedding(nn.Module):
    """SE. `emb` (V, E): frozen gene table (buffer, saved with the weights); `genes`: its names."""

    def __init__(self, cfg, emb, genes=None):
        super().__init__()
        emb = torch.as_tensor(emb, dtype=torch.float32)
        cfg.E = emb.shape[1]
        self.cfg = cfg
        self.genes = list(genes) if genes is not None else None
        self.register_buffer("emb", emb.clone())  # (V, E)
        E, d = cfg.E, cfg.d_model
        self.cls = nn.Parameter(torch.randn(1, 1, E))
        self.ds_tok = nn.Parameter(torch.randn(1, 1, E)) if cfg.ds_token else None
        self.enc = nn.Sequential(nn.Linear(E, d), nn.LayerNorm(d), nn.SiLU())  # gene-token encoder
        self.count_enc = nn.Sequential(nn.Linear(1, cfg.count_hidden), nn.LeakyReLU(),
                                       nn.Linear(cfg.count_hidden, cfg.n_bins))
        self.bins = nn.Parameter(torch.randn(cfg.n_bins, d))  # learnable bin vectors (nn.Embedding init)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(d) if cfg.norm == "pre" else nn.Identity()
        self.dec = nn.Sequential(SkipBlock(d), nn.Linear(d, cfg.d_out))
        zd = d + cfg.d_out + 1 + (cfg.n_ds if cfg.ds_token else 0)
        self.exp_dec = nn.Sequential(SkipBlock(zd), SkipBlock(zd), nn.Linear(zd, 1))
        if cfg.ds_token:
            self.ds_emb = nn.Linear(cfg.d_out, cfg.n_ds)
            self.ds_head = nn.Sequential(nn.Linear(cfg.d_out, d), nn.SiLU(), nn.LayerNorm(d),
                                         nn.Dropout(0.1), nn.Linear(d, cfg.n_datasets))

    @property
    def V(self):
        return self.emb.shape[0]

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self, B):
        """Training FLOPs per step: 6 * matmul params * tokens + attention, + the expression decoder."""
        c = self.cfg
        L = c.pad_length + int(c.ds_token)
        n_enc = c.E * c.d_model + c.n_layer * (4 * c.d_model * c.d_model + 2 * c.d_model * c.ff)
        zd = c.d_model + c.d_out + 1 + (c.n_ds if c.ds_token else 0)
        T = c.P + c.N + c.S
        n_dec = 2 * (4 * zd * zd) + c.E * c.d_model
        return 6 * n_enc * B * L + 12 * c.n_layer * c.d_model * L * L * B + 6 * n_dec * B * T

    def configure_optimizer(self, lr, wd=0.01, betas=(0.9, 0.999)):
        dec = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        nod = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": dec, "weight_decay": wd}, {"params": nod, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=self.emb.is_cuda)

    def count_emb(self, c):
        """Soft-binned expression: sum_k softmax(count_enc(c))_k * bin_k. c (B, L) -> (B, L, d)."""
        return F.softmax(self.count_enc(c.unsqueeze(-1)), -1) @ self.bins

    def encode(self, ids, cnt):
        """ids (B, k) vocab rows, cnt (B, 1 + k) -> z (B, out) L2-normed, dsv (B, out) or None."""
        B = ids.shape[0]
        e = F.normalize(self.emb[ids], dim=-1)  # (B, k, E)
        tok = [self.cls.expand(B, 1, -1), e] + ([self.ds_tok.expand(B, 1, -1)] if self.ds_token_on else [])
        h = self.enc(torch.cat(tok, 1)) * math.sqrt(self.cfg.d_model)  # (B, L, d)
        c = torch.cat([cnt, cnt.new_zeros(B, 1)], 1) if self.ds_token_on else cnt  # dataset token: 0
        h = h + self.count_emb(c) * (torch.arange(h.shape[1], device=h.device) < cnt.shape[1])[None, :, None]
        for blk in self.blocks:
            h = blk(h)
        h = self.ln_f(h)
        # the decoder is per position: run it on the two positions that are used only
        pos = [0, h.shape[1] - 1] if self.ds_token_on else [0]
        dec = self.dec(h[:, pos])  # (B, 1|2, out)
        z = F.normalize(dec[:, 0].float(), dim=-1)
        dsv = dec[:, 1] if self.ds_token_on else None
        return z, dsv

    @property
    def ds_token_on(self):
        return self.cfg.ds_token

    def embed(self, x, valid, rows, salt=0, cls_gene=None, raw=None):
        """X_state rows: x (B, V) (counts or log1p), valid (B, V), rows (B,) cell ids (seed the
        tie-break), raw (B,) which cells are raw counts (default: judged on x) -> (B, out + n_ds) = [z | ds]."""
        x = to_log1p(x, raw)
        ids, cnt = tokenize(x, valid, self.cfg.k, rows, salt, cls_gene, self.cfg.cls_count)
        z, dsv = self.encode(ids, cnt)
        if dsv is None:
            return z
        return torch.cat([z, self.ds_emb(dsv).float()], 1)

    def decode(self, z, ds, genes, rda):
        """Expression decoder: z (B, out), ds (B, n_ds) or None, genes (B, T) vocab rows, rda (B,)
        -> yhat (B, T) log1p."""
        B, T = genes.shape
        g = self.enc(self.emb[genes])  # raw gene vectors: no L2 norm, no sqrt(d)   (B, T, d)
        parts = [g, z[:, None].to(g.dtype).expand(B, T, -1), rda.to(g.dtype)[:, None, None].expand(B, T, 1)]
        if ds is not None:
            parts.append(ds[:, None].to(g.dtype).expand(B, T, -1))
        return self.exp_dec(torch.cat(parts, -1)).squeeze(-1)

    def expression(self, xs, genes):
        """Decode X_state rows xs (B, out + n_ds) at vocab rows `genes` (T,) -> (B, T) log1p, with the
        reference's inference rda (4.0)."""
        c = self.cfg
        z, ds = xs[:, :c.d_out], (xs[:, c.d_out:] if c.ds_token else None)
        g = torch.as_tensor(genes, device=xs.device).expand(xs.shape[0], -1)
        return self.decode(z, ds, g, torch.full((xs.shape[0],), c.rda_infer, device=xs.device))

    def forward(self, x, valid, rows, salt=0, ds=None, cls_gene=None):
        """Training step maths. x (B, V), valid (B, V), rows (B,) cell ids, salt (e.g. the step: new
        draws each step), ds (B,) dataset labels -> (loss, {"gene", "cell", "ds"})."""
        c = self.cfg
        x = to_log1p(x)
        ids, cnt = tokenize(x, valid, c.k, rows, salt, cls_gene, c.cls_count)
        genes, y = task_genes(x, valid, c.P, c.N, c.S, rows, salt)  # (B, T)
        z, dsv = self.encode(ids, cnt)
        nz = (y > 0).float()
        rda = (y * nz).sum(1) / nz.sum(1).clamp_min(1)  # mean nonzero target (0 if none)
        yhat = self.decode(z, None if dsv is None else self.ds_emb(dsv), genes, rda).float()  # (B, T)
        gene = (yhat - y).norm(dim=1).mean()  # unsquared, per cell
        S = min(c.S, self.V)
        cell = (yhat[:, -S:] - y[:, -S:]).norm(dim=0).mean() if S > 0 else yhat.new_zeros(())
        loss = gene + cell
        parts = {"gene": gene, "cell": cell}
        if dsv is not None and ds is not None:
            dl = F.cross_entropy(self.ds_head(dsv).float(), ds)
            loss = loss + dl
            parts["ds"] = dl
        return loss, parts


# ----------------------------------------------------------------------------------------------------
# checkpoints: model.safetensors (weights + the frozen gene table) + meta.json (config, vocabulary)

def model_files(model, meta=None, sd=None):
    """The files of an SE model folder, {name: fn(path)} to write in order (state.ckpt.save writes them
    into a checkpoint): model.safetensors (`sd`, the weights of a sharded model consolidated, default the
    model's own), then meta.json: `meta` with the kind, the config, the genes and se_hash (sha256 of the
    model.safetensors beside it, 16 hex; transform records it in uns['nanostate_se'])."""
    import json

    from safetensors.torch import save_file

    from state.ckpt import write_text
    sd = {k: v.detach().float().cpu().contiguous() for k, v in (model.state_dict() if sd is None else sd).items()}
    meta = {**(meta or {}), "kind": "nanostate-se", "config": model.cfg.to_dict(), "genes": model.genes}
    h = lambda p: file_hash(os.path.join(os.path.dirname(p), "model.safetensors"))
    return {"model.safetensors": lambda p: save_file(sd, p),
            "meta.json": lambda p: write_text(p, json.dumps({**meta, "se_hash": h(p)}, indent=1))}


def save_model(model, out_dir, meta=None, sd=None):
    """Write an SE model folder (model_files) into out_dir, outside a run (state/convert.py); -> se_hash."""
    os.makedirs(out_dir, exist_ok=True)
    for name, fn in model_files(model, meta, sd).items():
        fn(os.path.join(out_dir, name))
    return file_hash(os.path.join(out_dir, "model.safetensors"))


def se_table(sd, meta, who):
    """The frozen gene table of an SE run's weights, one row per name of meta.json's 'genes' (else a UserError:
    the names would index other rows, a silent wrong embedding)."""
    emb = sd.get("emb")
    if emb is None or emb.dim() != 2 or emb.shape[0] != len(meta["genes"]):
        raise UserError(f"{who}: model.safetensors' gene table 'emb' is {None if emb is None else tuple(emb.shape)} "
                        f"for the {len(meta['genes'])} genes meta.json names: meta.json and the weights are not of "
                        "one run (edited, or files of two runs mixed); copy the run folder again, or train again")
    return emb


def load_model(ckpt, device="cpu"):
    """-> (StateEmbedding in eval mode with dropout 0, meta) of an SE run folder (state.ckpt.load_run)."""
    from state.ckpt import check_se_meta, fit_weights, load_run
    meta, sd = load_run(ckpt, f"--ckpt={ckpt}", "se")
    c = check_se_meta(meta, f"--ckpt={ckpt}")
    c.dropout = 0.0  # inference: no dropout (the reference forgot this in SDPA)
    model = fit_weights(StateEmbedding(c, se_table(sd, meta, f"--ckpt={ckpt}"), meta["genes"]), sd, f"--ckpt={ckpt}")
    meta["se_hash"] = file_hash(os.path.join(ckpt, "model.safetensors"))  # the file as it is now
    return model.to(device).eval(), meta
