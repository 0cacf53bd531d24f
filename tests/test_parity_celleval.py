"""Parity of state.eval with cell-eval 0.8.2 (+ pdex 0.3.0) on real data: baseline predictions for
few-shot GBM (perturbench file, U87MG held out), few-shot Papalexi (rep_1) and zero-shot Kang
(CD14+ Monocytes). Every metric both compute must agree within 1e-6 per perturbation and in
agg_results (counts exactly, NaN/null where cell-eval has NaN/null), DE tables within 1e-9, and the
VCC score must equal cell-eval's `score` on our CSVs.

Needs cell-eval in the same environment (pip install -e '.[parity]'); skips otherwise.
Budget: <= 120 s on 2 cores (cell-eval's numba JIT is the larger part)."""

import numpy as np
import pytest

cell_eval = pytest.importorskip("cell_eval", reason="cell-eval not installed: pip install -e '.[parity]'")
pl = pytest.importorskip("polars", reason="polars comes with cell-eval")

from state import baselines as B  # noqa: E402
from state import eval as E  # noqa: E402
from state.prepare import prepare  # noqa: E402
from state.splits import make_split  # noqa: E402

TASKS = {
    # name: (file fixture, prepare kwargs, split kwargs, baseline)
    "gbm": ("gbm_path", dict(pert_col="perturbation", control="control", context_col="cell_type",
                             keep={"cell_type": ["A172", "T98G", "U87MG"]}),
            dict(task="fewshot", context="U87MG", support_perts=["MAP2K3", "MAP2K6", "MAP3K21"]),
            "perturbation_mean"),
    "papalexi": ("papalexi_path", dict(pert_col="target_gene", control="non-targeting",
                                       context_col="bio_rep"),
                 dict(task="fewshot", context="rep_1", support=0.3), "linear"),
    "kang": ("kang_path", dict(pert_col="perturbation", control="control", context_col="cell_type"),
             dict(task="zeroshot", context="CD14+ Monocytes"), "context_mean"),
}


def _celleval(pred, real, pert_col, control, outdir):
    ev = cell_eval.MetricsEvaluator(adata_pred=pred, adata_real=real, control_pert=control,
                                    pert_col=pert_col, num_threads=1, outdir=outdir)
    res, agg = ev.compute(profile="full", skip_metrics=["clustering_agreement"], write_csv=False)
    return ev, res, agg


def _close(a, b, name, atol=1e-6):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.array_equal(np.isnan(a), np.isnan(b)), f"{name}: NaN pattern {a} vs {b}"
    ok = ~np.isnan(a)
    np.testing.assert_allclose(a[ok], b[ok], rtol=0, atol=atol, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_parity_with_celleval(task, request, tmp_path):
    fixture, pkw, skw, base = TASKS[task]
    path = request.getfixturevalue(fixture)
    data = prepare([str(path)], str(tmp_path / "prep"), **pkw)
    split = make_split(data, seed=0, **skw)
    real, pred = str(tmp_path / "real.h5ad"), str(tmp_path / "pred.h5ad")
    B.write_pred(real, B.real_pair(data, split), data, "real")
    B.write_pred(pred, B.BASELINES[base](data, split, seed=0), data, base)

    ev, res, agg = _celleval(pred, real, data.pert_col, data.control, str(tmp_path / "ce"))
    per, ours = E.evaluate(pred, real, data.pert_col, data.control, out=str(tmp_path / "ns"))

    # per perturbation
    res = res.sort("perturbation")
    assert res["perturbation"].to_list() == list(per["perturbation"])
    shared = [c for c in res.columns if c != "perturbation" and c in per]
    missing = set(res.columns) - set(per) - {"perturbation"}
    assert not missing, f"cell-eval metrics we do not compute: {missing}"
    for c in shared:
        assert np.array_equal(res[c].is_null().to_numpy(), per.null.get(c, np.zeros(len(res), bool))), c
        atol = 0 if c.startswith("de_nsig") else 1e-6
        _close(res[c].to_numpy(), per[c], c, atol)
    if len(per["perturbation"]) < 2:  # cell-eval errors on pearson_edistance and drops it
        assert "pearson_edistance" not in res.columns and np.isnan(per["pearson_edistance"]).all()

    # agg_results (polars describe)
    ag = E.aggregate(per)
    assert agg["statistic"].to_list() == E.STATS
    for c in shared:
        a = [np.nan if v is None else v for v in agg[c].to_list()]
        b = [np.nan if v is None else v for v in ag[c]]
        assert [v is None for v in agg[c].to_list()] == [v is None for v in ag[c]], c
        _close(a, b, f"agg {c}")

    # DE tables vs pdex
    for which, d in (("real", ev.de_comparison.real), ("pred", ev.de_comparison.pred)):
        f = pl.read_csv(tmp_path / "ns" / f"{which}_de.csv").sort(["target", "feature"])
        g = d.data.sort(["target", "feature"])
        assert f["feature"].to_list() == [str(x) for x in g["feature"].to_list()]
        for col in ("p_value", "fdr"):
            _close(f[col].to_numpy().astype(np.float32), g[col].to_numpy(), f"{which} {col}", 0)
        lf = np.nan_to_num(f["log2_fold_change"].to_numpy().astype(np.float32), posinf=1e9, neginf=-1e9)
        lg = np.nan_to_num(g["log2_fold_change"].to_numpy(), posinf=1e9, neginf=-1e9)
        _close(lf, lg, f"{which} lfc", 0)

    # VCC score on our CSVs through cell-eval's own scorer (user = ours, base = cell-eval baseline)
    bp = str(tmp_path / "base.h5ad")
    B.write_pred(bp, B.celleval_baseline(data, split), data, "celleval_baseline")
    E.evaluate(bp, real, data.pert_col, data.control, out=str(tmp_path / "nsb"))
    keep = [c for c in agg.columns]  # only columns cell-eval knows (registry), ours add pdisc_norm
    u = pl.read_csv(tmp_path / "ns" / "agg_results.csv").select([c for c in keep if c in ours])
    b = pl.read_csv(tmp_path / "nsb" / "agg_results.csv").select(u.columns)
    s_ce = cell_eval.score_agg_metrics(u, b)
    s_ns, avg = E.score(E.read_csv_table(tmp_path / "ns" / "agg_results.csv"),
                        E.read_csv_table(tmp_path / "nsb" / "agg_results.csv"))
    assert set(s_ns) == set(s_ce["metric"].to_list()) - {"avg_score"}
    ce = dict(zip(s_ce["metric"].to_list(), s_ce["from_baseline"].to_list()))
    assert ce.pop("avg_score") == pytest.approx(avg, abs=1e-12)
    for m, v in ce.items():
        assert s_ns[m] == pytest.approx(v, abs=1e-12), m
