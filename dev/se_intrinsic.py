"""
Intrinsic SE check (issue 8): how well does a linear classifier predict a cell label from X_state,
compared with the same classifier on PCA of the HVGs?

    python dev/se_intrinsic.py --ckpt=runs/se_eval/tiny [--ckpt=runs/se_eval/untrained ...]

For each task (file, obs label column): embeddings from `embed.py transform` (to .npy), PCA (50 comps)
of the log1p top-2000-variance genes (all genes when the file has fewer), a multinomial logistic
regression (torch, standardised features, L2, full-batch L-BFGS), 5-fold stratified CV; prints
accuracy and macro-F1 (mean over folds), and the majority-class accuracy.
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import embed  # noqa: E402
from state.h5ad import H5AD  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
TASKS = [("kang2018_ifnb_pbmc_muscat_counts.h5ad", "cell_type"),
         ("kang2018_ifnb_pbmc_muscat_counts.h5ad", "perturbation"),
         ("papalexi2021_thp1_eccite_sceptre.h5ad", "target_gene"),
         ("perturbench_devel_norman19_mcfaline23.h5ad", "perturbation"),
         ("perturbench_devel_norman19_mcfaline23.h5ad", "cell_type")]


def logreg_cv(Z, y, folds=5, wd=1e-3, seed=0):
    rng = np.random.default_rng(seed)
    K = int(y.max()) + 1
    fold = np.zeros(len(y), int)
    for c in range(K):  # stratified folds
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = np.arange(len(idx)) % folds
    accs, f1s = [], []
    for f in range(folds):
        tr, te = fold != f, fold == f
        mu, sd = Z[tr].mean(0), Z[tr].std(0) + 1e-6
        Xtr = torch.tensor((Z[tr] - mu) / sd, dtype=torch.float64)
        Xte = torch.tensor((Z[te] - mu) / sd, dtype=torch.float64)
        ytr = torch.tensor(y[tr])
        W = torch.zeros(Z.shape[1], K, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(K, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], lr=1, max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(Xtr @ W + b, ytr) + wd * (W * W).sum()
            loss.backward()
            return loss
        opt.step(closure)
        p = (Xte @ W + b).argmax(1).numpy()
        t = y[te]
        accs.append((p == t).mean())
        f1 = []
        for c in np.unique(t):
            tp = ((p == c) & (t == c)).sum()
            prec = tp / max(1, (p == c).sum())
            rec = tp / max(1, (t == c).sum())
            f1.append(0 if tp == 0 else 2 * prec * rec / (prec + rec))
        f1s.append(np.mean(f1))
    return float(np.mean(accs)), float(np.mean(f1s))


def pca_hvg(path, n_hvg=2000, k=50):
    with H5AD(path) as h:
        X = h.matrix("X").block(0, h.n_obs)  # these files are small; X is log1p already
    v = X.var(0)
    X = X[:, np.argsort(-v)[:min(n_hvg, X.shape[1])]]
    X = X - X.mean(0)
    U, S, _ = np.linalg.svd(X, full_matrices=False)
    return U[:, :k] * S[:k]


def main(argv):
    torch.set_num_threads(1)
    ckpts = [a.split("=", 1)[1] for a in argv if a.startswith("--ckpt=")]
    out = "runs/se_eval/npy"
    os.makedirs(out, exist_ok=True)
    rows = []
    for fn, col in TASKS:
        path = os.path.join(DATA, fn)
        with H5AD(path) as h:
            lab = np.asarray([str(v) for v in h.column(col)])
        names, y = np.unique(lab, return_inverse=True)
        feats = {"PCA50(HVG)": pca_hvg(path)}
        for c in ckpts:
            o = os.path.join(out, f"{os.path.basename(c)}_{fn[:-5]}.npy")
            if not os.path.exists(o):
                embed.main(["transform", f"--ckpt={c}", path, f"--output={o}", "--threads=1"])
            feats[f"SE {os.path.basename(c)}"] = np.load(o)
        maj = np.bincount(y).max() / len(y)
        for name, Z in feats.items():
            acc, f1 = logreg_cv(Z, y)
            rows.append((fn.split("_")[0], col, len(names), name, Z.shape[1], acc, f1, maj))
            print(f"{fn.split('_')[0]:12s} {col:13s} K={len(names):2d} {name:22s} dim {Z.shape[1]:4d} "
                  f"acc {acc:.3f} macroF1 {f1:.3f} (majority {maj:.3f})", flush=True)
    return rows


if __name__ == "__main__":
    from state.errors import run
    run("dev/se_intrinsic.py", main, None, __doc__)
