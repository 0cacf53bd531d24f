"""
Predict with a trained ST run.

Replay the test split (pred/real pair for the evaluator, DESIGN.md contract):
    python predict.py test --run=runs/q --data=/tmp/q --split=/tmp/q/split.json --out=runs/q/test
Virtual screen from control cells (predicted cells for each perturbation in each context):
    python predict.py simulate --run=runs/q --adata=controls.h5ad --perts=A,B --out=screen.h5ad
    python predict.py simulate --run=runs/q --adata=controls.h5ad --perts=perts.txt --n_cells=200 --out=..
Evaluate / compare with baselines (forwarded to state.eval.main / state.baselines.main):
    python predict.py eval ...        python predict.py report ...

Sets are never padded: a group of n cells is cut into ceil(n/S) windows of at most S cells, fed with n
controls of the same context drawn as evenly as possible (test: the baselines' draws from the context's
training controls, state.baselines.control_draws; simulate: state.sampler.draw_controls, seeded). Each
group's predicted cells are recentred on the pool its controls were drawn from, as the baselines' are
(--center=False keeps the raw outputs, e.g. for parity with arc-state): a group's mean is then the pool's
mean plus the model's shift, not also the noise of which controls it was drawn. Windows are batched by
length (no padding) in blocks of --max_cells cells, and a screen is written block by block, so its size is
bounded by the disk, not the memory. Screen inputs may be raw counts or log1p values in any gene order: the
run's recipe (meta.json) normalises counts to its target_sum and log1p's them.
`--run=A,B,C` is a seed ensemble: each predicted cell comes from one member (--ensemble=mixture, which
keeps the members' spread), or the members' set means are averaged and each cell keeps one member's
residual (--ensemble=shift), or the members' predictions are averaged per cell (--ensemble=mean).
Real control cells are copied through with is_predicted=False (predicted controls would leak into the
metrics). Gene-space outputs are clipped to [0, 14] (log1p). CPU or one GPU (--device=cuda);
--dtype=bfloat16 runs the forward under bf16 autocast (about 3x faster on CPUs with bf16 units, outputs
within ~1e-2 of float32, the default and the parity-tested path).
"""

import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from state import ckpt
from state.config import configure
from state.sampler import draw_controls
from state.errors import die, need_space, output_file, output_folder, run, stale_tmp, staged_folder
from state.eval import group_spread
from state.h5ad import H5AD, Cat, Stream, write_cells
from state.perts import check_combo_labels, multi_hot, parts_of

# -----------------------------------------------------------------------------
# loading a run


def load_run(run, device="cpu", alpha=None):
    """-> (model in eval mode, meta dict). The model is rebuilt from meta.json's config, with the guarded
    correction's strength per context the run recorded (train.py --guard), or `alpha` in every context
    (an ablation: 1 = the correction as trained, 0 = the anchor alone)."""
    meta, sd = ckpt.load_run(run, f"--run={run}")
    model = ckpt.st_model(meta, sd, f"--run={run}")  # meta.json's config holding its weights, checked
    if model.corr_scale is not None and alpha is not None:
        model.corr_scale.fill_(alpha)
    elif meta.get("corr_scale") is not None:  # the guarded correction's strength per context (--guard)
        model.corr_scale.copy_(torch.tensor(meta["corr_scale"], dtype=torch.float32))
    return model.to(device).eval(), meta


def check_alpha(a, command):
    """--alpha: "" (the run's guarded strength) or a number in [0, 1] for every context."""
    if a in ("", None):
        return None
    try:
        v = float(a)
    except ValueError:
        v = float("nan")
    if not 0 <= v <= 1:
        die(f"{command}: --alpha={a!r}: the correction's strength in [0, 1] (1 = as trained, 0 = the anchor), "
            "or leave it out for the run's own (train.py --guard)")
    return v


def check_options(cfg, command):
    """--ensemble and --dtype (test and simulate)."""
    if cfg.get("dtype", "float32") not in ("float32", "bfloat16"):
        die(f"{command}: --dtype={cfg['dtype']!r}: float32 (exact) or bfloat16 (bf16 autocast: faster on CPUs "
            "with bf16 units and on GPUs, outputs within ~1e-2)")
    if cfg["ensemble"] not in ("mixture", "shift", "mean"):
        die(f"{command}: --ensemble={cfg['ensemble']!r}: mixture (each cell from one member), shift (the "
            "members' set means averaged, each cell's residual from one member) or mean (per-cell average)")


def load_runs(runs, device="cpu", alpha=None):
    """--run=A[,B,...]: -> (models, meta of the first). Several runs form a seed ensemble whose
    predictions are averaged; they must share genes, perturbation vocabulary, set size and output space."""
    names = [r for r in runs.split(",") if r]
    if not names:
        die("predict.py: --run=RUN_DIR[,RUN_DIR...] is required")
    if len(set(map(os.path.realpath, names))) < len(names):
        die(f"predict.py: --run={runs} names a run twice; an ensemble averages distinct runs")
    models, metas = zip(*(load_run(r, device, alpha) for r in names))
    m0 = metas[0]
    for r, m, mo in zip(names[1:], metas[1:], models[1:]):  # every member against the first, by name
        for k in ENSEMBLE_SAME:
            if m.get(k) != m0.get(k):
                die(f"predict.py: ensemble member {r} has another {k} than {names[0]}; an ensemble's members "
                    "must be trained on the same data, split, genes and recipe")
        if mo.cfg.set_size != models[0].cfg.set_size or (mo.decoder is None) != (models[0].decoder is None):
            die(f"predict.py: ensemble member {r} has another set size or decoder than {names[0]}")
    return list(models), m0


