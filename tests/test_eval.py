"""state/eval.py and state/baselines.py: the rank test against a brute-force reference, BH, LFC
conventions, every metric on hand-made cases, cell-eval's NaN/aggregate conventions, the VCC score,
the CLI, and the baselines (ridge closed form vs dense least squares). Budget: <= 40 s on 2 cores."""

import math

import numpy as np
import pytest

from state import eval as E
from state import baselines as B
from state.h5ad import write_h5ad

# -----------------------------------------------------------------------------------------------
# DE


def mwu_brute(x, y):
    """Two-sided asymptotic Mann-Whitney U with continuity correction, from explicit average ranks
    (#less + (#equal + 1) / 2 over the pooled sample) and tie counts from np.unique."""
    z = np.concatenate([x, y]).astype(np.float64)
    n1, n2 = len(x), len(y)
    n = n1 + n2
    r = (z[:, None] > z[None, :]).sum(1) + ((z[:, None] == z[None, :]).sum(1) + 1) / 2
    U1 = r[:n1].sum() - n1 * (n1 + 1) / 2
    U = max(U1, n1 * n2 - U1)
    _, t = np.unique(z, return_counts=True)
    s2 = n1 * n2 / 12 * ((n + 1) - (t ** 3 - t).sum() / (n * (n - 1)))
    if s2 <= 0:
        return U1, 1.0
    zz = (U - n1 * n2 / 2 - 0.5) / math.sqrt(s2)
    return U1, min(1.0, max(0.0, math.erfc(zz / math.sqrt(2))))


def test_mwu_matches_bruteforce_with_ties():
    rng = np.random.default_rng(0)
    G = 40
    # heavy ties (rounded values, many zeros), negatives, -0.0, a constant gene, a one-sided gene
    Xc = np.round(rng.normal(0, 1, (37, G)) * (rng.random((37, G)) < 0.6), 1).astype(np.float32)
    Xp = np.round(rng.normal(0.3, 1, (23, G)) * (rng.random((23, G)) < 0.6), 1).astype(np.float32)
    Xc[:, 0], Xp[:, 0] = 0.0, -0.0
    Xp[:, 1] = 5.0
    Xc[:5, 2] = -0.0
    U, p = E.mwu(Xp, E.Ref(Xc))
    for g in range(G):
        u, q = mwu_brute(Xp[:, g], Xc[:, g])
        assert U[g] == pytest.approx(u, abs=1e-9), g
        assert p[g] == pytest.approx(q, rel=1e-12, abs=1e-300), g
    assert p[0] == 1.0 and p[1] < 1e-6


def test_mwu_scipy_if_present():
    st = pytest.importorskip("scipy.stats", reason="scipy not installed (optional cross-check)")
    rng = np.random.default_rng(1)
    Xc = rng.poisson(1.0, (50, 30)).astype(np.float32)
    Xp = rng.poisson(1.4, (20, 30)).astype(np.float32)
    _, p = E.mwu(Xp, E.Ref(Xc))
    ref = st.mannwhitneyu(Xp.astype(np.float64), Xc.astype(np.float64), method="asymptotic",
                          use_continuity=True, axis=0).pvalue
    np.testing.assert_allclose(p, ref, rtol=1e-10)


def test_bh_matches_definition():
    rng = np.random.default_rng(2)
    p = rng.random((3, 57)) ** 3
    p[0, :5] = p[0, 0]  # ties
    q = E.bh(p)
    for row, qrow in zip(p, q):
        m = len(row)
        o = np.argsort(row)
        # q_(i) = min_{j >= i} m p_(j) / j, capped at 1
        ref = np.minimum.accumulate((row[o] * m / np.arange(1, m + 1))[::-1])[::-1]
        exp = np.empty(m)
        exp[o] = np.minimum(ref, 1)
        np.testing.assert_allclose(qrow, exp, rtol=1e-14)
    assert np.all(q >= p - 1e-15)


def test_lfc_conventions():
    mp = np.array([0.0, 1.0, 0.0, 2.0], np.float32)
    mc = np.array([0.0, 0.0, 1.0, 1.0], np.float32)
    l = E.lfc(mp, mc)
    assert l[0] == 0.0  # 0/0 -> 0
    assert l[1] == np.inf and l[2] == -np.inf  # one-sided zeros stay infinite
    assert l[3] == pytest.approx(math.log2(math.expm1(2) / math.expm1(1)), rel=1e-6)
    d = E.de(np.full((5, 4), 2.0, np.float32), np.ones((6, 4), np.float32))
    assert d["lfc"].shape == (4,) and np.all(d["fdr"] < 0.05)
    dpb = E.de(np.full((40, 4), 2.0, np.float32), np.ones((40, 4), np.float32), pseudobulk=4)
    assert np.all(dpb["p"] > d["p"])  # 4 pseudo-replicates: far less power than 5 vs 6 cells


