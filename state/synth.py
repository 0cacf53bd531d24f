"""
A synthetic Perturb-seq-like dataset: negative-binomial counts whose perturbation effects are shared
across contexts (scaled per context), so a model can learn a perturbation in one context from the others.

    python -m state.synth OUT.h5ad [--n_cells=3600] [--n_genes=200] [--n_perts=12] [--n_contexts=3]
                          [--n-batches 2] [--seed 0] [--counts] [--compression gzip]

Model, per cell i of context k, perturbation p, batch j (p = 0 is the control):
    log rate_ig = mu_g + c_kg + s_kp * delta_pg + b_jg + log lib_i
    delta_pg: ~10% of genes moved by N(0, 1) plus the target gene knocked down (-2; perts are named after
              genes of the panel); s_kp ~ U(0.5, 1.5) is the context-specific effect size
    counts ~ Poisson(Gamma(shape=r, scale=rate/r)), r = 4 (negative binomial)
X = log1p(normalize_total(counts, 1e4)) (or the counts with --counts). obs: perturbation ('control'),
cell_type, batch. Cell order is shuffled, as in real files. Written in row chunks, CSR, so 10^6 cells fit.
"""

import os

import h5py
import numpy as np

from state.config import dashes
from state.errors import Parser, UserError, output_file
from state.h5ad import _attrs, _write_df, _write_uns


def make_synthetic(path, n_cells=3600, n_genes=200, n_perts=12, n_contexts=3, seed=0, counts=False,
                   n_batches=2, compression=None, chunk=5000):
    """Write the dataset described in the module docstring to `path`; returns the ground truth dict
    (effects delta (P+1, G), context scales s (K, P+1), labels)."""
    rng = np.random.default_rng(seed)
    G, P, K = n_genes, n_perts, n_contexts
    if P > G:
        raise UserError(f"n_perts {P} > n_genes {G}: perturbations are named after genes of the panel")
    genes = np.array([f"GENE{g:04d}" for g in range(G)])
    perts = np.array(["control"] + genes[:P].tolist())
    ctxs = np.array([f"ctx{chr(65 + k)}" if K <= 26 else f"ctx{k}" for k in range(K)])
    bats = np.array([f"b{j}" for j in range(n_batches)])
    mu = rng.normal(-1.5, 1.3, G)  # per-gene log mean, wide like real data
    c = rng.normal(0, 0.4, (K, G))  # context baseline shifts
    delta = np.zeros((P + 1, G))
    for p in range(1, P + 1):
        hit = rng.random(G) < 0.1
        delta[p, hit] = rng.normal(0, 1.0, hit.sum())
        delta[p, p - 1] = -2.0  # on-target knockdown
    s = rng.uniform(0.5, 1.5, (K, P + 1))
    bj = rng.normal(0, 0.1, (n_batches, G))
    # labels: cells spread over (context, pert) with +-30% jitter, then shuffled
    w = rng.uniform(0.7, 1.3, K * (P + 1))
    n_kp = np.maximum(2, np.round(w / w.sum() * n_cells)).astype(int)
    kp = np.repeat(np.arange(K * (P + 1)), n_kp)[rng.permutation(n_kp.sum())]
    N = len(kp)
    k_i, p_i = kp // (P + 1), kp % (P + 1)
    j_i = rng.integers(0, n_batches, N)
    lib = rng.lognormal(np.log(2000), 0.3, N) / np.exp(mu).sum()  # ~2000 UMIs per cell
    tmp = f"{path}.tmp{os.getpid()}"
    with h5py.File(tmp, "w") as f:
        _attrs(f, "anndata", "0.1.0")
        X = f.create_group("X")
        _attrs(X, "csr_matrix", "0.1.0")
        X.attrs["shape"] = np.array([N, G], np.int64)
        kw = dict(compression=compression, chunks=(1 << 16,), maxshape=(None,))
        dd = X.create_dataset("data", (0,), np.float32, **kw)
        di = X.create_dataset("indices", (0,), np.int32, **kw)
        indptr = [np.zeros(1, np.int64)]
        nnz = 0
        for a in range(0, N, chunk):
            b = min(a + chunk, N)
            lr = mu + c[k_i[a:b]] + s[k_i[a:b], p_i[a:b], None] * delta[p_i[a:b]] + bj[j_i[a:b]]  # (n, G)
            rate = np.exp(lr) * lib[a:b, None]
            x = rng.poisson(rng.gamma(4.0, rate / 4.0)).astype(np.float32)  # (n, G) NB counts
            if not counts:
                tot = np.maximum(x.sum(1, keepdims=True), 1)
                x = np.log1p(x * (1e4 / tot)).astype(np.float32)
            r, col = np.nonzero(x)
            v = x[r, col]
            dd.resize((nnz + len(v),)); dd[nnz:] = v
            di.resize((nnz + len(v),)); di[nnz:] = col.astype(np.int32)
            indptr.append(nnz + np.cumsum(np.bincount(r, minlength=b - a)))  # ends of rows a..b-1
            nnz += len(v)
        X.create_dataset("indptr", data=np.concatenate(indptr).astype(np.int64))
        _attrs(f.create_group("layers"), "dict", "0.1.0")
        obs = dict(perturbation=perts[p_i], cell_type=ctxs[k_i], batch=bats[j_i])
        _write_df(f, "obs", [f"cell{i:07d}" for i in range(N)], obs)
        _write_df(f, "var", genes, {})
        for k in ("obsm", "varm", "obsp", "varp"):
            _attrs(f.create_group(k), "dict", "0.1.0")
        u = f.create_group("uns")
        _attrs(u, "dict", "0.1.0")
        _write_uns(u, {"synthetic": {"seed": seed, "counts": bool(counts),
                                     "model": "NB counts, shared perturbation effects x context scale"}})
        if not counts:
            _write_uns(u, {"log1p": {"base": "e"}})
    os.replace(tmp, path)
    return dict(delta=delta, s=s, genes=genes, perts=perts, contexts=ctxs, n_cells=N)