# what the members of an ensemble share (their inputs and outputs mean the same things)
ENSEMBLE_SAME = ("genes", "pert_names", "context_names", "batch_names", "genes_out", "gene_space", "key", "recipe",
                 "data_checksum", "split_hash", "control", "pert_col", "context_col", "combos", "combo_parts")


@torch.no_grad()
def predict_blocks(models, ctrl, windows, device, max_cells=8192, mix="mixture", dtype="float32"):
    """Predictions for `windows` in their order, one block of consecutive windows at a time (so a
    virtual screen of any size streams to disk): yields (outputs, latents) lists for the next block
    of windows. ctrl (N,Din) float32 control rows; windows: list of (idx into ctrl (n<=S,), pert code,
    batch codes (n,) or None, context code). Outputs are (n, Dout) float32 predictions (decoded genes
    when the model has a gene decoder); latents the (n, Dout) embedding predictions before the decoder
    (None without one). Several `models` (a seed ensemble): mix="mixture" takes each predicted cell
    from one member (cell j of window i from member (i + j) mod M), so the ensemble keeps its members'
    per-cell spread; mix="shift" averages the members' set means (the shift) and adds each cell's
    residual from its set mean in one member (the spread of one member, no between-member variance);
    mix="mean" averages the members per cell (which shrinks the spread and was measured to lower the
    DE metrics). Windows of one length are batched together (key-padding lens), never padded with cells.
    dtype="bfloat16": the forward under bf16 autocast (about 3x faster on CPUs with bf16 units, outputs
    within ~1e-2 of fp32; float32, the default, is the parity-tested path)."""
    models = models if isinstance(models, (list, tuple)) else [models]
    model = models[0]
    bs = max(1, max_cells // model.cfg.set_size)
    for a in range(0, len(windows), bs):
        block = range(a, min(a + bs, len(windows)))
        out, lat = {}, {}
        for L in sorted({len(windows[i][0]) for i in block}, reverse=True):
            ids = [i for i in block if len(windows[i][0]) == L]
            x = torch.zeros(len(ids), L, ctrl.shape[1])
            bt = torch.zeros(len(ids), L, dtype=torch.int64)
            pert = torch.tensor([windows[i][1] for i in ids], dtype=torch.int64)
            ctx = torch.tensor([windows[i][3] for i in ids], dtype=torch.int64)
            for j, i in enumerate(ids):
                w = windows[i]
                x[j] = torch.from_numpy(ctrl[w[0]])
                if w[2] is not None:
                    bt[j] = torch.as_tensor(w[2])
            x, bt, pert, ctx = x.to(device), bt.to(device), pert.to(device), ctx.to(device)
            with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=dtype == "bfloat16"):
                ys = [m(x, pert, batch=bt if m.cfg.n_batch else None, ctx=ctx).float() for m in models]
            M = len(models)
            pick = (torch.tensor(ids)[:, None] + torch.arange(L)[None, :]) % M  # (n_w, L) member per cell

            def combine(t):  # (M, n_w, L, D) -> (n_w, L, D)
                t = t.float()
                if M == 1 or mix == "mean":
                    return t.mean(0)
                one = lambda u: u.gather(0, pick.to(u.device)[None, :, :, None].expand(1, -1, -1, u.shape[-1]))[0]
                if mix == "shift":  # the members' set means averaged, each cell's residual from one member
                    mu = t.mean(2, keepdim=True).expand_as(t)  # (M, n_w, L, D): each member's set mean
                    return one(t) - one(mu) + mu.mean(0)
                return one(t)
            if model.decoder is not None:
                lat.update(zip(ids, combine(torch.stack(ys)).cpu().numpy()))
                with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=dtype == "bfloat16"):
                    ys = [m.decode(yy).float() for m, yy in zip(models, ys)]
            out.update(zip(ids, combine(torch.stack(ys)).cpu().numpy()))
        yield [out[i] for i in block], ([lat[i] for i in block] if lat else None)


def predict_windows(models, ctrl, windows, device, max_cells=8192, return_latent=False, mix="mixture",
                    dtype="float32"):
    """All of predict_blocks' outputs as one list (and the latents with return_latent=True)."""
    out, lat = [], []
    for o, z in tqdm(predict_blocks(models, ctrl, windows, device, max_cells, mix, dtype), desc="predict", unit="block",
                     leave=False, disable=not sys.stderr.isatty() and os.environ.get("TQDM", "") != "1"):
        out += o
        lat += z or []
    return (out, lat or None) if return_latent else out


def make_windows(n, S):
    """Sizes of ceil(n/S) windows of at most S cells (the last one short, reference)."""
    return [min(S, n - a) for a in range(0, n, S)]