# -----------------------------------------------------------------------------------------------
# metrics


def make_pair(rng, perts, n=30, G=60, eff=None, noise=0.0, ctrl="ctrl"):
    """A (X, obs, genes) real file: log1p-like data where perturbation i shifts genes eff[i]."""
    genes = [f"g{j}" for j in range(G)]
    base = rng.gamma(2.0, 0.5, G)
    Xs, lab = [], []
    for i, p in enumerate([ctrl] + perts):
        mu = base.copy()
        if i and eff is not None:
            mu[eff[i - 1]] += 1.5
        Xs.append(np.clip(mu + rng.normal(0, 0.4, (n, G)), 0, 14))
        lab += [p] * n
    X = np.concatenate(Xs).astype(np.float32)
    X = X + noise * rng.normal(0, 1, X.shape).astype(np.float32)
    return np.clip(X, 0, 14).astype(np.float32), {"pert": np.array(lab)}, genes


def test_perfect_prediction_scores_perfectly():
    rng = np.random.default_rng(3)
    perts = ["A", "B", "C", "D"]
    eff = [np.arange(0, 8), np.arange(10, 18), np.arange(20, 30), np.arange(35, 40)]
    X, obs, genes = make_pair(rng, perts, eff=eff)
    per, agg = E.evaluate((X, obs, genes), (X, obs, genes), "pert", "ctrl")
    for m in ["overlap_at_N", "precision_at_N", "overlap_at_50", "de_sig_genes_recall",
              "de_direction_match", "de_spearman_sig", "discrimination_score_l1",
              "discrimination_score_l2", "discrimination_score_cosine", "pearson_delta",
              "pearson_edistance", "pdisc_norm", "de_spearman_lfc_sig", "pr_auc", "roc_auc"]:
        np.testing.assert_allclose(per[m], 1.0, atol=1e-12, err_msg=m)
    for m in ["mse", "mae", "mse_delta", "mae_delta"]:
        np.testing.assert_allclose(per[m], 0.0, atol=1e-12, err_msg=m)
    assert np.array_equal(per["de_nsig_counts_real"], per["de_nsig_counts_pred"])
    assert list(per["perturbation"]) == perts  # sorted, control excluded
    assert agg.info["n_no_real_de"] == 0


def test_wrong_prediction_scores_worse_and_known_values():
    rng = np.random.default_rng(4)
    perts = ["A", "B", "C"]
    eff = [np.arange(0, 10), np.arange(20, 30), np.arange(40, 50)]
    X, obs, genes = make_pair(rng, perts, eff=eff)
    # pred: labels of A and B swapped -> their discrimination must drop, C stays right
    lab = obs["pert"].copy()
    lab[lab == "A"], lab[lab == "B"] = "tmp", "A"
    lab[lab == "tmp"] = "B"
    per, _ = E.evaluate((X, {"pert": lab}, genes), (X, obs, genes), "pert", "ctrl")
    d = dict(zip(per["perturbation"], per["discrimination_score_l1"]))
    assert d["C"] == 1.0 and d["A"] < 1.0 and d["B"] < 1.0
    ov = dict(zip(per["perturbation"], per["overlap_at_N"]))
    assert ov["C"] == 1.0 and ov["A"] < 0.3
    # mse by hand on pseudobulks
    mu = lambda L, p: X[L == p].astype(np.float64).mean(0)
    exp = np.mean((mu(lab, "A") - mu(obs["pert"], "A")) ** 2)
    assert per["mse"][0] == pytest.approx(exp, rel=1e-9)
    pd = np.corrcoef(mu(lab, "A") - mu(lab, "ctrl"), mu(obs["pert"], "A") - mu(obs["pert"], "ctrl"))[0, 1]
    assert per["pearson_delta"][0] == pytest.approx(pd, rel=1e-9)


