"""
Import arc-state models: an ST run (what `state tx train` writes) as a nanostate ST run folder, so predict.py
simulate/test read it like a run of train.py; an SE checkpoint as a nanostate SE run for embed.py transform:

    python -m state.convert --arc_run=ARC_DIR --out=NANO_RUN_DIR [--checkpoint=final.ckpt] [--data=PREPARED]
    python predict.py simulate --run=NANO_RUN_DIR --adata=controls.h5ad --perts=A,B --out=screen.h5ad
    python predict.py test --run=NANO_RUN_DIR --data=PREPARED --split=split.json --out=DIR   # with --data

    python -m state.convert --arc_se=SE_FOLDER_OR_CKPT --out=NANO_SE_DIR [--protein_embeddings=FILE]
    python embed.py transform --ckpt=NANO_SE_DIR cells.h5ad --output=cells_emb.h5ad
    python -m state.convert --to_arc=NANO_RUN_DIR --out=ARC_DIR     # the other way: state tx infer --model-dir=ARC_DIR

--data=PREPARED binds the import to a folder of `python -m state.data prepare` (prepared from the run's input,
e.g. --key=obsm/X_hvg): perturbation and batch codes in that folder's order, its checksum recorded, so
predict.py test replays a split of it. Without it the run is not tied to any data (simulate needs none).

ARC_DIR holds config.yaml, var_dims.pkl, pert_onehot_map.pt, checkpoints/*.ckpt and the batch and cell-type
one-hot maps. Nothing in it is executed: the Lightning .ckpt and var_dims.pkl are read by a restricted
unpickler (tensors, numbers, strings, containers; any other global refused by name, state/unpickle.py), the
.pt/.torch maps by torch.load(weights_only=True); data_module.torch (a pickled object) is never read.

The model is rebuilt from the checkpoint's own hyper-parameters (what arc-state's load_from_checkpoint
reads) and mapped onto STConfig; every forward-relevant arc-state setting either maps exactly or is refused
with its name:

    arc-state                                  nanostate STConfig
    hidden_dim, cell_set_len                   hidden, set_size
    transformer_backbone_kwargs (llama,        n_layers, n_heads, head_dim, ff, norm_eps (rms_norm_eps,
      bidirectional)                             default 1e-6: HF ignores layer_norm_eps)
    n_encoder_layers / n_decoder_layers        n_enc / n_dec
    use_basal_projection, activation           basal_proj, activation
    predict_residual True / False              residual="reference" / "none"
    output_space all (HVG input, same genes)   residual="output" + down_up (its final down/up block), or
                                                 residual="none" without predict_residual
    batch_encoder (+ batch_dim)                n_batch (batch names from batch_onehot_map, by index)
    confidence_token                           confidence_token (appended there, prepended here: no
                                                 positions, so the same outputs)
    embed_key X_hvg / None, output_space gene  gene_space=True (ReLU)
    embed_key other, output_space gene         gene_space=False, n_genes + decoder_hidden (the decoder that
                                                 arc-state trains on X_hvg)
    embed_key other, output_space embedding    gene_space=False, relu_embedding=True (arc-state ReLUs it)
    pert_onehot_map (one-hot or features)      pert_table (the map's vectors, its names in order)

SE (`state emb fit` checkpoints, the published SE-600M folder: se600m*.ckpt + protein_embeddings.pt): the
weights map one to one onto state/se.py's StateEmbedding (post-norm blocks, count soft-binning, CLS count
of the file's 4th gene, dataset token); widths come from the tensors, heads and pad_length from the config
in the checkpoint (cfg_yaml, or the omegaconf tree of older ones read as plain data). The gene vectors are
the ones `state emb transform` would use: --protein_embeddings, else the folder's protein_embeddings*.pt,
else those packed in the checkpoint (read with weights_only=True / the restricted unpickler). Refused:
rda or counts off, another cls_token_idx, tensors without a place.

Refused (named): a GPT2 backbone, a causal LLaMA, grouped-query attention, biased attention/MLP, another
MLP activation in the backbone, mask_attn, an active use_batch_token, LoRA, the VCI counts decoder, the
residual gene decoder, output_space=all on an embedding input or onto other genes. A gene decoder that arc-state built but never
trained (HVG input: ArcInstitute/state#247) is dropped, and said so. Everything else in the config is
training-only (loss, optimiser, logging) and read by no forward.
"""

import hashlib
import json
import os
import re
import sys

import torch

from state.errors import UserError, output_folder, run

COMMAND = "python -m state.convert"
# the llama kwargs that change what the backbone computes, and the values nanostate's blocks compute
LLAMA_FIXED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


# -----------------------------------------------------------------------------
# reading an arc-state run


def _config_yaml(text):
    """The scalar settings of an arc-state config (OmegaConf's YAML: nested `key: value` blocks) as
    {'data.kwargs.pert_col': 'target_gene', ...}; lists and mappings written inline are kept as text."""
    out, stack = {}, []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(("#", "- ")):
            continue
        m = re.match(r"^( *)([^:#]+):(?: (.*))?$", line.rstrip("\n"))
        if not m:
            continue
        ind, key, val = len(m.group(1)), m.group(2).strip().strip("'\""), (m.group(3) or "").strip()
        while stack and stack[-1][0] >= ind:
            stack.pop()
        if val == "":
            stack.append((ind, key))
            continue
        if len(val) > 1 and val[0] == val[-1] and val[0] in "'\"":
            val = val[1:-1]
        out[".".join([k for _, k in stack] + [key])] = None if val == "null" else val
    return out