def spread_report(rows):
    """rows: list of (name, *state.eval.group_spread(pred, real, ctrl)) per group: per-gene std and mean
    shift of the predictions vs the real cells (the reference's predictions collapse: spread << 1)."""
    a = np.array([r[1:] for r in rows], dtype=np.float64)
    lines = [f"{'group':34s} {'spread':>7s} {'shift':>7s} {'mae_mean':>9s} {'delta_r':>8s}"]
    for r in rows[:12]:
        lines.append(f"{r[0][:34]:34s} {r[1]:7.3f} {r[2]:7.3f} {r[3]:9.4f} {r[4]:8.3f}")
    if len(rows) > 12:
        lines.append(f"... ({len(rows) - 12} more)")
    med = np.nanmedian(a, 0)
    lines.append(f"{'median over ' + str(len(rows)) + ' groups':34s} {med[0]:7.3f} {med[1]:7.3f} "
                 f"{med[2]:9.4f} {med[3]:8.3f}")
    lines.append("spread = mean per-gene std of predicted / real cells (1 = same heterogeneity; the "
                 "reference collapses toward 0); shift = |mean(pred)-mean(ctrl)| / |mean(real)-mean(ctrl)|; "
                 "mae_mean = mean |mean(pred)-mean(real)| per gene; delta_r = pearson of the two deltas")
    return "\n".join(lines), med

# -----------------------------------------------------------------------------
# test: replay the split's test groups


def cmd_test(argv):
    cfg = {"run": "", "data": "", "split": "", "out": "", "seed": 0, "device": "cpu",
           "clip": True, "max_cells": 8192, "allow_other_split": False, "allow_other_data": False,
           "ensemble": "mixture", "alpha": "", "dtype": "float32", "center": True}
    configure(argv, cfg)
    check_options(cfg, "predict.py test")
    alpha = check_alpha(cfg["alpha"], "predict.py test")
    if not cfg["out"]:
        die("predict.py test: --out=FOLDER is required (pred.h5ad and real.h5ad are written there)")
    output_folder(cfg["out"], [cfg["data"]], "predict.py test")  # not a file, the data or a prepared folder
    for f in ("pred.h5ad", "real.h5ad"):
        output_file(os.path.join(cfg["out"], f), [cfg["split"]], "predict.py test")
    from state.baselines import control_pools, recentre
    models, meta = load_runs(cfg["run"], cfg["device"], alpha)
    model = models[0]
    D, sp = test_data(cfg, meta, model)
    # a run with a gene decoder (ST on an embedding): predictions and real cells in GENE space (the
    # decoder's genes, the stored gene matrix G.bin of the same cells); embeddings kept in obsm
    dec = model.decoder is not None
    out_genes = list(meta["genes_out"]) if dec else list(D.genes)
    gene_rows = D.rows_genes if dec else D.rows
    S = model.cfg.set_size
    plan, ctrl_rows_all = test_plan(D, sp, S, cfg["seed"])
    ctrlX = D.rows(ctrl_rows_all)  # (Nc, G)
    clip = cfg["clip"] and (model.cfg.gene_space or dec)  # never clip signed embedding outputs
    ctrl_rows = np.sort(np.asarray(sp.test_ctrl, dtype=np.int64))
    Xc, cctx = gene_rows(ctrl_rows), D.context[ctrl_rows]  # the held-out controls (in both files)
    if cfg["center"]:  # (G,) per context: the mean of the training controls the draws come from
        mu = {c: gene_rows(pool).mean(0, dtype=np.float64) for c, pool in control_pools(D, sp).items()}
    n_pred = sum(len(g[2]) for g in plan)
    # obs columns as categorical codes (no string per cell): predicted cells then the real controls
    gp = np.concatenate([np.full(len(g[2]), g[1]) for g in plan] + [D.pert[ctrl_rows]]).astype(np.int64)
    gc = np.concatenate([np.full(len(g[2]), g[0]) for g in plan] + [cctx]).astype(np.int64)
    ucn, cinv = np.unique(D.names(ctrl_rows_all), return_inverse=True)  # control barcodes as categories
    at = {int(r): i for i, r in enumerate(ctrl_rows_all)}
    cb = np.array([cinv[at[int(r)]] for g in plan for r in g[4]] + [cinv[at[int(r)]] for r in ctrl_rows], np.int64)
    obs = {D.pert_col: Cat(gp, D.pert_names), (D.context_col or "context"): Cat(gc, D.context_names)}
    isp = np.concatenate([np.ones(n_pred, bool), np.zeros(len(ctrl_rows), bool)])
    spread_rows, timing = [], [0.0, 0]

    def pred_blocks():
        """Each group's predictions (and its spread against the real cells), then the real controls."""
        a = 0
        for c, p, rows, wins, drawn in plan:
            t0 = time.perf_counter()
            ys, zs = [], []
            for y, z in predict_blocks(models, ctrlX, wins, cfg["device"], cfg["max_cells"], cfg["ensemble"],
                                       cfg["dtype"]):
                ys += y
                zs += z or []
            timing[0] += time.perf_counter() - t0
            timing[1] += len(wins)
            P = np.concatenate(ys).astype(np.float32)
            if cfg["center"]:  # the group's mean no longer carries which controls it started from
                P = recentre(P, gene_rows(drawn).mean(0, dtype=np.float64), mu[int(c)])
            if clip:
                P = np.clip(P, 0.0, 14.0)
            name = f"{D.context_names[c]} / {D.pert_names[p]}"
            spread_rows.append((name, *group_spread(P, gene_rows(rows), Xc[cctx == c])))
            b = {"X": P, "obs_names": [f"pred_{i}" for i in range(a, a + len(P))]}
            if dec:  # embedding predictions next to the decoded genes
                b["obsm/X_state_pred"] = np.concatenate(zs)
            a += len(P)
            yield b
        yield {"X": Xc, "obs_names": D.names(ctrl_rows), **({"obsm/X_state_pred": D.rows(ctrl_rows)} if dec else {})}

    def real_blocks():
        for _, _, rows, _, _ in plan:
            yield {"X": gene_rows(rows), "obs_names": D.names(rows), **({"obsm/X_state": D.rows(rows)} if dec else {})}
        yield {"X": Xc, "obs_names": D.names(ctrl_rows), **({"obsm/X_state": D.rows(ctrl_rows)} if dec else {})}

    labels = (D.pert_col, D.control, D.context_col or "context")
    space = "gene (decoded)" if dec else ("gene" if model.cfg.gene_space else "embedding")
    info = {"seed": cfg["seed"], "ensemble": cfg["ensemble"] if "," in cfg["run"] else None, "dtype": cfg["dtype"],
            "clip": "0,14" if clip else "none", "center": bool(cfg["center"]), "space": space, "key": meta.get("key", "X"),
            "genes_key": meta.get("genes_key") if dec else None}
    N, G = n_pred + len(ctrl_rows), len(out_genes)
    need_space(os.path.join(cfg["out"], "pred.h5ad"), 2 * (4 * N * (G + (D.n_genes if dec else 0)) + 64 * N),
               "predict.py test")
    with staged_folder(cfg["out"]) as d:  # the pair (and spread.txt) or none: a failure leaves --out as it was
        write_cells(os.path.join(d, "pred.h5ad"),
                    Stream(N, {"X": G, **({"obsm/X_state_pred": D.n_genes} if dec else {})}, pred_blocks(), "predict"),
                    out_genes, {**obs, "is_predicted": isp, "ctrl_cell_barcode": Cat(cb, ucn)}, labels,
                    sources(cfg["run"]), **info)
        write_cells(os.path.join(d, "real.h5ad"),
                    Stream(N, {"X": G, **({"obsm/X_state": D.n_genes} if dec else {})}, real_blocks()),
                    out_genes, {**obs, "is_predicted": np.zeros(N, bool)}, labels, "real",
                    **{**info, "clip": "none", "space": "gene" if dec else space})
        text = spread_report(spread_rows)[0] if spread_rows else None
        if text:
            with open(os.path.join(d, "spread.txt"), "w") as f:
                f.write(text + "\n")
    print(f"predicted {n_pred:,} cells in {len(plan)} test groups ({timing[1]} sets, S {S}) in "
          f"{timing[0]:.1f}s -> {cfg['out']}/pred.h5ad, real.h5ad ({len(ctrl_rows):,} real controls in both; "
          "written group by group)"
          + (f"; gene space: {len(out_genes)} decoded genes ('{meta.get('genes_key')}'), embedding "
             "predictions in obsm['X_state_pred']" if dec else ""))
    if text:  # spread / shift report
        print(text)
    return cfg["out"]