def test_celleval_conventions_no_de_and_one_perturbation():
    rng = np.random.default_rng(5)
    # no effect at all: no real DE anywhere
    X, obs, genes = make_pair(rng, ["A", "B"], eff=None)
    Xp, obsp, _ = make_pair(rng, ["A", "B"], eff=[np.arange(5), np.arange(5, 10)])
    per, agg = E.evaluate((Xp, obsp, genes), (X, obs, genes), "pert", "ctrl")
    assert np.all(per["de_nsig_counts_real"] == 0)
    assert np.all(per["overlap_at_N"] == 0) and np.all(per["precision_at_N"] == 0)
    assert np.all(per["de_spearman_sig"] == 1.0)  # cell-eval: 1.0 when no real sig genes
    # no value anywhere: cell-eval emits no column at all
    assert "de_direction_match" not in per and "de_sig_genes_recall" not in per
    i = list(agg["statistic"]).index("count")
    assert agg["overlap_at_N"][i] == 2.0 and "de_direction_match" not in agg
    assert agg.info["n_no_real_de"] == 2
    assert any("de_spearman_sig is set to 1.0" in n for n in agg.notes)
    # one perturbation: trivial discrimination, pearson_edistance NaN with a reason
    X1, o1, g1 = make_pair(rng, ["A"], eff=[np.arange(5)])
    per, agg = E.evaluate((X1, o1, g1), (X1, o1, g1), "pert", "ctrl")
    assert per["discrimination_score_l1"][0] == 1.0 and np.isnan(per["pearson_edistance"][0])
    assert any("pearson_edistance is NaN" in n for n in agg.notes)
    assert any("trivially 1" in n for n in agg.notes)


def test_target_gene_column_excluded_from_discrimination():
    # exact pseudobulks (identical cells): real A moves its own gene (col 0) by 3 and cols 2-5 by
    # 0.3; real B moves col 1 by 0.5 and cols 6-9 by 0.3. Predicted A gets its own gene right but
    # B's pattern elsewhere: with col 0 counted A is still closest to real A, without it to real B.
    sA, sB, pA = np.zeros(10), np.zeros(10), np.zeros(10)
    sA[0], sA[2:6], sB[1], sB[6:10] = 3.0, 0.3, 0.5, 0.3
    pA[0], pA[6:10] = 3.0, 0.3
    lab = np.repeat(["ctrl", "A", "B"], 4)
    real = np.repeat(np.stack([np.ones(10), 1 + sA, 1 + sB]), 4, 0).astype(np.float32)
    pred = np.repeat(np.stack([np.ones(10), 1 + pA, 1 + sB]), 4, 0).astype(np.float32)
    genes = ["A", "B"] + [f"g{j}" for j in range(8)]
    per, _ = E.evaluate((pred, {"p": lab}, genes), (real, {"p": lab}, genes), "p", "ctrl", profile="pds")
    assert list(per["discrimination_score_l1"]) == [0.5, 1.0]  # A ranked second of 2
    xg = [f"x{j}" for j in range(10)]  # same data, no gene named after a perturbation
    per2, _ = E.evaluate((pred, {"p": lab}, xg), (real, {"p": lab}, xg), "p", "ctrl", profile="pds")
    assert list(per2["discrimination_score_l1"]) == [1.0, 1.0]


def test_describe_matches_polars_describe():
    # values checked against polars 2.1 DataFrame.describe() by hand
    v = np.array([1.0, np.nan, 3.0, 0.0, 5.0, 2.0])
    null = np.array([False, False, False, True, False, False])
    out = E.describe(v, null)
    assert out[:2] == [5.0, 1.0] and np.isnan(out[2]) and np.isnan(out[3])
    assert out[4:] == [1.0, 2.0, 3.0, 5.0, 5.0]
    assert E.describe(np.arange(6.0), np.zeros(6, bool))[5:8] == [1.0, 3.0, 4.0]  # nearest, half up
    assert E.describe(np.array([1.0]), np.zeros(1, bool))[3] is None  # std of one value is null


def test_vcc_score_spec_example():
    def agg(mae, des, pds):
        t = E.Table(statistic=np.array(E.STATS, dtype=object))
        for k, v in dict(mae=mae, overlap_at_N=des, discrimination_score_l1=pds).items():
            t[k] = np.array([1, 0, v, 0, 0, 0, 0, 0, 0], dtype=object)
        return t
    s, avg = E.score(agg(0.036, 0.18, 0.61), agg(0.027, 0.106, 0.514))
    assert s["mae"] == 0.0  # worse than baseline -> clipped
    assert avg == pytest.approx((0.074 / 0.894 + 0.096 / 0.486) / 3, rel=1e-12)
    assert round(100 * avg, 1) == 9.3  # SPEC 10.4