def pick_checkpoint(arc, name=""):
    d = os.path.join(arc, "checkpoints")
    if name:
        p = name if os.path.isabs(name) or os.path.exists(name) else os.path.join(d, name)
        if not os.path.isfile(p):
            raise UserError(f"{p}: checkpoint not found (--checkpoint=NAME of a file in {d}, or a path)")
        return p
    cks = sorted(f for f in os.listdir(d) if f.endswith(".ckpt")) if os.path.isdir(d) else []
    for f in ("final.ckpt", "last.ckpt"):
        if f in cks:
            return os.path.join(d, f)
    if len(cks) == 1:
        return os.path.join(d, cks[0])
    raise UserError(f"{d}: {'no .ckpt file' if not cks else f'{len(cks)} checkpoints ({cks[:5]})'} and no "
                    "final.ckpt or last.ckpt; give --checkpoint=NAME")


def read_arc_run(arc, checkpoint=""):
    """-> dict of an arc-state ST run folder: hp (the checkpoint's hyper-parameters), sd (its weights),
    var_dims, the pert/batch/cell-type maps, config.yaml's scalars, the checkpoint path and step."""
    from state import unpickle
    if not os.path.isdir(arc):
        raise UserError(f"--arc_run={arc}: {'is a file' if os.path.exists(arc) else 'not found'}; give the "
                        "folder `state tx train` wrote (config.yaml, var_dims.pkl, checkpoints/)")
    for f in ("config.yaml", "var_dims.pkl", "pert_onehot_map.pt"):
        if not os.path.isfile(os.path.join(arc, f)):
            raise UserError(f"{arc}: {f} is missing: not an arc-state ST run folder (`state tx train` writes "
                            "config.yaml, var_dims.pkl, pert_onehot_map.pt, checkpoints/*.ckpt)")
    ck = pick_checkpoint(arc, checkpoint)
    obj = unpickle.torch_load(ck, what="an arc-state checkpoint")
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict) or \
            not isinstance(obj.get("hyper_parameters"), dict):
        raise UserError(f"{ck}: not a Lightning checkpoint of an arc-state model (no state_dict or "
                        "hyper_parameters)")
    var_dims = unpickle.load(os.path.join(arc, "var_dims.pkl"), what="var_dims.pkl")
    if not isinstance(var_dims, dict):
        raise UserError(f"{arc}/var_dims.pkl: holds a {type(var_dims).__name__}, not arc-state's dict of dims")

    def onehot(base, need):
        for ext in (".pt", ".torch", ".pkl"):
            p = os.path.join(arc, base + ext)
            if os.path.isfile(p):
                m = unpickle.load(p, what=base) if ext == ".pkl" else unpickle.weights_load(p, what=base)
                if not isinstance(m, dict) or not all(torch.is_tensor(v) and v.dim() == 1 for v in m.values()):
                    raise UserError(f"{p}: not a {{name: vector}} map")
                return {str(k): v.float() for k, v in m.items()}
        if need:
            raise UserError(f"{arc}: {base}.torch is missing (the model has a batch encoder, whose batch names "
                            "it holds); copy the whole arc-state run folder")
        return None
    hp = obj["hyper_parameters"]
    pert = onehot("pert_onehot_map", True)
    return dict(arc=arc, ckpt=ck, hp=hp, sd=obj["state_dict"], var_dims=var_dims, pert=pert,
                batch=onehot("batch_onehot_map", bool(hp.get("batch_encoder"))),
                ctype=onehot("cell_type_onehot_map", False),
                yaml=_config_yaml(open(os.path.join(arc, "config.yaml"), encoding="utf-8").read()),
                step=int(obj.get("global_step") or 0))


# -----------------------------------------------------------------------------
# the mapping