def sources(runs):
    """uns['nanostate']['source'] of a prediction: the run folders, absolute, comma-separated."""
    return ",".join(os.path.abspath(r) for r in runs.split(","))


def test_data(cfg, meta, model):
    """The prepared data and split of `predict.py test`, checked against the run: -> (Prepared, Split)."""
    from state.data import Prepared
    from state.splits import Split
    D, sp = Prepared(cfg["data"]), Split.load(cfg["split"])
    try:  # the split must index this prepared data (checksum, rows, groups)
        sp.validate(D)
    except ValueError as e:
        die(f"predict.py: split {cfg['split']} does not fit the data {cfg['data']}: {e}")
    if meta.get("split_hash") and not cfg["allow_other_split"]:
        import hashlib
        h = hashlib.sha256(open(cfg["split"], "rb").read()).hexdigest()[:16]
        if h != meta["split_hash"]:
            die(f"predict.py: {cfg['split']} is not the split the run was trained on ({meta.get('split')}); "
                     "its test groups may be training groups of the run. --allow_other_split=True to go on")
    if list(D.genes) != list(meta["genes"]):
        die("predict.py: the prepared data's genes differ from the run's (order included)")
    if D.checksum != meta["data_checksum"] and not cfg["allow_other_data"]:
        die(f"predict.py: {cfg['data']}: its checksum {D.checksum} is not the run's {meta['data_checksum']}: "
            "the folder was re-prepared (other cells, groups or recipe) since the run trained; predict on "
            "the data the run was trained on, or --allow_other_data=True to go on")
    if list(D.pert_names) != list(meta["pert_names"]):
        die("predict.py: the data's perturbation vocabulary differs from the run's")
    if model.decoder is not None and (D.G is None or list(D.gene_names_out) != list(meta.get("genes_out") or [])):
        die("predict.py: the run has a gene decoder but the prepared data has no gene targets with "
                 "the run's output genes (prepare with the run's --genes-key)")
    return D, sp


