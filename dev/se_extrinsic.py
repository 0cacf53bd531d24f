"""
Extrinsic SE check (issue 8): ST trained on X_state vs ST trained on genes, same split, scored in gene
space. ST on embeddings predicts X_state rows; until train.py has its gene decoder, they are mapped to
genes with the SE's own expression decoder (`StateEmbedding.expression`, rda = --rda).

    python dev/se_extrinsic.py --se=runs/se_eval/tiny2k --pred=runs/se_eval/test_se/pred.h5ad \
        --real_emb=runs/se_eval/test_se/real.h5ad --genes_like=runs/se_eval/test_x/real.h5ad \
        --out=runs/se_eval/test_se_dec [--rda=4.0]

Writes OUT/pred.h5ad (decoded ST prediction) and OUT/real_dec.h5ad (the real test cells' X_state decoded
by the same decoder: what the decoder path could reach with a perfect ST), both over the genes of
--genes_like, with the obs and uns of the inputs, for `python predict.py eval`.
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from state.h5ad import H5AD, write_h5ad  # noqa: E402
from state.se import load_model, norm_gene  # noqa: E402


def decode(model, path, genes_vocab, rda, out, genes):
    with H5AD(path) as h:
        X = torch.from_numpy(h.matrix("X").block(0, h.n_obs))
        obs = {c: h.column(c) for c in h.columns("obs")}
        names, uns = h.obs_names, h.uns("nanostate")
    model.cfg.rda_infer = rda
    with torch.no_grad():
        Y = torch.cat([model.expression(X[a:a + 256], genes_vocab) for a in range(0, len(X), 256)])
    Y = Y.clamp(0, 14).numpy().astype(np.float32)
    uns = dict(uns or {}, source=f"{uns.get('source', '') if uns else ''} + SE decoder (rda {rda})")
    write_h5ad(out, Y, names, genes, obs=obs, uns={"nanostate": uns})
    return Y


def main(argv):
    a = dict(x.lstrip("-").split("=", 1) for x in argv)
    model, meta = load_model(a["se"])
    with H5AD(a["genes_like"]) as h:
        genes = list(h.var_names())
    lut = {g: i for i, g in enumerate(model.genes)}
    ids = torch.tensor([lut[norm_gene(g)] for g in genes])  # every gene must be in the SE vocabulary
    os.makedirs(a["out"], exist_ok=True)
    rda = float(a.get("rda", model.cfg.rda_infer))
    decode(model, a["pred"], ids, rda, os.path.join(a["out"], "pred.h5ad"), genes)
    decode(model, a["real_emb"], ids, rda, os.path.join(a["out"], "real_dec.h5ad"), genes)
    print(f"wrote {a['out']}/pred.h5ad and real_dec.h5ad ({len(genes)} genes, SE {meta['se_hash']}, rda {rda})")


if __name__ == "__main__":
    from state.errors import run
    run("dev/se_extrinsic.py", main, None, __doc__)