def test_cli_with_context_and_csv(tmp_path):
    rng = np.random.default_rng(7)
    Xa, oa, genes = make_pair(rng, ["A", "B"], n=20, G=30, eff=[np.arange(5), np.arange(5, 10)])
    Xb, ob, _ = make_pair(rng, ["A", "B"], n=20, G=30, eff=[np.arange(3), np.arange(8, 12)])
    X = np.concatenate([Xa, Xb])
    lab = np.concatenate([oa["pert"], ob["pert"]])
    ctx = np.array(["c1"] * len(Xa) + ["c2"] * len(Xb))
    obs = {"target_gene": lab, "cell_type": ctx}
    names = [f"c{i}" for i in range(len(X))]
    write_h5ad(tmp_path / "real.h5ad", X, names, genes, obs=obs)
    Xp = np.clip(X + rng.normal(0, 0.2, X.shape), 0, 14).astype(np.float32)
    write_h5ad(tmp_path / "pred.h5ad", Xp, names, genes, obs=obs)
    out = tmp_path / "ev"
    per, agg = E.main(["--pred", str(tmp_path / "pred.h5ad"), "--real", str(tmp_path / "real.h5ad"),
                       "--control", "ctrl", "--context-col", "cell_type", "--out", str(out)])
    for f in ["results.csv", "agg_results.csv", "c1_results.csv", "c2_agg_results.csv",
              "c1_real_de.csv", "c2_pred_de.csv"]:
        assert (out / f).exists(), f
    assert list(per["context"]) == ["c1", "c1", "c2", "c2"]
    t = E.read_csv_table(out / "c1_results.csv")
    np.testing.assert_allclose(t["mae"], per["mae"][:2], rtol=1e-15)
    ta = E.read_csv_table(out / "agg_results.csv")
    s, avg = E.score(ta, ta)  # a method scored against itself: 0 everywhere
    assert avg == 0.0
    with open(out / "c1_real_de.csv") as f:
        assert f.readline().strip() == "target,feature,log2_fold_change,p_value,fdr"


# -----------------------------------------------------------------------------------------------
# baselines


def test_ridge_closed_form_tends_to_dense_least_squares():
    rng = np.random.default_rng(8)
    G_, d, K, dp = 30, 5, 12, 4
    Ge, Pe = rng.normal(size=(G_, d)), rng.normal(size=(K, dp))
    Y = rng.normal(size=(G_, K))
    W = B.ridge2(Ge, Y, Pe, 1e-10)
    # dense least squares: vec(Ge W Pe^T) = (Pe kron Ge) vec(W)
    w, *_ = np.linalg.lstsq(np.kron(Pe, Ge), Y.T.ravel(), rcond=None)
    np.testing.assert_allclose(W, w.reshape(dp, d).T, rtol=1e-6, atol=1e-8)
    W1 = B.ridge2(Ge, Y, Pe, 10.0)
    assert np.linalg.norm(W1) < np.linalg.norm(W)  # shrinks
    # one-hot P: columns are independent, K columns
    assert B.ridge2(Ge, Y, np.eye(K), 0.0).shape == (d, K)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from state.prepare import prepare
    from state.splits import make_split
    from state.synth import make_synthetic
    d = tmp_path_factory.mktemp("synth")
    make_synthetic(str(d / "s.h5ad"), n_cells=2400, n_genes=40, n_perts=6, n_contexts=3, seed=0)
    data = prepare([str(d / "s.h5ad")], str(d / "prep"), pert_col="perturbation", control="control",
                   context_col="cell_type")
    return data, make_split(data, "fewshot", context=data.context_names[0], support=0.34, seed=0)