def test_plan(D, sp, S, seed):
    """Per test group, in sorted (context, perturbation) order: (context, perturbation, real rows, windows of
    at most S of the baselines' control draws, the drawn controls), and the control rows the windows index."""
    from state.baselines import control_draws
    test = np.asarray(sp.test, dtype=np.int64)
    assert not (D.pert[test] == D.control_code).any(), "a split's test part holds perturbed groups only"
    try:  # the baselines' draws: the same control cells start every method's predictions
        draws = control_draws(D, sp, seed)
    except ValueError as e:
        die(f"predict.py test: {e}")
    keys = sorted({(int(c), int(p)) for c, p in zip(D.context[test], D.pert[test])})
    ctrl_rows = np.unique(np.asarray(sp.test_ctrl, dtype=np.int64))
    pos = {int(r): i for i, r in enumerate(ctrl_rows)}
    plan = []
    for c, p in keys:
        m = (D.context[test] == c) & (D.pert[test] == p)
        rows, drawn, a, wins = test[m], draws[m], 0, []
        for n in make_windows(len(rows), S):
            draw, a = drawn[a:a + n], a + n
            wins.append((np.array([pos[int(r)] for r in draw]), p, D.batch[draw], c))
        plan.append((c, p, rows, wins, drawn))
    return plan, ctrl_rows

# -----------------------------------------------------------------------------
# simulate: a virtual screen from control cells


def apply_recipe(x, meta, path, key, gene_space, obs_names, names=None, allow_missing=0.0):
    """Control rows x (N, G_file) of a user's file, columns `names` -> the run's input scale, or a one-line
    error naming what was found and what the run expects. Every row is checked (state.scale.check_rows),
    not a sample. Gene-valued runs: raw counts are normalised to the run's target_sum with each cell's
    library size summed over the genes the recipe names (recipe['libsize_genes']: None = the run's own
    genes, a list = those genes, e.g. all genes of the file prepare read before keeping HVGs; runs that
    predate the key: the file's genes), then log1p'd; log1p values normalised to another target sum are
    rescaled exactly to the run's (log1p(expm1(x) * ts / ts_file)); log1p values at the run's sum are
    taken as they are. Embedding runs take the embedding (same SE checkpoint) as it is."""
    from state.scale import check_rows, classify, recipe_scaling
    r = meta.get("recipe") or {}
    where = f"predict.py simulate: {path}: '{key}'"

    def cell(a):  # names block row i of the block starting at row a
        return lambda i: f"'{obs_names[a + i]}' (row {a + i})" if obs_names is not None else f"row {a + i}"
    if not gene_space:  # an embedding: the run's key must be an embedding of the same SE model
        if not str(key).startswith("obsm/"):
            die(f"predict.py simulate: the run was trained on the embedding '{meta.get('key')}'"
                f"{' of SE ' + r['se_hash'] if r.get('se_hash') else ''} but '{key}' of {path} is gene "
                "expression; embed the controls with that SE checkpoint (embed.py transform) and pass "
                "--key=obsm/X_state")
        check_rows(x, "any", where, cell(0))
        return x
    names = [f"{i}" for i in range(x.shape[1])] if names is None else names
    dup = sorted({g for g, k in zip(*np.unique(np.asarray(names, dtype=str), return_counts=True)) if k > 1})
    if dup:
        die(f"{where}: {len(dup)} gene names occur more than once (e.g. {dup[:5]}); the run's genes are "
            "matched by name: make the names unique (e.g. sum or drop the duplicates) first")
    check_rows(x[:20000], "any", where, cell(0))  # the rows the scale is read from; then every row below
    if (x < 0).any():
        i = np.flatnonzero((x < 0).any(1))[0]
        die(f"predict.py simulate: '{key}' of {path} has negative values (e.g. cell '{obs_names[i]}'): "
            "scaled/z-scored data; the run expects raw counts or non-negative log1p expression")
    sc = classify(x[:20000], where)  # the scale, from the first rows; then every row is checked
    for a in range(0, len(x), 20000):
        check_rows(x[a:a + 20000], sc.kind if sc.kind in ("counts", "log1p") else "any", where, cell(a))
    want = r.get("target_sum")
    if sc.kind == "log1p" and r.get("log1p", True):
        if want and sc.target_sum and abs(sc.target_sum / want - 1) > 0.05:
            print(f"input: log1p of counts normalised to {sc.target_sum:g} -> rescaled to the run's target_sum "
                  f"{want:g} (log1p(expm1(x) * {want / sc.target_sum:.4g}))")
            x = np.expm1(np.asarray(x, np.float32)) * np.float32(want / sc.target_sum)
            return np.log1p(x, out=x)
        return x
    try:
        ts = recipe_scaling(x[:20000], r, where)
    except ValueError as e:
        die(str(e))
    if ts is None:
        return x
    over = r.get("libsize_genes", "file")
    if over == "file":
        cols, said = np.arange(x.shape[1]), f"the file's {x.shape[1]} genes (the run records no library-size genes)"
    else:
        over = list(meta["genes"]) if over is None else list(over)
        at = {g: i for i, g in enumerate(names)}
        cols = np.array([at[g] for g in over if g in at], np.int64)
        lack = len(over) - len(cols)
        if lack > allow_missing * len(over):
            die(f"{where}: {lack}/{len(over)} of the genes the run's library sizes were summed over are missing "
                f"(e.g. {[g for g in over if g not in at][:5]}): raw counts cannot be normalised as in training; "
                "give the full count matrix, log1p values, or --allow_missing_genes=FRACTION")
        said = f"the run's {len(cols)} library-size genes" + (f" ({lack} missing)" if lack else "") + \
            (f"; {x.shape[1] - len(cols)} other genes of the file left out" if x.shape[1] > len(cols) else "")
    tot = x[:, cols].sum(1, dtype=np.float64)
    if (tot <= 0).any():
        die(f"{where}: control cell '{obs_names[np.argmax(tot <= 0)]}' has no counts over those genes")
    print(f"input: raw counts (median total {np.median(tot):g} over {said}) -> normalised to the run's "
          f"target_sum {ts:g} and log1p'd, as its training data were")
    x = np.array(x, np.float32)
    x *= (ts / tot).astype(np.float32)[:, None]
    return np.log1p(x, out=x)


