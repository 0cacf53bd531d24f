"""
Zero-shot transfer gene by gene (issue Science III, DE recovery): on each Kang cell type held out in turn,
the shift tables that carry other cell types' responses (pert_mean, two_way) against the fold-change
transfer (`fold`: each gene moves by the other types' fold change of its expression, so a gene silent in
the held-out type's controls barely moves), scored with state.eval: pearson_delta, MAE, DE overlap and
the number of predicted vs real DE genes. No training: baselines only (seed 0 control draws).

    python dev/zeroshot_transfer.py [--cache=runs/exp/data] [--kinds=pert_mean,two_way,fold]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from state import baselines as bl  # noqa: E402
from state import experiment as X  # noqa: E402
from state.data import Prepared  # noqa: E402
from state.errors import guard  # noqa: E402
from state.splits import Split  # noqa: E402

guard("dev/zeroshot_transfer.py", __doc__)

args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
cache = os.path.abspath(args.get("cache", "runs/exp/data"))
kinds = args.get("kinds", "context_mean,pert_mean,two_way,fold").split(",")
metrics = ("pearson_delta", "mae", "overlap_at_N", "de_nsig_counts_pred", "de_nsig_counts_real")
print("| task | kind | " + " | ".join(metrics) + " |\n|---|---|" + "---|" * len(metrics))
for t in ("kang_cd14", "kang_b", "kang_cd4", "kang_cd8", "kang_fcgr3a"):
    d, sp = X.task_data(t, cache, X.SHARED)
    D = Prepared(d)
    S = Split.load(sp).validate(D)
    real = (*bl.real_pair(D, S), list(D.genes))
    for k in kinds:
        s = X.mean_scores((*bl._shifted_controls(D, S, 0, k), list(D.genes)), real, D)
        print(f"| {t} | {k} | " + " | ".join(f"{s[m]:.4f}" for m in metrics) + " |", flush=True)