def st_config(r):
    """(STConfig, notes, decoder_trained) of an arc-state run, or a UserError naming the setting that does
    not map."""
    from state.st import ACTIVATIONS, STConfig
    hp, vd, ck = r["hp"], r["var_dims"], r["ckpt"]

    def refuse(field, why):
        raise UserError(f"{ck}: {field}: {why}; nanostate's ST does not compute this, so it cannot be imported "
                        "(retrain without it, or run it with arc-state)")
    if str(hp.get("transformer_backbone_key", "")).lower() != "llama":
        refuse(f"model.kwargs.transformer_backbone_key={hp.get('transformer_backbone_key')!r}",
               "only the bidirectional LLaMA backbone (every state* preset) is mapped, not GPT2 (pertsets)")
    bk = dict(hp.get("transformer_backbone_kwargs") or {})
    if not bk.get("bidirectional_attention", False):
        refuse("transformer_backbone_kwargs.bidirectional_attention=False", "a causal LLaMA with rotary positions")
    for k, v in LLAMA_FIXED.items():
        if bk.get(k, v) != v:
            refuse(f"transformer_backbone_kwargs.{k}={bk[k]!r}", f"the backbone has {k}={v!r}")
    H = int(bk.get("hidden_size", hp.get("hidden_dim", 0)))
    if H != int(hp.get("hidden_dim", H)):
        refuse(f"transformer_backbone_kwargs.hidden_size={H}",
               f"differs from model.kwargs.hidden_dim={hp.get('hidden_dim')}")
    nh = int(bk.get("num_attention_heads", 32))
    if int(bk.get("num_key_value_heads") or nh) != nh:
        refuse(f"transformer_backbone_kwargs.num_key_value_heads={bk['num_key_value_heads']}",
               f"grouped-query attention ({nh} query heads)")
    act = str(hp.get("activation", "gelu")).lower()
    if act not in ACTIVATIONS:
        refuse(f"model.kwargs.activation={act!r}", f"not one of {', '.join(ACTIVATIONS)}")
    if hp.get("mask_attn"):
        refuse("model.kwargs.mask_attn=True", "each cell attends only to itself")
    if hp.get("use_batch_token") and not hp.get("batch_encoder") and hp.get("basal_mapping_strategy") != "random":
        refuse("model.kwargs.use_batch_token=True", "a learned batch token prepended to every set")
    if (hp.get("lora") or {}).get("enable"):
        refuse("model.kwargs.lora.enable=True", "LoRA adapters on the backbone (merge them into the weights first)")
    if hp.get("finetune_vci_decoder"):
        refuse("model.kwargs.finetune_vci_decoder=True", "the VCI counts decoder")
    space, key = hp.get("output_space", "gene"), hp.get("embed_key")
    if space == "all" and key not in (None, "X_hvg"):
        refuse(f"data.kwargs.output_space=all with embed_key={key}", "an embedding input predicting all genes")
    if space == "all" and int(vd["input_dim"]) != int(vd["output_dim"]):
        refuse("data.kwargs.output_space=all", f"an all-genes head from {vd['input_dim']} inputs to "
               f"{vd['output_dim']} outputs (nanostate maps it when they are the same genes)")
    if space not in ("gene", "embedding", "all"):
        refuse(f"data.kwargs.output_space={space!r}", "not gene or embedding")
    has_dec = any(k.startswith("gene_decoder.") for k in r["sd"])
    if has_dec and (hp.get("residual_decoder") or (hp.get("decoder_cfg") or {}).get("residual_decoder")):
        refuse("model.kwargs.residual_decoder=True", "a gene decoder with skip connections between its blocks")
    gene_space = key in (None, "X_hvg")
    trained_dec = has_dec and bool(key) and key != "X_hvg" and space == "gene"  # cell-load gives it targets
    notes = []
    if has_dec and not trained_dec:
        notes.append("dropped the gene decoder arc-state built but never trained (HVG input: no gene targets; "
                     "ArcInstitute/state#247)")
    dec_w, G = (), 0
    if trained_dec:  # widths from the tensors (older checkpoints have no decoder_cfg)
        lin = sorted((int(k.split(".")[2]), v.shape) for k, v in r["sd"].items()
                     if re.fullmatch(r"gene_decoder\.decoder\.\d+\.weight", k) and v.dim() == 2)
        dec_w, G = tuple(s[0] for _, s in lin[:-1]), lin[-1][1][0]
    # unset backbone fields take HF LlamaConfig's defaults (32 layers, 32 heads, SwiGLU 11008), as arc-state's does
    cfg = STConfig(
        n_in=int(vd["input_dim"]), n_out=int(vd["output_dim"]), n_pert=int(vd["pert_dim"]),
        n_batch=int(vd["batch_dim"]) if hp.get("batch_encoder") and vd.get("batch_dim") else 0,
        n_genes=G, set_size=int(hp.get("cell_set_len", 256)), hidden=H, n_layers=int(bk.get("num_hidden_layers", 32)),
        n_heads=nh, head_dim=int(bk.get("head_dim") or H // nh), ff=int(bk.get("intermediate_size", 11008)),
        norm_eps=float(bk.get("rms_norm_eps", 1e-6)), n_enc=int(hp.get("n_encoder_layers", 2)),
        n_dec=int(hp.get("n_decoder_layers", 2)), basal_proj=bool(hp.get("use_basal_projection", True)),
        mlp_dropout=float(hp.get("dropout", 0.1)),
        # output_space=all: arc-state adds the control cell after project_out, then its down/up block
        residual=("output" if space == "all" else "reference") if hp.get("predict_residual", True) else "none",
        down_up=space == "all" and bool(hp.get("predict_residual", True)),
        activation=act, gene_space=gene_space, relu_embedding=not gene_space and not trained_dec,
        confidence_token=bool(hp.get("confidence_token")), decoder_hidden=dec_w or (1024, 1024, 512),
        decoder_weight=float(hp.get("decoder_weight", 1.0)), confidence_weight=float(hp.get("confidence_weight", 0.01)))
    return cfg, notes, trained_dec


def st_weights(r, cfg, trained_dec):
    """arc-state's state_dict -> nanostate's names (q/k/v and gate/up fused), every tensor accounted for."""
    sd, out, used = r["sd"], {}, set()
    single = lambda name: (cfg.n_dec if name == "f_out" else 1 if name == "f_cell" and not cfg.basal_proj
                           else cfg.n_enc) == 1

    def take(k):
        if k not in sd:
            raise UserError(f"{r['ckpt']}: tensor '{k}' is missing (a damaged or another kind of checkpoint)")
        used.add(k)
        return sd[k].float()
    for name, src in (("f_pert", "pert_encoder"), ("f_cell", "basal_encoder"), ("f_out", "project_out")):
        for k in [k for k in sd if k.startswith(src + ".")]:
            # arc-state's 1-layer MLP is Sequential(Linear) ("x.0.weight"); nanostate's a bare Linear
            out[name + re.sub(r"^\.0\.", ".", k[len(src):]) if single(name) else name + k[len(src):]] = take(k)
    bb = "transformer_backbone."
    for i in range(cfg.n_layers):
        p, q = f"{bb}layers.{i}.", f"blocks.{i}."
        out[q + "attn.wqkv.weight"] = torch.cat([take(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
        out[q + "attn.wo.weight"] = take(p + "self_attn.o_proj.weight")
        out[q + "mlp.w13.weight"] = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
        out[q + "mlp.w2.weight"] = take(p + "mlp.down_proj.weight")
        out[q + "norm1.weight"] = take(p + "input_layernorm.weight")
        out[q + "norm2.weight"] = take(p + "post_attention_layernorm.weight")
    out["norm.weight"] = take(bb + "norm.weight")
    used.add(bb + "embed_tokens.weight")  # zeroed, frozen and never read (inputs_embeds are given)
    if cfg.n_batch:
        out["f_batch.weight"] = take("batch_encoder.weight")
    if cfg.confidence_token:
        out["conf_token"] = take("confidence_token.confidence_token")
        for k in [k for k in sd if k.startswith("confidence_token.confidence_projection.")]:
            out["conf_head.net." + k.split(".", 2)[2]] = take(k)
    for k in [k for k in sd if k.startswith("final_down_then_up.")]:  # output_space=all
        if cfg.down_up:
            out["down_up." + k.split(".", 1)[1]] = take(k)
        else:
            used.add(k)  # built by arc-state but not used without predict_residual
    for k in [k for k in sd if k.startswith("gene_decoder.")]:
        if trained_dec:
            out["decoder." + k.split(".", 2)[2]] = take(k)
        else:
            used.add(k)
    left = sorted(set(sd) - used)
    if left:
        raise UserError(f"{r['ckpt']}: {len(left)} tensors have no place in the mapped model (e.g. {left[:4]}): "
                        "the checkpoint holds parts nanostate's ST does not compute; it cannot be imported")
    names = list(r["pert"])
    table = torch.stack([r["pert"][n] for n in names])
    if table.shape[1] != cfg.n_pert:
        raise UserError(f"{r['arc']}/pert_onehot_map.pt: vectors of width {table.shape[1]} but var_dims.pkl says "
                        f"pert_dim={cfg.n_pert}")
    out["pert_table"] = table
    return out, names


def by_index(m, what):
    """Names of a one-hot map ordered by their hot index (the batch encoder's rows)."""
    if m is None:
        return []
    idx = {n: int(v.argmax()) for n, v in m.items()}
    names = sorted(idx, key=idx.get)
    if sorted(idx.values()) != list(range(len(idx))):
        raise UserError(f"{what}: not a one-hot map over {len(idx)} names (indices {sorted(idx.values())[:10]})")
    return names


def fits(cfg, sd, ck):
    """The mapped weights fill the model exactly (every tensor, every shape), or a UserError."""
    from state.st import StateTransition
    try:
        StateTransition(cfg, pert_table=sd["pert_table"]).load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"{ck}: its tensors do not fit the model its settings describe "
                        f"({' '.join(str(e).split())[:300]})") from None


def bind(sd, meta, cfg, data):
    """--data=PREPARED: the imported run in a prepared folder's codes, so predict.py test reads that folder
    with it: the perturbation table's rows (and the batch encoder's) in the folder's vocabulary order (its
    perturbations must all be in the run's map), the folder's genes checked equal to the run's input
    columns, its checksum, columns and context names recorded."""
    from state.data import Prepared
    D = Prepared(data)
    if list(D.genes) != list(meta["genes"]):
        bad = next((i for i, (a, b) in enumerate(zip(D.genes, meta["genes"])) if a != b),
                   min(len(D.genes), len(meta["genes"])))
        raise UserError(f"--data={data}: its {len(D.genes)} input columns are not the run's {len(meta['genes'])} in order "
                        f"(first difference at column {bad}); prepare it with the run's input (--key={meta['key']})")
    have = {n: i for i, n in enumerate(meta["pert_names"])}
    lack = [p for p in D.pert_names if p not in have]
    if lack or D.control != meta["control"]:
        raise UserError(f"--data={data}: perturbations {lack[:10]} (control '{D.control}') are not in the run's map "
                        f"({meta['pert_names'][:10]} ..., control '{meta['control']}'); the run cannot predict them")
    sd["pert_table"] = sd["pert_table"][[have[p] for p in D.pert_names]].contiguous()
    if cfg.n_batch:  # the prepared batch codes index the embedding rows directly
        bi = {n: i for i, n in enumerate(meta["batch_names"])}
        lack = [b for b in D.batch_names if b not in bi]
        if lack:
            raise UserError(f"--data={data}: batches {lack[:10]} are not among the run's ({meta['batch_names'][:10]})")
        sd["f_batch.weight"] = sd["f_batch.weight"][[bi[b] for b in D.batch_names]].contiguous()
        meta["batch_names"] = list(D.batch_names)
        cfg.n_batch = len(D.batch_names)
        meta["st"] = cfg.to_dict()
    meta.update(pert_names=list(D.pert_names), context_names=list(D.context_names), pert_col=D.pert_col,
                context_col=D.context_col, batch_col=D.batch_col, data=os.path.abspath(data), data_checksum=D.checksum)


def convert(arc, out, checkpoint="", data=""):
    """Write the nanostate run folder `out` from the arc-state run `arc` (bound to the prepared folder
    `data` if given); -> (meta, notes)."""
    from safetensors.torch import save_file

    from state import ckpt
    r = read_arc_run(arc, checkpoint)
    cfg, notes, trained_dec = st_config(r)
    sd, pert_names = st_weights(r, cfg, trained_dec)
    fits(cfg, sd, r["ckpt"])
    for k, v in sd.items():
        if not torch.isfinite(v).all():
            raise UserError(f"{r['ckpt']}: tensor for '{k}' has NaN/Inf values; these weights cannot predict")
    hp, vd, y = r["hp"], r["var_dims"], r["yaml"]
    key = hp.get("embed_key")
    genes = [str(g) for g in (vd.get("gene_names") or [])]
    if cfg.gene_space:
        if len(genes) != cfg.n_in:
            raise UserError(f"{arc}/var_dims.pkl: {len(genes)} gene names for an input of {cfg.n_in} genes; "
                            "cannot tell which column is which gene")
        in_names, genes_out = genes, None
    else:
        in_names = [f"{key}_{i}" for i in range(cfg.n_in)]  # obsm columns, as state.data.obsm_names names them
        genes_out = genes if trained_dec else None
        if trained_dec and len(genes) != cfg.n_genes:
            raise UserError(f"{arc}/var_dims.pkl: {len(genes)} gene names for a decoder of {cfg.n_genes} genes")
    control = str(hp.get("control_pert") or y.get("data.kwargs.control_pert") or "")
    if control not in pert_names:
        raise UserError(f"{arc}: the control '{control}' is not in pert_onehot_map.pt ({pert_names[:10]})")
    sha = hashlib.sha256(open(r["ckpt"], "rb").read()).hexdigest()[:16]
    meta = {"step": r["step"], "val_loss": None, "st": cfg.to_dict(), "kind": "nanostate-st",
            "genes": in_names, "key": f"obsm/{key}" if key else "X",
            "recipe": {"log1p": True, "target_sum": None, "libsize_genes": None},  # arc-state's inputs are log1p
            "gene_space": cfg.gene_space, "genes_out": genes_out, "genes_key": "X" if trained_dec else None,
            "pert_names": pert_names, "context_names": list(r["ctype"] or []),
            "batch_names": by_index(r["batch"], f"{arc}/batch_onehot_map"),
            "pert_col": y.get("data.kwargs.pert_col") or "gene", "context_col": y.get("data.kwargs.cell_type_key"),
            "batch_col": y.get("data.kwargs.batch_col"), "control": control, "data": None, "data_checksum": None,
            "split": None, "split_hash": None, "corr_scale": None, "pert_features": None, "combos": None,
            "combo_parts": None, "init_from": None,
            "arc": {"run": os.path.abspath(arc), "checkpoint": os.path.relpath(r["ckpt"], arc), "sha256": sha,
                    "global_step": r["step"], "embed_key": key, "output_space": hp.get("output_space"),
                    "notes": notes}}
    if data:
        bind(sd, meta, cfg, data)
        fits(cfg, sd, r["ckpt"])
    from state.ckpt import lock
    lock(out, COMMAND)
    if not ckpt.empty(out) and ckpt.latest(out) is not None:
        raise UserError(f"--out={out}: holds a run already; choose another folder")
    d = ckpt.begin(out, r["step"])
    ckpt.write(os.path.join(d, "model.safetensors"), lambda p: save_file(
        {k: v.contiguous() for k, v in sd.items()}, p, {"step": str(r["step"]), "from": "arc-state"}))
    ckpt.write(os.path.join(d, "meta.json"), lambda p: ckpt.write_text(p, json.dumps(meta, indent=1)))
    ckpt.commit(out, r["step"])
    return meta, notes


# -----------------------------------------------------------------------------
# SE: an arc-state SE checkpoint (`state emb fit`, the published SE-600M folder) -> a nanostate SE run

# arc-state SE tensor names -> nanostate's (layer i: "{i}"); gene_embedding_layer is the encoder itself
SE_NAMES = [(r"cls_token", "cls"), (r"dataset_token", "ds_tok"), (r"encoder\.(\d)\.(weight|bias)", r"enc.\1.\2"),
            (r"count_encoder\.(\d)\.(weight|bias)", r"count_enc.\1.\2"), (r"bin_encoder\.weight", "bins"),
            (r"transformer_encoder\.layers\.(\d+)\.qkv_proj\.(weight|bias)", r"blocks.\1.qkv.\2"),
            (r"transformer_encoder\.layers\.(\d+)\.out_proj\.(weight|bias)", r"blocks.\1.proj.\2"),
            (r"transformer_encoder\.layers\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.ln\2.\3"),
            (r"transformer_encoder\.layers\.(\d+)\.linear([12])\.(weight|bias)", r"blocks.\1.w\2.\3"),
            (r"(decoder|binary_decoder)\.(\d)\.intermediate_dense\.(weight|bias)", r"\1.\2.w1.\3"),
            (r"(decoder|binary_decoder)\.(\d)\.dense\.(weight|bias)", r"\1.\2.w2.\3"),
            (r"(decoder|binary_decoder)\.(\d)\.layer_norm\.(weight|bias)", r"\1.\2.ln.\3"),
            (r"(decoder|binary_decoder)\.(\d)\.(weight|bias)", r"\1.\2.\3"),
            (r"dataset_embedder\.(weight|bias)", r"ds_emb.\1"), (r"dataset_encoder\.(\d)\.(weight|bias)", r"ds_head.\1.\2")]


def _flat(d, pre=""):
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{pre}{k}."))
        else:
            out[f"{pre}{k}"] = v
    return out


def read_arc_se(path, protein_embeddings=""):
    """(checkpoint dict, its config as {'model.nhead': ..}, {gene: vector}, where the vectors came from) of
    an SE checkpoint or model folder. The gene vectors as `state emb transform` picks them: the given file,
    else the folder's protein_embeddings*.pt, else the ones packed in the checkpoint."""
    import glob

    from state import unpickle
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path):
        cks = sorted(glob.glob(os.path.join(path, "*.ckpt")))
        if not cks:
            raise UserError(f"--arc_se={path}: no .ckpt file in the folder; give the SE checkpoint or its folder")
        ck = cks[-1]  # state emb transform takes the last one too
    elif os.path.isfile(path):
        ck = path
    else:
        raise UserError(f"--arc_se={path}: not found; give an SE checkpoint (.ckpt) or its model folder")
    obj = unpickle.torch_load(ck, {**unpickle.PLAIN, **unpickle.CONFIGS}, "an arc-state SE checkpoint")
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise UserError(f"{ck}: not a Lightning checkpoint (no state_dict)")
    if isinstance(obj.get("cfg_yaml"), str):  # written by recent arc-state: a YAML text
        cfg = _config_yaml(obj["cfg_yaml"])
    else:  # older checkpoints: the omegaconf tree in hyper_parameters, read as plain data
        cfg = _flat(unpickle.plain((obj.get("hyper_parameters") or {}).get("cfg")))
    if not cfg:
        raise UserError(f"{ck}: holds no config (no cfg_yaml, no hyper_parameters cfg); not an SE checkpoint of "
                        "arc-state >= 0.9")
    pe, src = None, None
    cands = [protein_embeddings] if protein_embeddings else sorted(glob.glob(os.path.join(folder, "protein_embeddings*.pt")))
    if cands:
        src = cands[0] if protein_embeddings else (os.path.join(folder, "protein_embeddings.pt")
                                                   if os.path.join(folder, "protein_embeddings.pt") in cands else cands[-1])
        if not os.path.isfile(src):
            raise UserError(f"--protein_embeddings={src}: not found")
        pe = unpickle.weights_load(src, "protein embeddings")
    elif isinstance(obj.get("protein_embeds_dict"), dict):
        pe, src = obj["protein_embeds_dict"], f"{ck} (packed)"
    if not isinstance(pe, dict) or not pe:
        raise UserError(f"{ck}: no gene vectors: no protein_embeddings.pt beside it and none packed in it; give "
                        "--protein_embeddings=FILE (the {gene: vector} .pt the model was trained with)")
    return ck, obj, cfg, pe, src


def se_model(ck, obj, cfg, pe):
    """-> nanostate StateEmbedding with arc-state's weights, or a UserError naming what does not map."""
    from state.se import SEConfig, StateEmbedding, norm_gene
    sd = {k: v for k, v in obj["state_dict"].items()}
    truthy = lambda k, d=True: str(cfg.get(k, d)).lower() in ("true", "1")
    for k, why in (("model.rda", "the read-depth input of the expression decoder"),
                   ("model.counts", "the soft-binned expression of each token")):
        if not truthy(k):
            raise UserError(f"{ck}: {k}=false: nanostate's SE always has {why} (arc-state's loader asserts it "
                            "too); this checkpoint cannot be imported")
    if int(cfg.get("dataset.cls_token_idx", 3)) != 3:
        raise UserError(f"{ck}: dataset.cls_token_idx={cfg['dataset.cls_token_idx']}: nanostate gives CLS the count "
                        "of the file's 4th gene (cls_token_idx 3) only")
    out, used = {}, set()
    for k, v in sd.items():
        if k.startswith("gene_embedding_layer.") or k == "pe_embedding.weight":
            used.add(k)  # the encoder again (one module, two names); the table comes from the gene vectors
            continue
        for pat, rep in SE_NAMES:
            if re.fullmatch(pat, k):
                n = re.sub(r"^binary_decoder\.", "exp_dec.", re.sub(r"^decoder\.", "dec.", re.sub(pat, rep, k)))
                out[n] = v.float().reshape(1, 1, -1) if n in ("cls", "ds_tok") else v.float()
                used.add(k)
                break
    left = sorted(set(sd) - used)
    if left:
        raise UserError(f"{ck}: {len(left)} tensors have no place in nanostate's SE (e.g. {left[:4]}); it cannot be "
                        "imported")
    d, E = sd["encoder.0.weight"].shape
    names, vecs = [], []
    for g, v in pe.items():
        v = torch.as_tensor(v).float().reshape(-1)
        if v.numel() != E:
            raise UserError(f"gene vector '{g}' has {v.numel()} values but the model reads {E}")
        names.append(norm_gene(g))
        vecs.append(v)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:5]
        raise UserError(f"gene vectors: names {dup} occur twice after upper-casing; nanostate maps genes by "
                        "upper-case symbol, so each needs one vector")
    n_ds = int(sd["dataset_encoder.4.weight"].shape[0]) if "dataset_encoder.4.weight" in sd else 1  # classes
    nl = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer_encoder.layers."))
    c = SEConfig(d_model=d, ff=int(sd["transformer_encoder.layers.0.linear1.weight"].shape[0]),
                 n_head=int(cfg.get("model.nhead") or (obj.get("hyper_parameters") or {}).get("nhead")), n_layer=nl,
                 d_out=int(sd["decoder.1.weight"].shape[0]), pad_length=int(cfg.get("dataset.pad_length", 2048)),
                 count_hidden=int(sd["count_encoder.0.weight"].shape[0]), n_bins=int(sd["bin_encoder.weight"].shape[0]),
                 dropout=0.0, norm="post", cls_count="ref", ds_token="dataset_token" in sd, n_datasets=n_ds,
                 P=int(cfg.get("dataset.P", 512)), N=int(cfg.get("dataset.N", 512)), S=int(cfg.get("dataset.S", 512)))
    model = StateEmbedding(c, torch.stack(vecs), names)
    out["emb"] = model.emb
    try:
        model.load_state_dict(out)
    except RuntimeError as e:
        raise UserError(f"{ck}: its tensors do not fit the SE its config describes "
                        f"({' '.join(str(e).split())[:300]})") from None
    return model.eval()


def convert_se(path, out, protein_embeddings=""):
    from state.errors import staged_folder
    from state.se import save_model
    ck, obj, cfg, pe, src = read_arc_se(path, protein_embeddings)
    model = se_model(ck, obj, cfg, pe)
    meta = {"preset": "arc-state", "arc": {"checkpoint": os.path.abspath(ck), "gene_vectors": src,
                                           "global_step": int(obj.get("global_step") or 0)}}
    with staged_folder(out) as d:
        save_model(model, d, meta)
    return model, meta


# -----------------------------------------------------------------------------
# the other way: a nanostate ST run -> an arc-state run folder (`state tx infer --model-dir` loads it)


def export_arc(run, out):
    """Write `out` as `state tx train` would have: config.yaml, var_dims.pkl, the one-hot maps and
    checkpoints/final.ckpt (a Lightning checkpoint of state_dict + hyper_parameters) holding this run's
    weights under arc-state's names. Runs arc-state cannot compute are refused, naming the setting."""
    import pickle

    from state import ckpt
    from state.errors import staged_folder
    meta, sd = ckpt.load_run(run, f"--to_arc={run}")
    c = ckpt.st_model(meta, sd, f"--to_arc={run}").cfg  # meta.json's config, checked against its weights
    dec = c.n_genes > 0
    for bad, why in ((c.anchor != "none", f"anchor={c.anchor}: a baseline shift table arc-state has no place for"),
                     (c.mixer != "attention", f"mixer={c.mixer}: arc-state's backbone always attends"),
                     (c.mlp_norm != "none", "mlp_norm=layernorm: arc-state's MLPs have no norms"),
                     (c.residual == "paper", "residual=paper: arc-state adds f_cell(ctrl) only"),
                     (c.residual == "output" or c.down_up, "residual=output / down_up: arc-state's output_space=all "
                      "head (not written back yet)"),
                     (c.gene_space and dec, "a gene decoder on gene input: arc-state never decodes there"),
                     (not c.gene_space and not dec and not c.relu_embedding,
                      "an embedding output without ReLU: arc-state ReLUs an embedding model without a decoder")):
        if bad:
            raise UserError(f"--to_arc={run}: {why}; this run cannot be written as an arc-state run")
    key = meta.get("key") or "X"
    embed_key = None if key == "X" else key.removeprefix("obsm/")
    space = "gene" if (c.gene_space or dec) else "embedding"
    out_sd, H = {}, c.hidden
    one = {"f_pert": c.n_enc == 1, "f_cell": c.basal_proj and c.n_enc == 1, "f_out": c.n_dec == 1}
    for name, dst in (("f_pert", "pert_encoder"), ("f_cell", "basal_encoder"), ("f_out", "project_out")):
        for k in [k for k in sd if k.startswith(name + ".")]:
            tail = k[len(name):]
            out_sd[dst + (".0" + tail if one[name] else tail)] = sd[k]
    bb = "transformer_backbone."
    for i in range(c.n_layers):
        p, q = f"{bb}layers.{i}.", f"blocks.{i}."
        for x, w in zip("qkv", sd[q + "attn.wqkv.weight"].chunk(3)):
            out_sd[p + f"self_attn.{x}_proj.weight"] = w.contiguous()
        out_sd[p + "self_attn.o_proj.weight"] = sd[q + "attn.wo.weight"]
        gate, up = sd[q + "mlp.w13.weight"].chunk(2)
        out_sd[p + "mlp.gate_proj.weight"], out_sd[p + "mlp.up_proj.weight"] = gate.contiguous(), up.contiguous()
        out_sd[p + "mlp.down_proj.weight"] = sd[q + "mlp.w2.weight"]
        out_sd[p + "input_layernorm.weight"] = sd[q + "norm1.weight"]
        out_sd[p + "post_attention_layernorm.weight"] = sd[q + "norm2.weight"]
    out_sd[bb + "norm.weight"] = sd["norm.weight"]
    out_sd[bb + "embed_tokens.weight"] = torch.zeros(8, H)  # arc-state's zeroed, never-read token table
    if c.n_batch:
        out_sd["batch_encoder.weight"] = sd["f_batch.weight"]
    if c.confidence_token:
        out_sd["confidence_token.confidence_token"] = sd["conf_token"]
        for k in [k for k in sd if k.startswith("conf_head.net.")]:
            out_sd["confidence_token.confidence_projection." + k.split(".", 2)[2]] = sd[k]
    for k in [k for k in sd if k.startswith("decoder.")]:
        out_sd["gene_decoder.decoder." + k.split(".", 1)[1]] = sd[k]
    table = sd.get("pert_table")
    table = torch.eye(c.n_pert) if table is None else table
    names = list(meta["pert_names"])
    genes = list(meta.get("genes_out") or []) if dec else list(meta["genes"])
    backbone = dict(bidirectional_attention=True, max_position_embeddings=c.set_size, hidden_size=H,
                    intermediate_size=c.ff, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                    num_key_value_heads=c.n_heads, head_dim=c.head_dim, rms_norm_eps=c.norm_eps, use_cache=False,
                    attention_dropout=0.0, hidden_dropout=0.0, vocab_size=8, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2, tie_word_embeddings=False, n_positions=c.set_size)
    dcfg = dict(latent_dim=c.n_out, gene_dim=c.n_genes, hidden_dims=list(c.decoder_hidden), dropout=c.mlp_dropout,
                residual_decoder=False) if dec else None
    batch_names = list(meta.get("batch_names") or []) or ["batch"]
    hp = dict(input_dim=c.n_in, hidden_dim=H, output_dim=c.n_out, pert_dim=c.n_pert,
              batch_dim=c.n_batch or len(batch_names), dropout=c.mlp_dropout, lr=1e-4, loss_fn="mse",
              control_pert=meta["control"], embed_key=embed_key, output_space=space, gene_names=genes, batch_size=16,
              gene_dim=c.n_genes if dec else c.n_in, hvg_dim=c.n_genes if dec else c.n_in, decoder_cfg=dcfg,
              cell_set_len=c.set_size, blur=0.05, loss="energy", confidence_token=c.confidence_token,
              n_encoder_layers=c.n_enc, n_decoder_layers=c.n_dec, activation=c.activation,
              predict_residual=c.residual == "reference", distributional_loss="energy",
              transformer_backbone_key="llama", transformer_backbone_kwargs=backbone,
              use_basal_projection=c.basal_proj, batch_encoder=c.n_batch > 0, gene_decoder_bool=dec,
              basal_mapping_strategy="random", mask_attn=False, lora={"enable": False}, decoder_weight=c.decoder_weight)
    ctx_names = list(meta.get("context_names") or []) or ["all"]
    onehot = lambda ns: {n: torch.eye(len(ns))[i] for i, n in enumerate(ns)}
    yaml = "\n".join(["data:", "  name: PerturbationDataModule", "  kwargs:",
                      f"    embed_key: {embed_key if embed_key else 'null'}", f"    output_space: {space}",
                      f"    pert_col: {json.dumps(meta.get('pert_col') or 'gene')}",
                      f"    control_pert: {json.dumps(meta['control'])}",
                      f"    cell_type_key: {json.dumps(meta.get('context_col') or 'cell_type')}",
                      f"    batch_col: {json.dumps(meta.get('batch_col') or 'gem_group')}",
                      "    basal_mapping_strategy: random", "model:", "  name: state", "  kwargs:",
                      f"    cell_set_len: {c.set_size}", f"    hidden_dim: {H}", "training:", "  batch_size: 16",
                      f"name: {os.path.basename(os.path.abspath(out))}", ""])
    var_dims = dict(input_dim=c.n_in, gene_dim=hp["gene_dim"], hvg_dim=hp["hvg_dim"], output_dim=c.n_out,
                    pert_dim=c.n_pert, gene_names=genes, batch_dim=len(batch_names), pert_names=names)
    with staged_folder(out) as d:
        os.makedirs(os.path.join(d, "checkpoints"))
        torch.save({"epoch": 0, "global_step": int(meta.get("step") or 0), "pytorch-lightning_version": "2.6.6",
                    "state_dict": {k: v.contiguous() for k, v in out_sd.items()}, "hyper_parameters": hp,
                    "hparams_name": "kwargs"}, os.path.join(d, "checkpoints", "final.ckpt"))
        torch.save({n: table[i].clone() for i, n in enumerate(names)}, os.path.join(d, "pert_onehot_map.pt"))
        torch.save(onehot(batch_names), os.path.join(d, "batch_onehot_map.torch"))
        torch.save(onehot(ctx_names), os.path.join(d, "cell_type_onehot_map.torch"))
        with open(os.path.join(d, "var_dims.pkl"), "wb") as f:
            pickle.dump(var_dims, f)
        ckpt.write_text(os.path.join(d, "config.yaml"), yaml)
    return hp


def main(argv):
    from state.config import configure
    cfg = {"arc_run": "", "arc_se": "", "to_arc": "", "out": "", "checkpoint": "", "data": "", "protein_embeddings": ""}
    configure(argv, cfg)
    if sum(bool(cfg[k]) for k in ("arc_run", "arc_se", "to_arc")) != 1 or not cfg["out"]:
        raise UserError("give one of --arc_run=ARC_DIR (ST), --arc_se=SE_CKPT_OR_FOLDER (SE), --to_arc=NANO_RUN "
                        "(export), and --out=DIR (see --help)")
    src = cfg["arc_run"] or cfg["arc_se"] or cfg["to_arc"]
    output_folder(cfg["out"], [src], COMMAND)
    if cfg["to_arc"]:
        if os.path.exists(os.path.join(cfg["out"], "checkpoints", "final.ckpt")):
            raise UserError(f"--out={cfg['out']}: holds an arc-state run already; choose another folder")
        hp = export_arc(cfg["to_arc"], cfg["out"])
        print(f"{cfg['to_arc']} -> {cfg['out']} (arc-state run folder: {hp['output_space']} output, embed_key "
              f"{hp['embed_key']}); run it with: state tx infer --model-dir {cfg['out']} --adata IN.h5ad "
              f"--pert-col {json.load(open(os.path.join(cfg['to_arc'], 'meta.json'))).get('pert_col')}"
              + (f" --embed-key {hp['embed_key']}" if hp["embed_key"] else " (its .X columns in the run's gene order)"))
        return 0
    if cfg["arc_se"]:
        if os.path.exists(os.path.join(cfg["out"], "meta.json")):
            raise UserError(f"--out={cfg['out']}: holds a run already; choose another folder")
        model, meta = convert_se(cfg["arc_se"], cfg["out"], cfg["protein_embeddings"])
        c = model.cfg
        print(f"{meta['arc']['checkpoint']} -> {cfg['out']}: SE d_model {c.d_model}, {c.n_layer} layers, {c.n_head} heads, "
              f"pad_length {c.pad_length}, X_state width {c.d_out + (c.n_ds if c.ds_token else 0)}, {model.V} gene "
              f"vectors ({meta['arc']['gene_vectors']}); embed with: python embed.py transform --ckpt={cfg['out']} IN.h5ad")
        return 0
    meta, notes = convert(cfg["arc_run"], cfg["out"], cfg["checkpoint"], cfg["data"])
    c = meta["st"]
    print(f"{meta['arc']['checkpoint']} (step {meta['step']}) -> {cfg['out']}: ST hidden {c['hidden']}, {c['n_layers']} "
          f"layers, set {c['set_size']}, input {meta['key']} ({c['n_in']}), {len(meta['pert_names'])} perturbations"
          + (f", gene decoder -> {c['n_genes']} genes" if c["n_genes"] else ""))
    for n in notes:
        print("note:", n)
    return 0


if __name__ == "__main__":
    sys.exit(run(COMMAND, main, None, __doc__))
