"""Issue 11's pieces: the cross-fitted baseline shift table and the two_way baseline, the
baseline-anchored ST (starts exactly at the baseline), the mixer ablations, seed ensembles in predict,
and the multi-seed protocol's statistics (paired differences, wins, ceilings, calibrated scores,
uninformative metrics) including a split-half ceiling on real data."""

import json

import numpy as np
import pytest
import torch

from conftest import make_synth_prepared
from state import baselines as B
from state import experiment as X
from state.st import STConfig, StateTransition


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from state.data import Prepared
    from state.splits import Split
    d = make_synth_prepared(tmp_path_factory.mktemp("proto"))
    data = Prepared(d / "prep")
    return data, Split.load(d / "split.json").validate(data)


def deltas(data, rows):
    M = B.group_means(data, rows)
    ctl = data.control_code
    return {(c, p): m - M[(c, ctl)][0] for (c, p), (m, _) in M.items() if p != ctl}, M


def test_shift_table_is_cross_fitted(synth):
    data, split = synth
    D, M = deltas(data, split.train)
    ctl, nC = data.control_code, len(data.context_names)
    Tp = B.shift_table(data, split.train, "pert_mean")
    Tc = B.shift_table(data, split.train, "context_mean")
    Tw = B.shift_table(data, split.train, "two_way")
    assert Tp.shape == (nC, len(data.pert_names), data.n_genes) and Tp.dtype == np.float32
    for T in (Tp, Tc, Tw):
        assert np.all(T[:, ctl] == 0)

    def alpha(c, p):  # mean delta of p over the OTHER contexts
        ds = [D[(k, p)] for k in range(nC) if k != c and (k, p) in D]
        return np.mean(ds, 0) if ds else np.mean(list(D.values()), 0)

    c_star = data.context_names.index(split.context)
    for (c, p) in list(D)[:6] + [(c_star, data.pert[split.test[0]])]:
        np.testing.assert_allclose(Tp[c, p], alpha(c, p), atol=1e-5)
        others = [q for (k, q) in D if k == c and q != p]
        beta = np.mean([D[(c, q)] - alpha(c, q) for q in others], 0) if others else 0.0
        np.testing.assert_allclose(Tw[c, p], alpha(c, p) + beta, atol=1e-5)
        if others:
            n = np.array([M[(c, q)][1] for q in others], float)
            want = (np.stack([D[(c, q)] for q in others]) * n[:, None]).sum(0) / n.sum()
            np.testing.assert_allclose(Tc[c, p], want, atol=1e-5)
    # a training pair's own cells never enter its own shift: perturb them, its entry stays
    c, p = next(k for k in D if k[0] != c_star)
    own = split.train[(data.context[split.train] == c) & (data.pert[split.train] == p)]
    rest = np.setdiff1d(split.train, own[: len(own) // 2])
    T2 = B.shift_table(data, rest, "two_way")
    np.testing.assert_allclose(T2[c, p], Tw[c, p], atol=1e-5)
    # the two_way baseline = its controls + the table's shift for the held-out pair, recentred: each group's
    # drawn controls moved to the mean of the pool they were drawn from, the context's training controls
    # (away from the clip)
    Xh, obs = B.two_way(data, split, seed=0)
    pos = {n: i for i, n in enumerate(data.obs_names)}
    n = len(split.test)
    xc = data.rows([pos[b] for b in obs["ctrl_cell_barcode"][:n]])
    want = xc + Tw[data.context[split.test], data.pert[split.test]]
    tc = split.train[(data.pert[split.train] == ctl) & (data.context[split.train] == data.context[split.test[0]])]
    for q in np.unique(data.pert[split.test]):
        m = data.pert[split.test] == q  # one held-out context here
        want[m] += data.rows(tc).mean(0) - xc[m].mean(0)
    assert len(set(data.context[split.test].tolist())) == 1
    inside = (want > 0.01) & (want < 13.9)
    np.testing.assert_allclose(Xh[:n][inside], want[inside], atol=1e-5)
    # auto: per context, the kind with the lowest cross-fitted error on that context's training pairs
    Ta, choice = B.shift_table(data, split.train, "auto", return_choice=True)
    tabs = {"pert_mean": Tp, "context_mean": Tc, "two_way": Tw}
    for c, name in enumerate(data.context_names):
        ps = [p for (k, p) in D if k == c]
        err = {k: np.mean([(v[c, p] - D[(c, p)]) ** 2 for p in ps]) for k, v in tabs.items()}
        assert choice[name] == min(err, key=err.get)
        np.testing.assert_allclose(Ta[c], tabs[choice[name]][c])
    with pytest.raises(ValueError, match="shift kind"):
        B.shift_table(data, split.train, "median")


def test_anchored_model_starts_at_the_baseline_and_learns():
    torch.manual_seed(0)
    G, P, C = 23, 5, 3
    T = torch.randn(C, P, G)
    cfg = STConfig.from_name("tiny", n_in=G, n_pert=P, n_ctx=C, anchor="two_way")
    m = StateTransition(cfg, anchor_table=T)
    ctrl, pert, ctx = torch.rand(4, 16, G), torch.tensor([0, 1, 4, 2]), torch.tensor([0, 2, 1, 1])
    y = m.eval()(ctrl, pert, ctx=ctx)
    torch.testing.assert_close(y, torch.relu(ctrl + T[ctx, pert][:, None, :]))
    with pytest.raises(ValueError, match="context codes"):
        m(ctrl, pert)
    with pytest.raises(ValueError, match="shift table"):
        StateTransition(cfg)
    with pytest.raises(ValueError, match="n_ctx"):
        StateTransition(cfg, anchor_table=T[:2])
    # the correction trains: a few steps lower the loss and move the output off the baseline
    m.train()
    opt = m.configure_optimizer(lr=1e-2)
    tgt = torch.relu(ctrl + T[ctx, pert][:, None, :] + 0.5)
    losses = []
    for _ in range(15):
        loss, _ = m(ctrl, pert, ctx=ctx, tgt=tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    # saved and rebuilt with its table (predict.py's path)
    m2 = StateTransition(cfg, anchor_table=m.state_dict()["anchor_table"])
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(m2.eval()(ctrl, pert, ctx=ctx), m.eval()(ctrl, pert, ctx=ctx))


@pytest.mark.parametrize("mixer", ["mean", "none"])
def test_mixer_ablations(mixer):
    torch.manual_seed(0)
    cfg = STConfig.from_name("tiny", n_in=19, n_pert=4, mixer=mixer)
    m = StateTransition(cfg).eval()
    assert not any("wqkv" in n for n, _ in m.named_parameters())
    ctrl, pert = torch.rand(2, 12, 19), torch.tensor([1, 3])
    y = m(ctrl, pert)
    perm = torch.randperm(12)
    torch.testing.assert_close(m(ctrl[:, perm], pert), y[:, perm], atol=1e-5, rtol=1e-5)
    c2 = ctrl.clone()
    c2[:, 0] += 1.0
    moved = (m(c2, pert)[:, 1:] - y[:, 1:]).abs().max()
    if mixer == "none":
        assert moved == 0  # cells are independent
    else:
        assert moved > 1e-6  # cells see the set's mean
    # key padding: a padded batch equals one set at a time
    lens = torch.tensor([12, 5])
    x = ctrl.clone()
    x[1, 5:] = 99.0
    yp = m(x, pert, lens=lens)
    torch.testing.assert_close(yp[1, :5], m(ctrl[1:2, :5], pert[1:2])[0], atol=1e-5, rtol=1e-5)
    assert m.estimate_flops(8) < StateTransition(STConfig.from_name("tiny", n_in=19, n_pert=4)).estimate_flops(8)


def test_ensemble_is_the_mean_of_its_members():
    import predict
    torch.manual_seed(0)
    cfg = STConfig.from_name("tiny", n_in=11, n_pert=3)
    a, b = StateTransition(cfg).eval(), StateTransition(cfg).eval()
    ctrl = np.random.default_rng(0).random((30, 11)).astype(np.float32)
    wins = [(np.arange(16), 1, None, 0), (np.arange(16, 23), 2, None, 0)]
    pa = predict.predict_windows([a], ctrl, wins, "cpu")
    pb = predict.predict_windows([b], ctrl, wins, "cpu")
    pe = predict.predict_windows([a, b], ctrl, wins, "cpu", mix="mean")
    for x, y, z in zip(pa, pb, pe):
        np.testing.assert_allclose(z, (x + y) / 2, atol=1e-6)
    assert not np.allclose(pa[0], pb[0])


def three_members(mix):
    """Three random tiny members, two windows: (each member alone, the ensemble with `mix`)."""
    import predict
    torch.manual_seed(0)
    cfg = STConfig.from_name("tiny", n_in=11, n_pert=3)
    ms = [StateTransition(cfg).eval() for _ in range(3)]
    ctrl = np.random.default_rng(0).random((30, 11)).astype(np.float32)
    wins = [(np.arange(16), 1, None, 0), (np.arange(16, 23), 2, None, 0)]
    return [predict.predict_windows([m], ctrl, wins, "cpu") for m in ms], predict.predict_windows(ms, ctrl, wins, "cpu", mix=mix)


def test_ensemble_mixture_takes_each_cell_from_one_member():
    """The default ensemble (issue Science III): cell j of window i is member (i + j) mod M's prediction,
    so every member contributes whole cells (its spread and DE structure kept), about equally."""
    alone, mixed = three_members("mixture")
    for i, z in enumerate(mixed):
        for j in range(len(z)):
            np.testing.assert_allclose(z[j], alone[(i + j) % 3][i][j], atol=1e-6)


def test_ensemble_shift_averages_set_means_keeps_one_members_residuals():
    """--ensemble=shift: cell j = its mixture member's cell j - that member's set mean + the members' mean
    set mean (the spread is one member's, the shift the members' average)."""
    alone, sh = three_members("shift")
    for i, z in enumerate(sh):
        mu = np.mean([a[i].mean(0) for a in alone], 0)
        for j in range(len(z)):
            m = alone[(i + j) % 3][i]
            np.testing.assert_allclose(z[j], m[j] - m.mean(0) + mu, atol=1e-5)
        assert not np.allclose(z, [alone[(i + j) % 3][i][j] for j in range(len(z))], atol=1e-4)


def test_predict_bf16_autocast_is_close_to_fp32():
    """predict.py --dtype=bfloat16: the same predictions within bf16 rounding, not the fp32 ones."""
    import predict
    torch.manual_seed(0)
    m = StateTransition(STConfig.from_name("tiny", n_in=11, n_pert=3)).eval()
    ctrl = np.random.default_rng(0).random((30, 11)).astype(np.float32)
    wins = [(np.arange(16), 1, None, 0), (np.arange(16, 23), 2, None, 0)]
    a = predict.predict_windows([m], ctrl, wins, "cpu")
    b = predict.predict_windows([m], ctrl, wins, "cpu", dtype="bfloat16")
    for x, y in zip(a, b):
        assert y.dtype == np.float32 and not np.array_equal(x, y)
        np.testing.assert_allclose(y, x, atol=5e-2, rtol=5e-2)


def fake_results(st, bl, ceil, n_perts=5, n_de=3.0):
    """A protocol result for one task: st = [per-seed dicts], bl = [per-seed {baseline: dict}]."""
    fill = lambda d, v=0.5: {m: d.get(m, v) for m in X.METRICS} | {"de_nsig_counts_real": n_de}
    weak = {"pearson_delta": 0.1, "mae": 0.5}  # baselines not named: worse than every named one
    return {"t": dict(st=[fill(s) for s in st], ceil=fill(ceil),
                      bl=[{n: fill(b.get(n, weak), 0.1) for n in X.BASELINES} for b in bl], n_perts=n_perts)}


def test_protocol_statistics():
    st = [{"pearson_delta": v, "mae": 0.10 + e} for v, e in ((0.6, 0.0), (0.5, 0.01), (0.7, -0.01))]
    bl = [{"context_mean": {"pearson_delta": 0.4, "mae": 0.12}, "two_way": {"pearson_delta": 0.45, "mae": 0.09}}
          for _ in range(3)]
    A = X.analyse(fake_results(st, bl, {"pearson_delta": 0.9, "mae": 0.05}))["t"]
    pd = A["pearson_delta"]
    assert pd["best"] == "two_way"  # the best mean, per metric
    assert pd["st"][0] == pytest.approx(0.6) and pd["st"][1] == pytest.approx(0.1)
    assert pd["diff"][0] == pytest.approx(0.15) and pd["diff"][1] == pytest.approx(0.1)
    assert pd["wins"] == 3 and pd["K"] == 3
    assert pd["cal"] == pytest.approx(0.15 / 0.45)
    ma = A["mae"]  # lower is better: the best baseline is the lowest, ST loses on average
    assert ma["best"] == "two_way" and ma["wins"] == 0
    assert ma["cal"] == pytest.approx(-(0.01 / 0.04))
    # a ceiling not above the best baseline cannot calibrate
    A = X.analyse(fake_results(st, bl, {"pearson_delta": 0.4}))["t"]
    assert A["pearson_delta"]["cal"] is None
    # uninformative: one perturbation -> discrimination; no real DE gene -> DE metrics
    A = X.analyse(fake_results(st, bl, {}, n_perts=1, n_de=0.0))["t"]
    assert A["discrimination_score_l1"]["flag"] == "one perturbation"
    assert A["overlap_at_N"]["flag"] == "no real DE gene"
    assert A["pearson_delta"]["flag"] is None
    tg = dict((n, ok) for n, ok, _ in X.targets(A))
    assert tg["disc_l1 >= best"] is None and tg["overlap or pdelta: paired win > sd"] is True
    # ensembles: scored at every seed's draws, paired with the member of that seed
    res = fake_results(st, bl, {})
    per = [dict(x, pearson_delta=x["pearson_delta"] + 0.01) for x in res["t"]["st"]]
    res["t"]["ensemble"] = dict(per[0], pearson_delta=0.61, per_seed=per)
    e = X.analyse(res)["t"]["pearson_delta"]
    assert e["ensemble"] == pytest.approx(0.61) and e["ensemble_diff"] == pytest.approx(0.01)
    assert e["ensemble_shift"] is None and "ensemble_shift_diff" not in e


def test_split_half_ceiling_on_real_data(gbm_path, tmp_path):
    from state.prepare import prepare
    from state.splits import make_split
    data = prepare([str(gbm_path)], tmp_path / "gbm", pert_col="perturbation", control="control",
                   context_col="cell_type", keep={"cell_type": ["T98G", "U87MG"]})
    split = make_split(data, "fewshot", context="U87MG", support_perts=X.GBM_SUPPORT.split(","), seed=0)
    c = X.ceiling(data, split, halvings=1)
    assert 0 < c["pearson_delta"] < 1 and 0 < c["mae"] and 0.8 < c["spread"] < 1.25
    # the real cells scored against themselves are perfect: the ceiling is below that
    real = (*B.real_pair(data, split), list(data.genes))
    perfect = X.mean_scores(real, real, data)
    assert perfect["pearson_delta"] == pytest.approx(1.0) and perfect["mae"] == 0
    assert c["pearson_delta"] < perfect["pearson_delta"]
    b = X.baseline_scores(data, split, seed=0)
    assert set(b) == set(X.BASELINES) and b["context_mean"]["spread"] < 1e-5  # a constant prediction


def test_pick_tasks_by_name_and_role():
    """--tasks: the default (all) covers every task type; a role stands for its tasks; unknown is refused."""
    from state.errors import UserError
    every = X.pick_tasks("all")
    assert every == list(X.TASKS) and {X.TASKS[t][2] for t in every} >= {"choose", "check", "zeroshot", "combo", "unseen"}
    assert X.pick_tasks("unseen,pap_rep1,unseen") == ["pap_unseen", "pap_unseen_draw", "pap_rep1"]
    assert X.pick_tasks("choose") == [t for t, v in X.TASKS.items() if v[2] == "choose"]
    # the flags a task type adds are keyed by the split's --task (few-shot: the pseudobulk term)
    assert {X.task_type(t) for t in every} == {"fewshot", "zeroshot", "combo", "unseen"} >= set(X.TASK_FLAGS)
    assert X.task_type("gbm_a172") == "fewshot" and "--mean_weight" in X.TASK_FLAGS["fewshot"]
    for bad in ("pap_rep9", "", " , "):
        with pytest.raises(UserError, match="--tasks="):
            X.pick_tasks(bad)


def test_collect_pairs_baselines_with_the_seeds_that_ran(tmp_path):
    """A task whose seed 0 has no ST scores yet: its seed-1 ST scores pair with seed 1's baselines (not
    seed 0's, as the first-K slice had it)."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    cache.mkdir()
    t = "pap_rep1"
    (out / t / "s1").mkdir(parents=True)
    json.dump({"recipe": "--preset=tiny", "tasks": [t], "seeds": [0, 1]}, open(out / "protocol.json", "w"))
    json.dump({"mae": 0.5}, open(out / t / "s1" / "scores.json", "w"))
    json.dump({"st": {"anchor": "auto"}}, open(out / t / "s1" / "meta.json", "w"))
    for s in (0, 1):
        json.dump({"context_mean": {"mae": 0.1 * (s + 1)}}, open(cache / f"{t}_baselines_{X.DRAWS}_s{s}.json", "w"))
    json.dump({"mae": 0.0}, open(cache / f"{t}_ceiling.json", "w"))
    json.dump({"test_groups": [["rep_1", "A"]]}, open(cache / f"{t}.json", "w"))
    # scores of an earlier protocol (cells not recentred on their controls) are not mixed in: refused
    with pytest.raises(ValueError, match="scored by an earlier protocol"):
        X.collect(str(out), str(cache))
    json.dump({"mae": 0.5, "draws": X.DRAWS}, open(out / t / "s1" / "scores.json", "w"))
    cfg, res = X.collect(str(out), str(cache))
    assert [x["mae"] for x in res[t]["st"]] == [0.5] and res[t]["bl"] == [{"context_mean": {"mae": 0.2}}]