def extend_combos(models, meta, vocab, labels):
    """A run trained with --combos reads any combination of the singles it knows: append the
    multi-hot rows of `labels` (combo_reduce as in training) to every model's perturbation table and
    give them codes in `vocab`. One-hot runs only (the parts' feature vectors are not stored); an
    anchored run has no baseline shift for a new label; a part the run never saw is an error."""
    sep, parts = meta["combos"], meta["combo_parts"]
    col = {q: i for i, q in enumerate(parts)}
    # well-formed labels ('A+A', '+A', 'control+A' refused) with no more parts than any label it trained on
    most = max(len(parts_of(n, sep)) for n in meta["pert_names"] if n != meta["control"])
    check_combo_labels(labels, sep, meta["control"], max_parts=most, where="predict.py simulate: --perts",
                       fix=f"the run trained on labels of at most {most} parts; screen those")
    for lab in labels:
        unknown = [q for q in parts_of(lab, sep) if q not in col]
        if unknown:
            die(f"predict.py simulate: combination '{lab}' has the single(s) {unknown} that the run never "
                     f"saw (it knows {len(parts) - 1}: {parts[1:21]}{' ...' if len(parts) > 21 else ''})")
    if meta.get("pert_features"):
        die(f"predict.py simulate: {labels[:5]} are not in the run's vocabulary; a run with perturbation "
                 "features stores the labels' vectors, not its parts', so new combinations need a run "
                 "without --pert_features (multi-hot) or the labels in the training data")
    if models[0].cfg.anchor != "none":
        die(f"predict.py simulate: {labels[:5]} are not in the run's vocabulary and the run is anchored "
                 f"(--anchor={models[0].cfg.anchor}): a new label has no baseline shift; use a run without "
                 "--anchor to screen new combinations")
    split = [parts_of(lab, sep) for lab in labels]
    rows = multi_hot(split, parts)
    if meta.get("combo_reduce") == "mean":
        rows = rows / torch.tensor([len(ps) for ps in split], dtype=torch.float32)[:, None]
    for m in models:
        m.pert_table = torch.cat([m.pert_table, rows.to(m.pert_table)])
    for i, lab in enumerate(labels):
        vocab[lab] = len(vocab)
    print(f"new combinations from their singles: {labels[:10]}{' ...' if len(labels) > 10 else ''}")


def screen_perts(perts, models, meta):
    """--perts (A,B or a file of one label a line) -> (the labels, the run's vocabulary {label: code}); a
    run trained on combinations gives new combinations of its singles codes (extend_combos)."""
    vocab = {n: i for i, n in enumerate(meta["pert_names"])}
    if os.path.exists(perts):
        perts = [l.strip().split("\t")[0] for l in open(perts) if l.strip()]
    else:
        perts = [p for p in perts.split(",") if p]
    if not perts:
        die("predict.py simulate: --perts=A,B or a file with one perturbation per line")
    bad = [p for p in perts if p not in vocab]
    if bad and meta.get("combos"):
        extend_combos(models, meta, vocab, bad)  # new combinations of known singles get codes
        bad = [p for p in perts if p not in vocab]
    if bad:
        die(f"predict.py simulate: {len(bad)} perturbations are not in the run's vocabulary "
                 f"({len(vocab)} names): {bad[:20]}")
    return perts, vocab