def main(argv=None):
    ap = Parser(prog="python -m state.synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--n_cells", type=int, default=3600); ap.add_argument("--n_genes", type=int, default=200)
    ap.add_argument("--n_perts", type=int, default=12); ap.add_argument("--n_contexts", type=int, default=3)
    ap.add_argument("--n_batches", type=int, default=2); ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--counts", action="store_true", help="X holds raw counts instead of log1p")
    ap.add_argument("--compression", choices=["gzip", "lzf"], default=None)
    a = ap.parse_args(dashes(argv))
    small = min(a.n_cells, a.n_genes - 1, a.n_perts, a.n_contexts, a.n_batches)
    if small < 1 or a.n_cells < 2 * (a.n_perts + 1) * a.n_contexts:
        raise UserError(f"python -m state.synth: give n_genes >= 2, n_perts, n_contexts, n_batches >= 1 and n_cells "
                        f">= 2 x (n_perts + 1) x n_contexts = {2 * (a.n_perts + 1) * a.n_contexts} (every group gets "
                        "cells); got " + ", ".join(f"{k}={getattr(a, k)}" for k in
                                                    ("n_cells", "n_genes", "n_perts", "n_contexts", "n_batches")))
    output_file(a.out, [], "python -m state.synth", flag="OUT")
    t = make_synthetic(a.out, a.n_cells, a.n_genes, a.n_perts, a.n_contexts, a.seed, a.counts, a.n_batches,
                       a.compression)
    print(f"wrote {a.out}: {t['n_cells']} cells x {a.n_genes} genes, {a.n_contexts} contexts x "
          f"{a.n_perts} perturbations + control ({'counts' if a.counts else 'log1p'})")


if __name__ == "__main__":
    from state.errors import run
    run("python -m state.synth", main, None, __doc__)
