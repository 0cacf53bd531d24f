"""
ST, the State Transition model: a bidirectional set transformer that maps a set of S control cells
plus a perturbation to the set of S perturbed cells (SPEC 3, 4).

    ctrl (B,S,Din) · pert (B,) codes or (B,P) features · batch (B,S) int
    h = f_cell(ctrl) + f_pert(pert) [+ E_batch[batch]]   # (B,S,H)  a sum per token, not a concat
    h = cat(conf_token, h)  if confidence_token          # (B,1+S,H) prepended: no positions, order is free
    z = backbone(h)                                      # LLaMA blocks, no mask/positions, final RMSNorm
    z = z[:, :S] + f_cell(ctrl)                          # residual in hidden space (reference)
    y = f_out(z)  [* alpha[c] + ctrl + shift[c,p] if anchored]  # (B,S,Dout)  anchor: a baseline's shift, zero-init f_out
    y = ReLU(y) in gene space
    x = gene_decoder(y)                                  # (B,S,G), only when trained on an embedding
                                                         #  *and* given gene targets (never untrained)

`mixer` swaps the attention for the set's mean token or nothing (ablations). Attention goes through
`kernels.attention(q, k, v, lens)`: the one call the fused Triton kernel serves.
Sets of unequal length share a batch through key-padding `lens`; a padded batch gives the outputs of
one-set-at-a-time calls (tested). With no positional encoding the model is permutation-equivariant
over the cells of a set (tested).

Loss (SPEC 4): per-set energy distance between predicted and observed sets, averaged over sets, via
`kernels.energy_distance(x, y)`. The scale is the reference code's (geomloss "energy"): 0.5 * E_V,
where E_V = 2/(NM) sum|x-y| - 1/N^2 sum|x-x'| - 1/M^2 sum|y-y'| is the textbook V-statistic
(`energy_scale=1.0` gives E_V). It is computed in fp32, outside autocast; the kernel centres both
sets on the target's set mean (E is translation invariant; centring keeps the Gram trick accurate).
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from state.baselines import ANCHORS
from state.config import recipe
from state.errors import UnknownName, UserError

# -----------------------------------------------------------------------------
# config


@dataclass
class STConfig:
    # data-dependent widths (set by train.py from the prepared data)
    n_in: int = 2000            # Din: input width per cell (genes G, or embedding dims E)
    n_out: int = 0              # Dout: output width per cell; 0 -> n_in (predict what goes in)
    n_pert: int = 0             # P: one-hot vocabulary size, or the width of the feature vectors
    n_batch: int = 0            # rows of the batch embedding table; 0 = no batch encoder (reference)
    n_genes: int = 0            # G of the gene decoder; 0 = no decoder. Only set with a gene target
    n_ctx: int = 0              # contexts of the anchor table (set by train.py when anchor != "none")
    # set transformer
    set_size: int = 512         # S: cells per set (cell_set_len)
    hidden: int = 768           # H: token width
    n_layers: int = 8           # LLaMA blocks
    n_heads: int = 12           # attention heads (n_kv = n_heads)
    head_dim: int = 0           # d; 0 -> hidden // n_heads (may be a non-power-of-two, e.g. 84, 124)
    ff: int = 0                 # SwiGLU intermediate width; 0 -> 4 * hidden
    norm_eps: float = 1e-6      # RMSNorm eps (the reference's HF LLaMA ignores the YAML value)
    # encoders / head
    n_enc: int = 1              # layers of f_pert and f_cell MLPs (n_encoder_layers)
    n_dec: int = 1              # layers of the f_out MLP (n_decoder_layers)
    basal_proj: bool = True     # f_cell is an MLP (use_basal_projection); False -> a single Linear
    mlp_dropout: float = 0.1    # dropout inside the MLPs (reference 0.1; paper 0.0)
    mlp_norm: str = "none"      # "none" (reference) | "layernorm" (paper encoders)
    residual: str = "reference"  # "reference": z + f_cell(ctrl); "paper": z + full token sum h; "none":
                                # z alone (arc-state predict_residual=False); "output": f_out(z) + ctrl
                                # (arc-state's residual with output_space=all)
    down_up: bool = False       # arc-state output_space=all: Linear(Dout, Dout/8)-GELU-Linear on the output
    activation: str = "gelu"    # activation inside the f_pert/f_cell/f_out MLPs (arc-state `activation`:
                                # gelu | relu | leakyrelu | elu | selu)
    gene_space: bool = True     # outputs are expression values: ReLU them (SPEC 3.3)
    relu_embedding: bool = False  # reference quirk: ReLU signed embedding outputs too
    confidence_token: bool = False  # extra token predicting 10 x the set's loss (SPEC 4.3)
    decoder_hidden: tuple = (1024, 1024, 512)  # gene decoder widths (reference)
    # loss
    energy_scale: float = 0.5   # 0.5 = reference/geomloss scale, 1.0 = textbook E_V
    decoder_weight: float = 1.0  # gene-decoder loss weight (reference 1.0, paper 0.1)
    confidence_weight: float = 0.01  # MSE(conf, 10 x set loss) weight (reference)
    mean_weight: float = 0.0    # weight of a pseudobulk term beside the energy distance: the squared
                                # error of the set means, per feature (set_mean_error); 0 = off (reference)
    init_std: float = 0.02      # normal init std of backbone projections
    # options tested by the multi-seed protocol (state/experiment.py)
    anchor: str = "none"        # baseline-anchored output: y = ctrl + shift[c,p] + f_out(z), with the
                                # (context, perturbation) shift of a baseline computed from training cells
                                # (state.baselines.shift_table: pert_mean | context_mean | two_way | auto |
                                # additive, for combinations) and f_out's last layer zero-initialised, so
                                # training starts at the baseline
    mixer: str = "attention"    # how cells of a set see each other: attention | mean (mean-pooled set
                                # token, the paper's ablation) | none (cells are independent)

    def __post_init__(self):
        bad = [f"{k}={getattr(self, k)!r} (needs {rule})" for k, ok, rule in (
            ("hidden", self.hidden >= 1, ">= 1"), ("n_heads", self.n_heads >= 1, ">= 1"),
            ("head_dim", self.head_dim >= 0, ">= 0; 0 = hidden / n_heads"), ("ff", self.ff >= 0, ">= 0"),
            ("n_layers", self.n_layers >= 0, ">= 0"), ("n_enc", self.n_enc >= 1, ">= 1"),
            ("n_dec", self.n_dec >= 1, ">= 1"), ("set_size", self.set_size >= 1, ">= 1"),
            ("mlp_dropout", 0 <= self.mlp_dropout < 1, "0 <= p < 1"), ("norm_eps", self.norm_eps > 0, "> 0"),
            ("init_std", self.init_std > 0, "> 0"), ("energy_scale", self.energy_scale > 0, "> 0"),
            ("decoder_weight", self.decoder_weight >= 0, ">= 0"),
            ("confidence_weight", self.confidence_weight >= 0, ">= 0"), ("mean_weight", self.mean_weight >= 0, ">= 0"),
            ("decoder_hidden", all(h >= 1 for h in self.decoder_hidden), "widths >= 1"),
            ("mlp_norm", self.mlp_norm in ("none", "layernorm"), "none or layernorm"),
            ("residual", self.residual in ("reference", "paper", "none", "output"), "reference, paper, none or output"),
            ("activation", self.activation in ACTIVATIONS, " | ".join(ACTIVATIONS)))
            if not ok or (isinstance(getattr(self, k), float) and not math.isfinite(getattr(self, k)))]
        if self.head_dim == 0 and self.n_heads >= 1 and self.hidden % self.n_heads:
            bad.append(f"hidden={self.hidden} with n_heads={self.n_heads} (hidden must divide by n_heads when "
                       "head_dim=0, or give head_dim)")
        if bad:
            raise UserError(f"model settings out of range: {'; '.join(bad)}")
        if self.head_dim == 0:
            self.head_dim = self.hidden // self.n_heads
        if self.ff == 0:
            self.ff = 4 * self.hidden
        if self.n_out == 0:
            self.n_out = self.n_in
        self.decoder_hidden = tuple(self.decoder_hidden)
        if self.anchor not in ANCHORS:
            raise UserError(f"anchor '{self.anchor}' not one of {', '.join(ANCHORS)}")
        if self.mixer not in ("attention", "mean", "none"):
            raise UserError(f"mixer '{self.mixer}' not one of attention, mean, none")
        if self.anchor != "none" and self.residual == "output":
            raise UserError("residual=output adds the control cell, and so does an anchored output: choose one")
        if (self.anchor != "none" or self.residual == "output") and self.n_out != self.n_in:
            raise UserError("an anchored output or residual=output adds to the control cell: needs n_out == n_in")

    @classmethod
    def from_name(cls, name, **kw):
        name = ALIASES.get(name, name)
        if name not in PRESETS:
            raise UnknownName(f"unknown ST preset {name!r} (--preset); choose from "
                                  f"{sorted(PRESETS) + sorted(ALIASES)}")
        return cls(**{**PRESETS[name], **kw})

    def to_dict(self):
        d = asdict(self)
        d["decoder_hidden"] = list(self.decoder_hidden)
        return d

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


PRESETS = {
    # CI / tests: seconds on CPU
    "tiny": dict(set_size=16, hidden=64, n_layers=2, n_heads=4, ff=256, n_enc=2, n_dec=2),
    # reference state_sm.yaml (VCC Colab): 28.9M backbone
    "small": dict(set_size=128, hidden=672, n_layers=4, n_heads=8, head_dim=84, ff=2688, n_enc=4,
                  n_dec=4, basal_proj=False),
    # reference state.yaml (arc-state default): 75.5M backbone
    "default": dict(set_size=512, hidden=768, n_layers=8, n_heads=12, head_dim=64, ff=3072, n_enc=1,
                    n_dec=1, basal_proj=True),
    # paper Table 3 Tahoe row = state_lg (tahoe_llama_212693232) with S = 256; paper decoder weight 0.1
    "paper": dict(set_size=256, hidden=1488, n_layers=6, n_heads=12, head_dim=124, ff=5952, n_enc=4,
                  n_dec=4, basal_proj=False, decoder_weight=0.1),
}
ALIASES = {"state": "default", "state_sm": "small", "state_lg": "paper", "paper_tahoe": "paper"}
# the recommended CPU recipe is a file, config/st_cpu.py (`python train.py config/st_cpu.py` runs it as it
# is): its STConfig fields are the cpu preset, the rest the training settings train.py takes as defaults
# with --preset=cpu
_cpu = {k: v for k, v in recipe("st_cpu").items() if k != "preset"}
PRESETS["cpu"] = {k: v for k, v in _cpu.items() if k in {f.name for f in fields(STConfig)}}
TRAIN_DEFAULTS = {"cpu": {k: v for k, v in _cpu.items() if k not in PRESETS["cpu"]}}


# -----------------------------------------------------------------------------
# modules


# the MLP activations arc-state's `activation` setting names (its default: gelu)
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "selu": nn.SELU}


def build_mlp(n_in, n_out, n_hid, n_layers, dropout=0.1, norm="none", act="gelu"):
    """Reference build_mlp: n=1 Linear; else Linear->[LN]->act->Dropout, (n-2) more, then Linear."""
    if n_layers == 1:
        return nn.Linear(n_in, n_out)
    layers, d = [], n_in
    for _ in range(n_layers - 1):
        layers += [nn.Linear(d, n_hid)]
        if norm == "layernorm":
            layers += [nn.LayerNorm(n_hid)]
        layers += [ACTIVATIONS[act](), nn.Dropout(dropout)]
        d = n_hid
    return nn.Sequential(*layers, nn.Linear(d, n_out))


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight.to(x.dtype), self.eps)  # fp32 stats inside


class Attention(nn.Module):
    """Bias-free multi-head self-attention, n_kv = n_heads, scale 1/sqrt(d), no mask, no positions."""

    def __init__(self, cfg):
        super().__init__()
        self.nh, self.d = cfg.n_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden, 3 * self.nh * self.d, bias=False)  # fused q,k,v projections
        self.wo = nn.Linear(self.nh * self.d, cfg.hidden, bias=False)

    def forward(self, x, lens=None):
        B, L, _ = x.shape
        q, k, v = self.wqkv(x).view(B, L, 3, self.nh, self.d).permute(2, 0, 3, 1, 4)  # 3 x (B,nh,L,d)
        y = kernels.attention(q, k, v, lens)  # (B,nh,L,d); rows >= len are 0
        return self.wo(y.transpose(1, 2).reshape(B, L, self.nh * self.d))


class MeanMix(nn.Module):
    """The set's mean token, projected, added to every cell (the paper's mean-pooling ablation):
    cells see the set only through its mean. Rows beyond lens are left out of the mean."""

    def __init__(self, cfg):
        super().__init__()
        self.wv = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.wo = nn.Linear(cfg.hidden, cfg.hidden, bias=False)

    def forward(self, x, lens=None):
        B, L, _ = x.shape
        if lens is None:
            m = x.mean(1, keepdim=True)  # (B,1,H)
        else:
            w = (torch.arange(L, device=x.device)[None, :] < lens[:, None]).to(x.dtype)  # (B,L)
            m = (x * w[..., None]).sum(1, keepdim=True) / lens.clamp_min(1).to(x.dtype)[:, None, None]
        return self.wo(self.wv(m)).expand(B, L, -1)


class SwiGLU(nn.Module):
    """down(silu(gate x) * up x), bias-free; gate and up fused in one matmul."""

    def __init__(self, cfg):
        super().__init__()
        self.w13 = nn.Linear(cfg.hidden, 2 * cfg.ff, bias=False)
        self.w2 = nn.Linear(cfg.ff, cfg.hidden, bias=False)

    def forward(self, x):
        g, u = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(g) * u)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden, cfg.norm_eps) if cfg.mixer != "none" else None
        self.attn = {"attention": Attention, "mean": MeanMix}[cfg.mixer](cfg) if cfg.mixer != "none" else None
        self.norm2 = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, lens=None):
        if self.attn is not None:
            x = x + self.attn(self.norm1(x), lens)
        return x + self.mlp(self.norm2(x))


class ConfidenceHead(nn.Module):
    """H -> H/2 -> H/4 -> 1; each hidden step Linear->LN->GELU->Dropout, final ReLU (reference)."""

    def __init__(self, H, dropout):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(H, H // 2), nn.LayerNorm(H // 2), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(H // 2, H // 4), nn.LayerNorm(H // 4), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(H // 4, 1), nn.ReLU())

    def forward(self, x):
        return self.net(x)


def gene_decoder(n_in, widths, G, dropout):
    layers, d = [], n_in
    for w in widths:
        layers += [nn.Linear(d, w), nn.LayerNorm(w), nn.GELU(), nn.Dropout(dropout)]
        d = w
    return nn.Sequential(*layers, nn.Linear(d, G), nn.ReLU())

# -----------------------------------------------------------------------------
# model


class StateTransition(nn.Module):
    def __init__(self, cfg, pert_table=None, anchor_table=None):
        """`pert_table` (n_vocab, P) float: feature vectors looked up by perturbation code. Without it
        perturbations are one-hot over cfg.n_pert codes. `anchor_table` (n_ctx, n_vocab, Dout) float:
        the baseline shifts of cfg.anchor (state.baselines.shift_table), needed when cfg.anchor is set."""
        super().__init__()
        self.cfg = cfg
        H, c = cfg.hidden, cfg
        assert c.n_pert > 0, "n_pert (one-hot vocabulary size or feature width) must be set"
        if pert_table is not None:
            pert_table = torch.as_tensor(pert_table, dtype=torch.float32)
            assert pert_table.shape[1] == c.n_pert, (pert_table.shape, c.n_pert)
            self.register_buffer("pert_table", pert_table)  # saved with the model: self-contained
        else:
            self.register_buffer("pert_table", None)
        if c.anchor != "none":
            if anchor_table is None:
                raise ValueError(f"anchor '{c.anchor}' needs its shift table (state.baselines.shift_table)")
            anchor_table = torch.as_tensor(anchor_table, dtype=torch.float32)
            if anchor_table.shape[0] != c.n_ctx or anchor_table.shape[2] != c.n_out:
                raise ValueError(f"anchor table {tuple(anchor_table.shape)} does not match n_ctx {c.n_ctx}, "
                                 f"n_out {c.n_out}")
            self.register_buffer("anchor_table", anchor_table)  # saved with the model, like pert_table
        else:
            self.register_buffer("anchor_table", None)
        # the correction's strength per context (anchored models): y = ctrl + shift + alpha[c] * f_out(z).
        # 1 while training; train.py --guard chooses alpha for the held-out context on its support cells
        # and records it in meta.json (not in the weights: predict.py's load_run sets it)
        self.register_buffer("corr_scale", torch.ones(c.n_ctx) if c.anchor != "none" else None, persistent=False)
        self.f_pert = build_mlp(c.n_pert, H, H, c.n_enc, c.mlp_dropout, c.mlp_norm, c.activation)
        if c.basal_proj:
            self.f_cell = build_mlp(c.n_in, H, H, c.n_enc, c.mlp_dropout, c.mlp_norm, c.activation)
        else:
            self.f_cell = nn.Linear(c.n_in, H)
        self.f_batch = nn.Embedding(c.n_batch, H) if c.n_batch > 0 else None
        self.conf_token = nn.Parameter(torch.zeros(1, 1, H)) if c.confidence_token else None
        self.conf_head = ConfidenceHead(H, c.mlp_dropout) if c.confidence_token else None
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(H, c.norm_eps)  # final norm: part of the backbone output
        self.f_out = build_mlp(H, c.n_out, H, c.n_dec, c.mlp_dropout, act=c.activation)
        self.down_up = nn.Sequential(nn.Linear(c.n_out, c.n_out // 8), nn.GELU(),
                                     nn.Linear(c.n_out // 8, c.n_out)) if c.down_up else None
        self.relu = c.gene_space or c.relu_embedding
        # rule: never build a decoder without a training target (n_genes is only set with one)
        self.decoder = gene_decoder(c.n_out, c.decoder_hidden, c.n_genes, c.mlp_dropout) if c.n_genes else None
        self.init_weights()

    # --- init / accounting -----------------------------------------------------

    @torch.no_grad()
    def init_weights(self):
        """Torch defaults for MLPs/embeddings, normal(0, init_std) for backbone projections, norms 1.
        Callable after `to_empty()` (meta-device init for FSDP2)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Embedding)):
                m.reset_parameters()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
        for b in self.blocks:
            for lin in [m for m in b.modules() if isinstance(m, nn.Linear)]:
                nn.init.normal_(lin.weight, 0.0, self.cfg.init_std)
        if self.anchor_table is not None:  # start exactly at the baseline: the correction starts at 0
            last = self.f_out if isinstance(self.f_out, nn.Linear) else self.f_out[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        if self.conf_token is not None:
            nn.init.normal_(self.conf_token, 0.0, self.cfg.init_std)

    def num_params(self, matmul_only=False):
        """All trainable parameters, or only matmul weights (N_mm of the FLOP model)."""
        if not matmul_only:
            return sum(p.numel() for p in self.parameters())
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def estimate_flops(self, batch_size, set_size=None):
        """Training FLOPs per step (fwd+bwd): 6*N_mm*B*S + 12*n_layers*(nh*d)*S^2*B (SPEC 7)."""
        c = self.cfg
        S = set_size or c.set_size
        L = S + (1 if c.confidence_token else 0)
        attn = 12 * c.n_layers * c.n_heads * c.head_dim * L * L * batch_size if c.mixer == "attention" else 0
        return 6 * self.num_params(matmul_only=True) * batch_size * L + attn

    def configure_optimizer(self, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), device_type="cpu"):
        """Adam(lr=1e-4), no weight decay, no schedule (reference). Fused on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        kw = dict(lr=lr, betas=betas, weight_decay=weight_decay)
        if device_type == "cuda":
            kw["fused"] = True
        return torch.optim.Adam(params, **kw)

    # --- forward ---------------------------------------------------------------

    def encode_pert(self, pert, dtype):
        if pert.dtype in (torch.int64, torch.int32):
            if self.pert_table is not None:
                return self.pert_table[pert].to(dtype)  # (B,P)
            return F.one_hot(pert.long(), self.cfg.n_pert).to(dtype)  # (B,P)
        return pert.to(dtype)  # (B,P) features given directly

    def forward(self, ctrl, pert, batch=None, lens=None, tgt=None, tgt_genes=None, ctx=None, with_conf=False,
                reduction="mean"):
        """ctrl (B,S,Din), pert (B,) codes or (B,P) features, batch (B,S) int, lens (B,) valid cells,
        ctx (B,) context codes (anchored models). Without tgt: pred (B,S,Dout), or (pred, conf (B,) or None)
        with with_conf=True. With tgt (B,S,Dout) [and tgt_genes (B,S,G)]: (loss, parts)."""
        B, S, _ = ctrl.shape
        c = self.cfg
        cell = self.f_cell(ctrl)  # (B,S,H)
        h = cell + self.f_pert(self.encode_pert(pert, ctrl.dtype))[:, None, :]  # (B,S,H)
        if self.f_batch is not None and batch is not None:
            h = h + self.f_batch(batch)  # (B,S,H)
        n_tok = lens
        if self.conf_token is not None:
            h = torch.cat([self.conf_token.expand(B, 1, -1).to(h.dtype), h], dim=1)  # (B,1+S,H)
            n_tok = None if lens is None else lens + 1
        x = h
        for blk in self.blocks:
            x = blk(x, n_tok)
        z = self.norm(x)  # (B,L,H)
        conf = None
        if self.conf_token is not None:
            conf, z, h = self.conf_head(z[:, 0]).squeeze(-1), z[:, 1:], h[:, 1:]  # (B,), (B,S,H)
        if c.residual in ("reference", "paper"):  # residual in hidden space
            z = z + (cell if c.residual == "reference" else h)
        y = self.f_out(z)  # (B,S,Dout)
        if c.residual == "output":  # residual in output space (arc-state output_space=all)
            y = y + ctrl
        if self.down_up is not None:
            y = self.down_up(y)
        if self.anchor_table is not None:  # a correction on top of the baseline's prediction
            if ctx is None or pert.dtype not in (torch.int64, torch.int32):
                raise ValueError("an anchored model needs context codes (ctx=) and perturbation codes")
            y = y * self.corr_scale[ctx.long()].to(y.dtype)[:, None, None] + ctrl + \
                self.anchor_table[ctx.long(), pert.long()].to(y.dtype)[:, None, :]
        if self.relu:
            y = F.relu(y)
        if tgt is None:
            return (y, conf) if with_conf else y
        return self._loss(y, conf, tgt, lens, tgt_genes, reduction)

    def decode(self, y):
        """Gene-decoder output (B,S,G) from latent predictions; None without a decoder."""
        return None if self.decoder is None else self.decoder(y)

    def set_energy(self, x, y, lens=None):
        """Per-set energy (B,) in fp32 and outside autocast; the kernel centres both sets on the
        target mean itself (translation invariance, keeps the Gram trick accurate)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return kernels.energy_distance(x.float(), y.float().detach(), n_x=lens, n_y=lens,
                                           scale=self.cfg.energy_scale)

    @staticmethod
    def set_mean_error(x, y, lens=None):
        """Per-set (B,) squared error of the set means, averaged over features, in fp32: the error of the
        pseudobulk shift (what pearson_delta and MAE score), blind to the cells' spread."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x, y = x.float(), y.float()
            if lens is None:
                return (x.mean(1) - y.mean(1)).pow(2).mean(-1)
            m = (torch.arange(x.shape[1], device=x.device)[None, :] < lens[:, None]).float()[..., None]  # (B,S,1)
            n = lens.clamp_min(1).float()[:, None]  # (B,1)
            return (((x - y) * m).sum(1) / n).pow(2).mean(-1)

    def _loss(self, y, conf, tgt, lens, tgt_genes, reduction="mean"):
        """The one loss, for training and validation: (loss, parts). reduction="mean": scalars averaged
        over the sets (NaN sets skipped); "none": per set (B,), the set-mean error included even at weight
        0 (validation reports it)."""
        e = self.set_energy(y, tgt, lens)  # (B,)
        parts, loss = {"main": e}, e
        if self.cfg.mean_weight or reduction == "none":
            parts["mean"] = self.set_mean_error(y, tgt, lens)
            loss = loss + self.cfg.mean_weight * parts["mean"]
        if self.decoder is not None and tgt_genes is not None:
            parts["decoder"] = self.set_energy(self.decoder(y), tgt_genes, lens)
            loss = loss + self.cfg.decoder_weight * parts["decoder"]
        if conf is not None:
            parts["conf"] = (conf.float() - 10.0 * e.detach()).pow(2)
            loss = loss + self.cfg.confidence_weight * parts["conf"]
        if reduction == "none":
            return loss, parts
        return loss.nanmean(), {k: v.nanmean() for k, v in parts.items()}

    def loss(self, ctrl, pert, tgt, batch=None, lens=None, tgt_genes=None, ctx=None):
        return self.forward(ctrl, pert, batch=batch, lens=lens, tgt=tgt, tgt_genes=tgt_genes, ctx=ctx)