def read_controls(cfg, meta, model):
    """The control cells of --adata on the run's input scale (apply_recipe) and in its gene order (missing
    genes zero-filled up to --allow_missing_genes): -> (X (N, the run's genes), the real controls in the
    output space (the decoder's genes from --genes_key, else X), the output genes, each cell's context,
    batch code and name)."""
    genes, dec = list(meta["genes"]), model.decoder is not None
    with H5AD(cfg["adata"]) as f:
        names = list(f.var_names())
        cols = f.columns()
        pcol = cfg["pert_col"] or meta["pert_col"]
        ctrl_label = cfg["control"] or meta["control"]
        keep = np.arange(f.n_obs)
        if pcol in cols:
            keep = np.flatnonzero(np.asarray(f.column(pcol)).astype(str) == ctrl_label)
            if len(keep) == 0:
                die(f"predict.py simulate: no '{ctrl_label}' cells in column '{pcol}'")
        elif not cfg["all_controls"]:
            die(f"predict.py simulate: {cfg['adata']} has no perturbation column '{pcol}', so its control "
                     f"cells cannot be told from perturbed ones; pass --pert_col=COLUMN, or "
                     "--all_controls=True if every cell is an unperturbed control")
        ccol = cfg["context_col"] or meta.get("context_col") or ""
        ctx = np.asarray(f.column(ccol)).astype(str)[keep] if ccol in cols else np.array(["all"] * len(keep))
        bcol = meta.get("batch_col")
        bnames = {n: i for i, n in enumerate(meta.get("batch_names", []))}
        bt = np.zeros(len(keep), np.int64)
        if model.cfg.n_batch and bcol in cols:
            bt = np.array([bnames.get(b, 0) for b in np.asarray(f.column(bcol)).astype(str)[keep]])
        obs_names = np.asarray(f.obs_names, dtype=object)[keep]
        Xin = f.matrix(cfg["key"]).rows(keep)  # (N, G_file)
        if cfg["key"].startswith("obsm/"):  # columns named as prepare names them (genes of X_hvg, X_state_0 ..)
            from state.inputs import obsm_names
            names = list(obsm_names(f, cfg["key"][5:], Xin.shape[1]))
        if dec:  # the controls' genes (decoder output space), mapped by name below
            gnames, Gin = list(f.var_names()), f.matrix(cfg["genes_key"]).rows(keep)
    # the run's recipe applied to the input (meta["recipe"], from prepare): raw counts are normalised and
    # log1p'd as the training data were, log1p values are taken as they are, anything else is refused
    Xin = apply_recipe(Xin, meta, cfg["adata"], cfg["key"], model.cfg.gene_space, obs_names, names,
                       cfg["allow_missing_genes"])
    # map genes by name to the run's ordered list
    where = {g: i for i, g in enumerate(names)}
    miss = [g for g in genes if g not in where]
    if len(miss) > cfg["allow_missing_genes"] * len(genes):
        die(f"predict.py simulate: {len(miss)}/{len(genes)} of the run's genes are missing from "
                 f"{cfg['adata']} (e.g. {miss[:10]}); --allow_missing_genes=FRACTION zero-fills them")
    if miss:
        print(f"WARNING: zero-filling {len(miss)} missing genes: {miss[:20]}")
    X = np.zeros((len(keep), len(genes)), np.float32)
    have = [i for i, g in enumerate(genes) if g in where]
    X[:, have] = Xin[:, [where[genes[i]] for i in have]]
    out_genes, Xout = genes, X
    if dec:
        out_genes = list(meta["genes_out"])
        gw = {g: i for i, g in enumerate(gnames)}
        gmiss = [g for g in out_genes if g not in gw]
        if len(gmiss) > cfg["allow_missing_genes"] * len(out_genes):
            die(f"predict.py simulate: {len(gmiss)}/{len(out_genes)} of the decoder's genes are missing "
                     f"from '{cfg['genes_key']}' of {cfg['adata']} (e.g. {gmiss[:10]})")
        Xout = np.zeros((len(keep), len(out_genes)), np.float32)
        gh = [i for i, g in enumerate(out_genes) if g in gw]
        Xout[:, gh] = Gin[:, [gw[out_genes[i]] for i in gh]]
        if float(Xout.max(initial=0)) > 30 and np.allclose(Xout[:1000], np.round(Xout[:1000])):
            die(f"predict.py simulate: '{cfg['genes_key']}' looks like raw counts; the real controls must "
                     "be log1p values on the decoder's scale (--genes_key=...)")
    return X, Xout, out_genes, ctx, bt, obs_names