def test_baselines_shape_and_definitions(synth, tmp_path):
    data, split = synth
    Xr, obsr = B.real_pair(data, split)
    M = B.group_means(data, split.train)
    ctl = data.control_code
    for name, fn in B.BASELINES.items():
        X, obs = fn(data, split, seed=0)
        assert X.shape == Xr.shape and X.dtype == np.float32, name
        assert np.array_equal(obs[data.pert_col], obsr[data.pert_col]), name
        assert obs["is_predicted"].sum() == len(split.test), name
        np.testing.assert_array_equal(X[len(split.test):], Xr[len(split.test):])  # real controls
    # perturbation_mean: predicted cells - their own sampled controls = mean training delta + the group's
    # recentring (mean of the pool the controls were drawn from, the context's training controls, less
    # the mean of its drawn ones)
    X, obs = B.perturbation_mean(data, split, seed=0)
    p = data.pert[split.test[0]]
    c_star = data.context[split.test[0]]
    deltas = [M[(c, p)][0] - M[(c, ctl)][0] for c in range(len(data.context_names))
              if c != c_star and (c, p) in M]
    dbar = np.mean(deltas, axis=0)
    rows = np.flatnonzero(data.pert[split.test] == p)
    bc = {n: i for i, n in enumerate(data.obs_names)}
    xc = data.rows([bc[b] for b in obs["ctrl_cell_barcode"][rows]])
    pool = split.train[(data.pert[split.train] == ctl) & (data.context[split.train] == c_star)]
    off = data.rows(pool).mean(0) - xc.mean(0)
    assert np.abs(off).max() > 1e-3  # the draw is not the pool: the check below could fail
    dbar = dbar + off
    inside = (xc + dbar > 0.01) & (xc + dbar < 13.9)  # away from the [0, 14] clip
    np.testing.assert_allclose((X[rows] - xc)[inside], np.broadcast_to(dbar, xc.shape)[inside],
                               atol=1e-5)
    # context_mean: every predicted cell = mean of the perturbed training cells of c*
    X, _ = B.context_mean(data, split)
    ks = [(v, n) for (c, q), (v, n) in M.items() if c == c_star and q != ctl]
    mu = sum(v * n for v, n in ks) / sum(n for _, n in ks)
    np.testing.assert_allclose(X[0], np.clip(mu, 0, 14), atol=1e-5)


def test_report_runs_and_marks_winners(synth, tmp_path):
    data, split = synth
    pair = B.perturbation_mean(data, split, seed=1)
    (tmp_path / "m").mkdir()
    B.write_pred(str(tmp_path / "m" / "pred.h5ad"), pair, data, "pm-seed1")
    txt = B.report(data, split, {"model": str(tmp_path / "m" / "pred.h5ad")},
                   out=str(tmp_path / "rep"), profile="minimal")
    lines = txt.splitlines()
    assert "model-best" in lines[0] and "perturbation_mean" in lines[0]
    pd = next(l for l in lines if l.startswith("pearson_delta"))
    assert "*" in pd
    # effects are shared across contexts in the synthetic data: the mean delta must predict well
    per, agg = E.evaluate(str(tmp_path / "rep" / "perturbation_mean_pred.h5ad"),
                          str(tmp_path / "rep" / "real.h5ad"), data.pert_col, data.control)
    assert np.nanmean(per["pearson_delta"]) > 0.6
    per2, _ = E.evaluate(str(tmp_path / "rep" / "context_mean_pred.h5ad"),
                         str(tmp_path / "rep" / "real.h5ad"), data.pert_col, data.control)
    assert per2["discrimination_score_l1"].mean() <= per["discrimination_score_l1"].mean()
    assert agg.info["cross_pert_corr_pred"] < 0.99


def test_discrimination_exclusion_closed_form_matches_recompute():
    rng = np.random.default_rng(9)
    T_, G_ = 7, 25
    genes = np.array([f"g{j}" for j in range(G_)], dtype=object)
    perts = np.array(["g3", "g0", "x1", "g7", "x2", "g24", "g11"], dtype=object)
    P, R = rng.normal(size=(T_, G_)), rng.normal(size=(T_, G_))
    R[2] = 0.0  # a zero vector: cosine distance 1 by sklearn's convention
    P[:, 3] *= 40  # make the excluded columns matter
    for metric in ("l1", "l2", "cosine"):
        got = E.discrimination(P, R, genes, perts, metric)
        exp = []
        for i, p in enumerate(perts):
            keep = genes != p
            a, b = P[i, keep], R[:, keep]
            if metric == "l1":
                d = np.abs(b - a).sum(1)
            elif metric == "l2":
                d = np.sqrt(((b - a) ** 2).sum(1))
            else:
                na, nb = np.linalg.norm(a), np.linalg.norm(b, axis=1)
                d = 1 - (b @ a) / (np.where(nb == 0, 1, nb) * (na or 1))
            exp.append(1 - np.flatnonzero(np.argsort(d) == i)[0] / T_)
        np.testing.assert_array_equal(got, exp, err_msg=metric)
