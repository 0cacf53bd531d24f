"""
Record arc-state's own ST and SE outputs as test fixtures (tests/fixtures/arc/), so tests/test_arc.py can
check nanostate's import of arc-state checkpoints against arc-state itself without arc-state installed.

Run it in a separate venv that has arc-state (its top-level module is also called `state`, so it must
never be installed into the project's venv), from the repository root:

    python3 -m venv /work/arcvenv && /work/arcvenv/bin/pip install torch==2.13.0 && /work/arcvenv/bin/pip install arc-state
    /work/arcvenv/bin/python dev/record_arc_fixtures.py --data=../shared/data --out=tests/fixtures/arc

What it does, all on CPU in about two minutes:
  1. cuts a small slice of the Papalexi ECCITE-seq file (real cells: 6 knockouts + non-targeting, 48
     genes) into an .h5ad with obsm['X_hvg'] (log1p genes) and obsm['X_emb'] (a 16-d PCA of them: an
     embedding input), and a cell-load TOML;
  2. trains real arc-state ST runs with its own CLI (`state tx train`, 40 steps, tiny widths): HVG input
     (state_sm layout); embedding input with the gene decoder; embedding only (confidence token, batch
     encoder, relu); predict_residual=false (its untrained HVG decoder is what the converter drops);
  3. loads each run's checkpoint with arc-state's own class and records its forward outputs
     (predict_step with padded=False, exactly as `state tx infer` calls it) on fixed control sets and
     every perturbation: inputs and outputs go to <run>/arc_outputs.safetensors;
  4. runs `state tx infer` on a file whose one cell type has ONE control cell (arc-state's control draws are
     then forced, so predict.py simulate can be compared end to end): infer_in.h5ad -> infer_out.h5ad;
  5. SE: a tiny StateEmbeddingModel saved as `state emb fit` saves it (fit itself needs CUDA) in the
     published layout, and `state emb transform`'s embeddings of real cells (record_se).
The checkpoints keep everything arc-state writes (optimizer state included); only LlamaConfig's zeroed,
never-read token table is 8 rows instead of 32,000, which keeps each run ~0.4 MB. Copied per run: what
`state tx infer` and the converter read (not data_module.torch, a pickled object, nor last.ckpt).
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 0

# the arc-state ST runs recorded: name -> (input key, output space, hydra overrides beyond the common ones)
RUNS = {
    # state_sm layout (4-layer encoders, basal projection off) on HVG input: no decoder
    "hvg_sm": ("X_hvg", "gene", ["model=state_sm", "model.kwargs.n_encoder_layers=4",
                                 "model.kwargs.n_decoder_layers=4"]),
    # state layout (1-layer encoders, basal projection MLP) on an embedding with the gene decoder
    "emb_dec": ("X_emb", "gene", ["model=state", "model.kwargs.n_encoder_layers=2",
                                  "model.kwargs.n_decoder_layers=2", "++model.kwargs.decoder_hidden_dims=[32,24]"]),
    # embedding only (no decoder: arc-state ReLUs it), confidence token, batch encoder, relu activation
    "emb_conf_batch": ("X_emb", "embedding", ["model=state", "model.kwargs.confidence_token=true",
                                             "model.kwargs.batch_encoder=true", "++model.kwargs.activation=relu",
                                             "model.kwargs.n_encoder_layers=3", "model.kwargs.n_decoder_layers=2"]),
    # arc-state's default data config: output_space=all (HVG input: the residual added after project_out, then
    # its down/up block)
    "hvg_all": ("X_hvg", "all", ["model=state", "model.kwargs.n_encoder_layers=2",
                                 "model.kwargs.n_decoder_layers=2", "++model.kwargs.decoder_hidden_dims=[32,24]"]),
    # predict_residual off, 1-layer encoders on HVG input
    "hvg_nores": ("X_hvg", "gene", ["model=state", "model.kwargs.predict_residual=false",
                                   "model.kwargs.n_encoder_layers=1", "model.kwargs.n_decoder_layers=1",
                                   "++model.kwargs.decoder_hidden_dims=[32,24]"]),
}
TINY = ["model.kwargs.hidden_dim=32", "model.kwargs.cell_set_len=8",
        "model.kwargs.transformer_backbone_kwargs.intermediate_size=48",
        "model.kwargs.transformer_backbone_kwargs.num_hidden_layers=2",
        "model.kwargs.transformer_backbone_kwargs.num_attention_heads=4",
        "model.kwargs.transformer_backbone_kwargs.num_key_value_heads=4",
        "model.kwargs.transformer_backbone_kwargs.head_dim=8",
        # the backbone's zeroed, frozen token table (never read: arc-state passes inputs_embeds) at 8 rows
        # instead of LlamaConfig's 32,000 keeps each checkpoint ~100 KB instead of 4 MB
        "++model.kwargs.transformer_backbone_kwargs.vocab_size=8"]
KOS = ["STAT1", "JAK2", "IFNGR1", "IRF1", "CD86", "ATF2"]


def make_slice(data, work):
    """Real cells, small: 6 knockouts + 60 controls per replicate, the 48 most variable genes."""
    import anndata as ad
    a = ad.read_h5ad(os.path.join(data, "papalexi2021_thp1_eccite_sceptre.h5ad"))
    rng = np.random.default_rng(SEED)
    keep = []
    for g in KOS + ["non-targeting"]:
        for rep in sorted(a.obs["bio_rep"].unique()):
            idx = np.flatnonzero((a.obs["target_gene"].values == g) & (a.obs["bio_rep"].values == rep))
            keep += sorted(rng.choice(idx, size=min(len(idx), 20 if g != "non-targeting" else 30), replace=False))
    a = a[np.sort(keep)].copy()
    X = np.asarray(a.X.todense() if hasattr(a.X, "todense") else a.X, dtype=np.float32)
    top = np.sort(np.argsort(-X.var(0))[:48])
    X = X[:, top]
    b = ad.AnnData(X=X, obs=a.obs[["target_gene", "cell_type", "bio_rep"]].copy())
    b.obs_names = a.obs_names
    b.var_names = np.asarray(a.var_names)[top]
    b.var["gene_name"] = list(b.var_names)
    b.var["highly_variable"] = True
    b.obsm["X_hvg"] = X.copy()
    Xc = X - X.mean(0)
    _, _, vt = np.linalg.svd(Xc, full_matrices=False)
    b.obsm["X_emb"] = (Xc @ vt[:16].T).astype(np.float32)  # a 16-d embedding of the same cells
    for c in ("target_gene", "cell_type", "bio_rep"):
        b.obs[c] = b.obs[c].astype(str).astype("category")
    os.makedirs(os.path.join(work, "data"), exist_ok=True)
    path = os.path.join(work, "data", "pap.h5ad")
    b.write_h5ad(path)
    toml = os.path.join(work, "split.toml")
    with open(toml, "w") as f:
        f.write(f'[datasets]\npap = "{os.path.join(work, "data")}"\n\n[training]\npap = "train"\n\n'
                '[fewshot."pap.THP-1"]\nval = ["ATF2"]\ntest = ["CD86"]\n')
    return path, toml


def train(work, toml, name, key, space, extra, steps):
    out = os.path.join(work, "runs")
    cmd = [os.path.join(os.path.dirname(sys.executable), "state"), "tx", "train",
           f"data.kwargs.toml_config_path={toml}", f"data.kwargs.embed_key={key}",
           f"data.kwargs.output_space={space}", "data.kwargs.pert_col=target_gene",
           "data.kwargs.control_pert=non-targeting", "data.kwargs.cell_type_key=cell_type",
           "data.kwargs.batch_col=bio_rep", "data.kwargs.num_workers=0", "data.kwargs.pin_memory=false",
           f"training.max_steps={steps}", "training.batch_size=4", "training.lr=0.003", "training.val_freq=1000",
           "training.ckpt_every_n_steps=1000", "use_wandb=false", "wandb.local_wandb_dir=/tmp",
           f"output_dir={out}", f"name={name}", "overwrite=true", *extra, *TINY]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "WANDB_MODE": "disabled"})
    return os.path.join(out, name)


def record(run, h5ad, key, n_sets=6):
    """arc-state's own forward (predict_step with padded=False: one variable-length set per call, exactly as
    `state tx infer` calls it) on fixed sets of real control cells, every perturbation of the map in turn
    (the control too), set lengths S, S-1, ..., 1 cell. -> <run>/arc_outputs.safetensors."""
    import anndata as ad
    import torch
    from safetensors.torch import save_file
    from state.tx.models.state_transition import StateTransitionPerturbationModel
    torch.manual_seed(SEED)
    ck = os.path.join(run, "checkpoints", "final.ckpt")
    m = StateTransitionPerturbationModel.load_from_checkpoint(ck, map_location="cpu").eval()
    pmap = torch.load(os.path.join(run, "pert_onehot_map.pt"), weights_only=False)
    bmap = torch.load(os.path.join(run, "batch_onehot_map.torch"), weights_only=False)
    names = [str(k) for k in pmap]
    a = ad.read_h5ad(h5ad)
    ctrl = np.flatnonzero(a.obs["target_gene"].values == "non-targeting")
    X = np.asarray(a.obsm[key], dtype=np.float32)
    bidx = np.array([int(bmap[b].argmax()) for b in a.obs["bio_rep"].astype(str)])
    rng = np.random.default_rng(SEED)
    S = m.cell_sentence_len
    rec = {k: [] for k in ("ctrl", "batch", "set", "preds", "dec", "pert", "conf", "rows")}
    for i in range(len(names) + n_sets):
        n = max(1, S - i) if i < S else 1 + i % S
        rows = rng.choice(ctrl, size=n, replace=True)  # drawn with replacement, as arc-state does
        p = i % len(names)
        batch = {"ctrl_cell_emb": torch.from_numpy(X[rows]), "pert_emb": pmap[names[p]].float()[None].repeat(n, 1),
                 "pert_name": [names[p]] * n, "batch": torch.from_numpy(bidx[rows])}
        with torch.no_grad():
            o = m.predict_step(batch, batch_idx=0, padded=False)
        rec["ctrl"].append(X[rows])
        rec["rows"].append(rows)
        rec["batch"].append(bidx[rows])
        rec["set"].append(np.full(n, i))
        rec["preds"].append(o["preds"].numpy())
        rec["pert"].append(p)
        if o.get("pert_cell_counts_preds") is not None:
            rec["dec"].append(o["pert_cell_counts_preds"].reshape(n, -1).numpy())
        if o.get("confidence_pred") is not None:
            rec["conf"].append(float(o["confidence_pred"].reshape(-1)[0]))
    t = {k: torch.from_numpy(np.concatenate(v)) for k, v in rec.items() if v and k not in ("pert", "conf")}
    t["pert"] = torch.tensor(rec["pert"])
    if rec["conf"]:
        t["conf"] = torch.tensor(rec["conf"])
    t = {k: (v.float() if v.is_floating_point() else v.long()).contiguous() for k, v in t.items()}
    save_file(t, os.path.join(run, "arc_outputs.safetensors"),
              {"pert_names": json.dumps(names), "checkpoint": "checkpoints/final.ckpt", "key": key,
               "decoder": str(m.gene_decoder is not None), "torch": torch.__version__})
    print(f"recorded {len(rec['pert'])} sets ({len(t['preds'])} cells) of {run}: preds {tuple(t['preds'].shape)}"
          + (f", decoder {tuple(t['dec'].shape)}" if "dec" in t else "") + (", confidence" if "conf" in t else ""))


def infer_e2e(run, h5ad, key, work):
    """`state tx infer` on a file whose one cell type has ONE control cell: arc-state's control draws
    (np.random.RandomState per window) can then only pick that cell, so predict.py simulate, drawing from
    the same one-cell pool, sees the same inputs and the two outputs can be compared cell for cell. Input:
    the control + 10 cells labelled with each of two perturbations. -> <run>/infer_in.h5ad, infer_out.h5ad."""
    import anndata as ad
    a = ad.read_h5ad(h5ad)
    ctrl = np.flatnonzero(a.obs["target_gene"].values == "non-targeting")[:1]
    rows = np.concatenate([ctrl] + [np.flatnonzero(a.obs["target_gene"].values == g)[:10] for g in ("STAT1", "JAK2")])
    b = a[rows].copy()
    b.uns = {}
    src, dst = os.path.join(run, "infer_in.h5ad"), os.path.join(run, "infer_out.h5ad")
    b.write_h5ad(src)
    cmd = [os.path.join(os.path.dirname(sys.executable), "state"), "tx", "infer", "--model-dir", run, "--adata", src,
           "--embed-key", key, "--pert-col", "target_gene", "--output", dst, "--quiet"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def record_se(data, work, out, n_genes=40, extra=24, E=16):
    """A tiny arc-state SE checkpoint in the published layout (se/se_tiny.ckpt + se/protein_embeddings.pt)
    and `state emb transform`'s own embeddings of real cells (se/cells.h5ad -> se/arc_emb.npy).

    `state emb fit` cannot run here: it hard-codes CUDA (model.cuda(), NCCL DDP, bf16-mixed). The
    checkpoint is therefore made with the class it trains (StateEmbeddingModel, built from arc-state's own
    state-defaults.yaml with tiny widths) and saved by Lightning's Trainer.save_checkpoint, which is how
    fit writes it (on_save_checkpoint packs cfg_yaml and the protein embeddings). Its weights are the
    initialisation plus seeded noise on every tensor (an untrained model's norms are all ones and its
    biases zero: a swapped norm or bias would go unnoticed).

    Gene vectors: seeded random E-dim vectors for `n_genes` of the slice's genes plus `extra` genes absent
    from the file (what ESM2 is for real genes; the file's other genes have none). pad_length is the number
    of the file's genes with a vector + 1: every cell's sentence is then all of them, which makes arc-state's
    tokenisation deterministic (it breaks ties and pads with torch.randperm/randint draws; nanostate with its
    own seeded hash), so the two embeddings can be compared at all."""
    import anndata as ad
    import lightning as L
    import torch
    from omegaconf import OmegaConf

    import state as arc
    from state.emb.nn.model import StateEmbeddingModel
    d = os.path.join(out, "se")
    os.makedirs(d, exist_ok=True)
    a = ad.read_h5ad(os.path.join(work, "data", "pap.h5ad"))
    full = ad.read_h5ad(os.path.join(data, "papalexi2021_thp1_eccite_sceptre.h5ad"))
    rows = np.flatnonzero(np.isin(full.obs_names, a.obs_names))[::12][:32]
    cells = ad.AnnData(X=full.layers["counts"][rows][:, np.isin(full.var_names, a.var_names)].astype(np.float32),
                       obs=full.obs.iloc[rows][["target_gene", "bio_rep"]].astype(str))
    cells.var_names = np.asarray(full.var_names)[np.isin(full.var_names, a.var_names)]
    cells.write_h5ad(os.path.join(d, "cells.h5ad"))  # raw counts (arc-state and nanostate log1p them per cell)
    g = torch.Generator().manual_seed(SEED)
    names = list(cells.var_names[:n_genes]) + [f"NOTINFILE{i}" for i in range(extra)]
    order = torch.randperm(len(names), generator=g).tolist()  # the table's order is not the file's
    pe = {names[i]: torch.randn(E, generator=g) for i in order}
    torch.save(pe, os.path.join(d, "protein_embeddings.pt"))
    cfg = OmegaConf.load(os.path.join(os.path.dirname(arc.__file__), "configs", "state-defaults.yaml"))
    cfg.embeddings.current, cfg.dataset.current = "tiny", "tiny"
    cfg.embeddings["tiny"] = {"all_embeddings": os.path.join(d, "protein_embeddings.pt"), "ds_emb_mapping": None,
                              "valid_genes_masks": None, "size": E, "num": len(pe)}
    cfg.dataset["tiny"] = {"ds_type": "h5ad", "train": None, "val": None, "filter": False, "num_datasets": 3}
    cfg.dataset.pad_length, cfg.dataset.P, cfg.dataset.N, cfg.dataset.S = n_genes + 1, 8, 8, 8
    cfg.model.update(emsize=32, d_hid=64, nhead=4, nlayers=2, output_dim=24, batch_size=8)
    cfg.wandb.enable = False
    torch.manual_seed(SEED)
    m = StateEmbeddingModel(token_dim=E, d_model=32, nhead=4, d_hid=64, nlayers=2, output_dim=24, dropout=0.1,
                            cfg=cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    m.protein_embeds = pe
    m.pe_embedding = torch.nn.Embedding.from_pretrained(torch.vstack(list(pe.values())))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(m)
    ck = os.path.join(d, "se_tiny.ckpt")
    trainer.save_checkpoint(ck)
    emb = os.path.join(d, "arc_emb.npy")
    cmd = [os.path.join(os.path.dirname(sys.executable), "state"), "emb", "transform", "--model-folder", d,
           "--input", os.path.join(d, "cells.h5ad"), "--output", emb]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    e = np.load(emb)
    print(f"recorded SE: {e.shape} embeddings of {len(cells)} cells ({len(pe)} gene vectors, pad_length {n_genes + 1})")


# what a fixture run keeps: everything `state tx infer` and the converter read (not data_module.torch, a
# pickled object neither needs, nor the duplicate last.ckpt)
KEEP = ("config.yaml", "var_dims.pkl", "pert_onehot_map.pt", "batch_onehot_map.torch", "cell_type_onehot_map.torch",
        "checkpoints/final.ckpt", "arc_outputs.safetensors", "infer_in.h5ad", "infer_out.h5ad")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data"))
    p.add_argument("--out", default=os.path.join(HERE, "..", "tests", "fixtures", "arc"))
    p.add_argument("--work", default="/tmp/arc_fixtures_work", help="scratch folder (full checkpoints stay here)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--runs", default=",".join(RUNS), help="ST runs to record ('' for none)")
    p.add_argument("--se", type=int, default=1, help="record the SE fixture too (1) or not (0)")
    a = p.parse_args(argv)
    os.makedirs(a.work, exist_ok=True)
    path, toml = make_slice(a.data, a.work)
    for name in [r for r in a.runs.split(",") if r]:
        key, space, extra = RUNS[name]
        run = train(a.work, toml, name, key, space, extra, a.steps)
        record(run, path, key)
        infer_e2e(run, path, key, a.work)
        dst = os.path.join(a.out, name)
        shutil.rmtree(dst, ignore_errors=True)
        for f in KEEP:
            if os.path.exists(os.path.join(run, f)):
                os.makedirs(os.path.dirname(os.path.join(dst, f)), exist_ok=True)
                shutil.copy(os.path.join(run, f), os.path.join(dst, f))
    if a.se:
        record_se(a.data, a.work, a.out)
    total = sum(os.path.getsize(f) for f in glob.glob(os.path.join(a.out, "**"), recursive=True) if os.path.isfile(f))
    print(f"fixtures in {a.out}: {total / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