def cmd_simulate(argv):
    cfg = {"run": "", "adata": "", "perts": "", "out": "", "n_cells": 0, "seed": 0, "device": "cpu",
           "key": "", "genes_key": "", "context_col": "", "pert_col": "", "control": "", "clip": True,
           "allow_missing_genes": 0.0, "max_cells": 8192, "all_controls": False, "ensemble": "mixture",
           "dtype": "float32", "center": True}
    configure(argv, cfg)
    check_options(cfg, "predict.py simulate")
    if not cfg["adata"] or not cfg["run"]:
        die("predict.py simulate: --run=RUN_DIR and --adata=CONTROLS.h5ad are required")
    out = cfg["out"] or os.path.join(cfg["run"].split(",")[0], "predictions",
                                     os.path.basename(cfg["adata"]).rsplit(".", 1)[0] + "_pred.h5ad")
    runs_files = [os.path.join(r, f) for r in cfg["run"].split(",") if r for f in ("meta.json", "model.safetensors")]
    out = output_file(out, [cfg["adata"], cfg["perts"], *runs_files], "predict.py simulate")
    stale_tmp(out)  # temp files of killed screens at this path
    models, meta = load_runs(cfg["run"], cfg["device"])
    model = models[0]
    dec = model.decoder is not None
    # the input matrix: --key, else the run's key when it is an embedding (obsm/X_state), else X; with a
    # gene decoder the real controls are written in gene space from --genes_key (default: the run's)
    cfg["key"] = cfg["key"] or (meta.get("key") if str(meta.get("key", "")).startswith("obsm/") else "X")
    cfg["genes_key"] = cfg["genes_key"] or (meta.get("genes_key") or "X")
    S = model.cfg.set_size
    perts, vocab = screen_perts(cfg["perts"], models, meta)
    X, Xout, out_genes, ctx, bt, obs_names = read_controls(cfg, meta, model)
    rng = np.random.default_rng(cfg["seed"])
    windows, info = [], []
    cvocab = {n: i for i, n in enumerate(meta.get("context_names", []))}
    if model.cfg.anchor != "none":  # the anchor's shift is per training context
        unknown = sorted(set(ctx) - set(cvocab))
        if unknown:
            die(f"predict.py simulate: the run is anchored on per-context baseline shifts and contexts "
                     f"{unknown[:10]} are not among its {len(cvocab)} contexts ({list(cvocab)[:10]}); set "
                     f"--context_col to a column holding the run's context names")
    for c in sorted(set(ctx)):
        pool = np.flatnonzero(ctx == c)
        n = cfg["n_cells"] or len(pool)
        for p in perts:
            drawn, a = draw_controls(pool, n, rng), 0
            for m in make_windows(n, S):
                draw, a = drawn[a:a + m], a + m
                windows.append((draw, vocab[p], bt[draw], cvocab.get(c, 0)))
                info.append((c, p, draw, drawn, pool))
    clip = cfg["clip"] and (model.cfg.gene_space or dec)  # never clip signed embedding outputs
    n_pred = sum(len(i[2]) for i in info)
    pc, cc = meta["pert_col"], meta.get("context_col") or "context"
    pl, cl = perts + [meta["control"]], sorted(set(ctx))
    ucn, cinv = np.unique(np.asarray(obs_names, dtype=str), return_inverse=True)  # barcodes as categories
    obs = {pc: Cat(np.concatenate([np.full(len(i[2]), pl.index(i[1])) for i in info]
                                  + [np.full(len(X), len(perts))]), pl),
           cc: Cat(np.concatenate([np.full(len(i[2]), cl.index(i[0])) for i in info] + [[cl.index(c) for c in ctx]]), cl),
           "is_predicted": np.concatenate([np.ones(n_pred, bool), np.zeros(len(X), bool)]),
           "ctrl_cell_barcode": Cat(np.concatenate([cinv[i[2]] for i in info] + [cinv]), ucn)}

    def blocks():
        """Predicted cells block by block, then the real controls: memory bounded by --max_cells."""
        from state.baselines import recentre
        a, w, last = 0, 0, (None,)
        for ys, zs in predict_blocks(models, X, windows, cfg["device"], cfg["max_cells"], cfg["ensemble"],
                                     cfg["dtype"]):
            if cfg["center"]:  # each group on the mean of its context's controls (its pool), as in test
                for i, y in enumerate(ys):
                    c, p, _, drawn, pool = info[w + i]
                    if last[0] != (c, p):  # windows come group by group: one group's means in memory
                        last = ((c, p), Xout[drawn].mean(0, dtype=np.float64), Xout[pool].mean(0, dtype=np.float64))
                    ys[i] = recentre(y, last[1], last[2])
                w += len(ys)
            P = np.concatenate(ys).astype(np.float32)
            if clip:
                P = np.clip(P, 0.0, 14.0)
            b = {"X": P, "obs_names": [f"pred_{i}" for i in range(a, a + len(P))]}
            if dec:
                b["obsm/X_state_pred"] = np.concatenate(zs)
            a += len(P)
            yield b
        yield {"X": Xout, "obs_names": obs_names, **({"obsm/X_state_pred": X} if dec else {})}

    cols = {"X": len(out_genes), "obs_names": 0, **({"obsm/X_state_pred": X.shape[1]} if dec else {})}
    need_space(out, 4 * (n_pred + len(X)) * sum(cols.values()) + 64 * (n_pred + len(X)), "predict.py simulate")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    write_cells(out, Stream(n_pred + len(X), cols, blocks(), progress="simulate"), out_genes, obs,
                (pc, meta["control"], cc), sources(cfg["run"]), seed=cfg["seed"],
                ensemble=cfg["ensemble"] if "," in cfg["run"] else None, dtype=cfg["dtype"],
                controls=os.path.abspath(cfg["adata"]), clip="0,14" if clip else "none", center=bool(cfg["center"]),
                space="gene (decoded)" if dec else ("gene" if model.cfg.gene_space else "embedding"),
                key=cfg["key"], genes_key=cfg["genes_key"] if dec else None)
    print(f"simulated {n_pred:,} cells ({len(perts)} perturbations x {len(set(ctx))} contexts) + "
          f"{len(X):,} real controls -> {out}")
    return out

# -----------------------------------------------------------------------------
# main


def with_label_defaults(argv):
    """Fill --pert_col/--control/--context_col from the pred file's uns['nanostate'] unless given."""
    from state.config import dashes
    argv = dashes(argv)
    pred = next((a.split("=", 1)[1] if "=" in a else argv[i + 1] for i, a in enumerate(argv)
                 if a.split("=", 1)[0] == "--pred"), None)
    if pred is None or not os.path.exists(pred):
        return argv
    with H5AD(pred) as f:
        u = f.uns("nanostate") or {}
    for flag, k in (("--pert_col", "pert_col"), ("--control", "control"), ("--context_col", "context_col")):
        if u.get(k) and not any(a.split("=", 1)[0] == flag for a in argv):
            argv += [flag, str(u[k])]
    return argv


def main(argv):
    if not argv or argv[0] not in ("test", "simulate", "eval", "report"):
        die(f"predict.py: {'unknown command ' + repr(argv[0]) if argv else 'no command'}; usage: predict.py "
            "test|simulate|eval|report --key=value ... (predict.py --help)")
    cmd, rest = argv[0], argv[1:]
    if cmd == "test":
        return cmd_test(rest)
    if cmd == "simulate":
        return cmd_simulate(rest)
    if cmd == "eval":
        from state import eval as ev  # lazy: written by the evaluator's owner
        return ev.main(with_label_defaults(rest))
    from state import baselines
    return baselines.main(rest)


if __name__ == "__main__":
    rc = run("predict.py", main, None, __doc__)
    from state.dist import quiet_exit
    quiet_exit(rc if isinstance(rc, int) else 0)
