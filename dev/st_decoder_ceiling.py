"""Decoder ceiling for an ST run with a gene decoder: decode the REAL test cells' embeddings
(real.h5ad obsm['X_state'], written by predict.py test) with the run's trained gene decoder and write a
pred.h5ad of the same layout (real controls copied through). Caveat: the decoder is trained on ST's
PREDICTED latents only (reference; no detach_decoder with ground-truth latents), so real embeddings can be
out of distribution for it and this is not a true ceiling (dev/LOG.md, SE extrinsic with the ST decoder).

    python dev/st_decoder_ceiling.py --run=RUN --test=TEST_DIR --out=OUT_DIR
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from predict import load_run  # noqa: E402
from state.config import configure  # noqa: E402
from state.h5ad import H5AD, write_h5ad  # noqa: E402

from state.errors import guard  # noqa: E402

cfg = {"run": "", "test": "", "out": ""}
guard("dev/st_decoder_ceiling.py", __doc__)
configure(sys.argv[1:], cfg)
model, meta = load_run(cfg["run"])
assert model.decoder is not None, "the run has no gene decoder"
with H5AD(os.path.join(cfg["test"], "real.h5ad")) as h:
    X = h.matrix("X").block(0, h.n_obs)
    E = h.f["obsm/X_state"][:]
    genes = list(h.var_names())
    names = np.asarray(h.obs_names).astype(object)
    u = h.uns("nanostate")
    pc, cc = u["pert_col"], u["context_col"]
    pert = np.asarray(h.column(pc)).astype(object)
    ctx = np.asarray(h.column(cc)).astype(object)
pr = pert != u["control"]
with torch.no_grad():
    Y = model.decoder(torch.from_numpy(E[pr]).float()).numpy()
Xp = X.copy()
Xp[pr] = np.clip(Y, 0, 14)
os.makedirs(cfg["out"], exist_ok=True)
write_h5ad(os.path.join(cfg["out"], "pred.h5ad"), Xp.astype(np.float32), names, genes,
           obs={pc: pert, cc: ctx, "is_predicted": pr, "ctrl_cell_barcode": names},
           uns={"nanostate": {**u, "source": f"decoder ceiling of {os.path.abspath(cfg['run'])}"}})
print(f"decoded {int(pr.sum())} real test cells -> {cfg['out']}/pred.h5ad")
