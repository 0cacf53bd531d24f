"""
The multi-seed protocol: does ST beat the simple baselines by more than seed noise, on several tasks?

    python -m state.experiment run --recipe="--preset=cpu" --seeds=0,1,2 --out=runs/exp/all   # every task type
    python -m state.experiment run --tasks=choose --recipe="--preset=cpu" --out=runs/exp/cpu  # the choose tasks
    python -m state.experiment run --tasks=pap_rep1,kang_cd14 --recipe="--preset=tiny --lr=1e-3" --out=..
    python -m state.experiment table runs/exp/cpu            # reprint the table from saved scores
    python -m state.experiment compare runs/exp/a runs/exp/b  # recipes side by side (key metrics)

For every task (prepared data + split, built once from ../shared/data into --cache) and every seed it
trains ST (`train.py --seed=s` + the recipe), replays the test split (`predict.py test`), scores ST and
every baseline with `state.eval` (baselines built from training cells only, with the same seed for their
control draws), and prints per task and metric:
  - each method's mean +- sd over seeds;
  - the paired difference ST - best baseline (the baseline with the best mean on that metric), mean +- sd,
    and how many seeds ST won;
  - a noise ceiling: how well one random half of the real test cells of each group predicts the other
    half (same metrics, same controls; mean of 2 halvings). It uses half the cells per side, so it is a
    conservative ceiling for count-driven metrics (DE overlap);
  - the calibrated score (ST - best baseline) / (ceiling - best baseline): 0 = the best baseline,
    1 = as good as a replicate; "-" where the ceiling is not above the best baseline;
  - which metrics are uninformative on the task (one perturbation: discrimination and pearson_edistance;
    no real DE gene: every DE metric) instead of averaging them in.
The target check at the end is issue 11's: discrimination_l1 mean >= best baseline, a paired win larger
than its sd on overlap_at_N or pearson_delta, MAE within 10% of the best baseline, spread >= 0.7.

Tasks: config/protocol.py, one line each (the dataset, the split options, the role: choose recipes on the
`choose` ones, the `check` ones are kept for independent confirmation; the default, --tasks=all, adds
zero-shot magnitude, unseen combinations and unseen perturbations; a role name picks its tasks), and the train.py flags each task type adds to the recipe
(TASK_FLAGS, by the split's type: few-shot adds the pseudobulk term, combinations start from the additive
model, unseen perturbations from the context mean).
With --ensemble each task also gets the seed ensemble (predict.py test --run=s0,s1,s2), scored once.
Each ST run is single-threaded (--threads=1); --jobs runs that many at once.
"""

import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from state import baselines
from state.config import dashes, recipe
from state.errors import Parser, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")

# the protocol's tables are a file, config/protocol.py: the datasets, the tasks (name -> dataset, split
# options, role) and the train.py flags each task type adds to the recipe
_P = recipe("protocol")
DATASETS, TASKS, TASK_FLAGS, GBM_SUPPORT = _P["DATASETS"], _P["TASKS"], _P["TASK_FLAGS"], _P["GBM_SUPPORT"]
METRICS = ["pearson_delta", "mse", "mae", "discrimination_score_l1", "overlap_at_N", "de_direction_match",
           "pearson_edistance", "spread", "shift"]
LOWER = {"mse", "mae"}  # lower is better; spread/shift are diagnostics (best 1), never "won"
DIAG = {"spread", "shift"}
DE = {"overlap_at_N", "de_direction_match"}
ONE_PERT = {"discrimination_score_l1", "pearson_edistance"}
# from the baselines' registry (state/baselines.py): those built from training cells, their table labels,
# the ones scored on every task, and the baseline each --anchor kind starts ST from
PROTOCOL = {n: b for n, b in baselines.BASELINES.items() if not b.from_test}
SHORT = {n: b.short for n, b in PROTOCOL.items()}
BASELINES = [n for n, b in PROTOCOL.items() if b.task is None]
ANCHOR_BASELINE = {b.anchor: n for n, b in PROTOCOL.items() if b.anchor}
# how predicted cells relate to their drawn controls (state.baselines.recentre): scores of another kind
# are not compared with these (an older --out is scored again, an older cache's baselines recomputed)
DRAWS = "pool-recentred"


def task_type(task):
    """fewshot | zeroshot | combo | unseen: the split's --task."""
    opts = TASKS[task][1]
    return opts[opts.index("--task") + 1]


def names_for(task):
    """The baselines of a task: every-task ones, and those of its task type (the additive one joins on
    combination tasks, where elsewhere it is two_way; crispr_shift on unseen perturbations)."""
    return [n for n, b in PROTOCOL.items() if b.task in (None, task_type(task))]


def sh(cmd, log=None):
    """Run a command from the repo root; its output goes to `log` (appended); raise on failure."""
    with open(log or os.devnull, "a") as f:
        f.write(f"$ {' '.join(shlex.quote(c) for c in cmd)}\n")
        f.flush()
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise RuntimeError(f"command failed ({r.returncode}): {' '.join(cmd)}" + (f"; see {log}" if log else ""))


def task_data(task, cache, shared):
    """Prepared folder and split file of a task, built once under `cache` (refused when the cache was
    built by another prepared-data format: its splits, baselines and ceilings would not match)."""
    from state.data import FORMAT
    mark = os.path.join(cache, "format.json")
    if not os.path.exists(mark):
        if any(f.endswith(".json") for f in os.listdir(cache)):
            raise UserError(f"{cache} holds a cache of an older prepared-data format (no format.json); use a new "
                     "--cache or delete it")
        with open(mark + f".tmp{os.getpid()}", "w") as f:
            json.dump(FORMAT, f)
        os.replace(mark + f".tmp{os.getpid()}", mark)  # atomic: jobs in threads read it concurrently
    if json.load(open(mark)) != FORMAT:
        raise UserError(f"{cache} was built with prepared-data format {json.load(open(mark))}, this code writes "
                 f"format {FORMAT}; use a new --cache or delete it")
    ds, split_args, _ = TASKS[task]
    f, prep = DATASETS[ds]
    d = os.path.join(cache, ds)
    if not os.path.exists(os.path.join(d, "index.json")):
        src = os.path.join(shared, f)
        if not os.path.exists(src):
            raise FileNotFoundError(f"{src} not found (pass --shared=FOLDER holding {f})")
        sh([sys.executable, "-m", "state.data", "prepare", src, d, *prep], os.path.join(cache, f"{ds}.log"))
    sp = os.path.join(cache, f"{task}.json")
    if not os.path.exists(sp):
        sh([sys.executable, "-m", "state.splits", "make", "--data", d, *split_args, "--out", sp],
           os.path.join(cache, f"{task}.log"))
    return d, sp

# -----------------------------------------------------------------------------------------------
# scoring


def mean_scores(pred, real, data):
    """{metric: value} of one prediction (path or (X, obs, genes)) against the real test cells."""
    from state.eval import evaluate, spread_stats
    from state.baselines import _mean_row
    ctxc = data.context_col or "context"
    _, agg = evaluate(pred, real, data.pert_col, data.control, ctxc, "full")
    row = _mean_row(agg)
    out = {m: row.get(m, np.nan) for m in METRICS if m not in DIAG}
    out["de_nsig_counts_real"] = row.get("de_nsig_counts_real", np.nan)
    out["de_nsig_counts_pred"] = row.get("de_nsig_counts_pred", np.nan)
    sp = spread_stats(pred, real, data.pert_col, data.control, ctxc)
    out["spread"], out["shift"] = sp["spread"], sp["shift"]
    return out


def ceiling(data, split, halvings=2, seed=0):
    """Split-half noise ceiling: half A of each test group's real cells scored against half B."""
    from state.baselines import _obs
    rng = np.random.default_rng(seed)
    genes = list(data.genes)
    ctrl = split.test_ctrl
    Xc = data.rows(ctrl)
    res = []
    for h in range(halvings):
        A, B = [], []
        key = data.context[split.test].astype(np.int64) * len(data.pert_names) + data.pert[split.test]
        for k in np.unique(key):
            r = rng.permutation(split.test[key == k])
            A.append(r[: len(r) // 2])
            B.append(r[len(r) // 2:])
        A, B = np.sort(np.concatenate(A)), np.sort(np.concatenate(B))
        pair = lambda rows: (np.concatenate([data.rows(rows), Xc]),
                             _obs(data, np.concatenate([rows, ctrl]), np.zeros(len(rows) + len(ctrl), bool)),
                             genes)
        res.append(mean_scores(pair(A), pair(B), data))
    with np.errstate(all="ignore"):
        return {m: float(np.mean([r[m] for r in res])) for m in res[0]}


def baseline_scores(data, split, seed, have=None, names=BASELINES):
    """{baseline: scores}; only the baselines missing from `have` are computed."""
    real = (*baselines.real_pair(data, split), list(data.genes))
    out = dict(have or {})
    for n in names:
        if n not in out:
            out[n] = mean_scores((*baselines.BASELINES[n](data, split, seed=seed), list(data.genes)), real, data)
    return out


def cached(path, fn):
    if os.path.exists(path):
        return json.load(open(path))
    v = fn()
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(v, f, indent=1, default=float)
    os.replace(tmp, path)
    return v

# -----------------------------------------------------------------------------------------------
# one (task, seed): train, predict, score


def scored(score_f, drop=False):
    """A scores.json made with this code's control draws, or None. drop: remove one of an earlier protocol
    (predicted cells not recentred on the context's controls), so that the job scores it again, without
    training again."""
    if os.path.exists(score_f):
        s = json.load(open(score_f))
        if s.get("draws") == DRAWS:
            return s
        if drop:
            os.remove(score_f)
    return None


def st_job(task, seed, out, cache, shared, recipe):
    d, sp = task_data(task, cache, shared)
    run = os.path.join(out, task, f"s{seed}")
    score_f = os.path.join(run, "scores.json")
    if (done := scored(score_f, drop=True)) is not None:
        return done
    log = os.path.join(out, task, f"s{seed}.log")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    t0 = time.time()
    meta_f = os.path.join(run, "meta.json")
    meta = json.load(open(meta_f)) if os.path.exists(meta_f) else None
    if meta is None or meta["step"] < meta["train"]["max_steps"]:  # not trained, or stopped part-way
        flags = TASK_FLAGS.get(task_type(task), "")  # what the task type adds to the recipe
        sh([sys.executable, "train.py", f"--data={d}", f"--split={sp}", f"--out={run}", f"--seed={seed}",
            "--threads=1", "--log_every=100", *shlex.split(flags), *shlex.split(recipe)] + (["--resume"] if os.path.isdir(run) else []),
           log)
    t1 = time.time()
    s = predict_and_score(run, d, sp, run, seed, log)
    meta = json.load(open(meta_f))
    if meta.get("guard"):  # the same weights with the correction at full strength (alpha 1): the ablation
        s["alpha"] = meta["guard"]["alpha"]
        s["unguarded"] = predict_and_score(run, d, sp, os.path.join(run, "alpha1"), seed, log, "--alpha=1")
        # the alpha each guard criterion (energy, set-mean error) would choose, scored: a paired comparison
        s["guard_by"] = {}
        for n, a in (meta["guard"].get("alpha_by") or {}).items():
            at = {s["alpha"]: s, 1.0: s["unguarded"]}.get(a) or predict_and_score(
                run, d, sp, os.path.join(run, f"alpha{a:g}"), seed, log, f"--alpha={a}")
            s["guard_by"][n] = dict(alpha=a, **{m: at[m] for m in METRICS + ["de_nsig_counts_pred"] if m in at})
    s["best_step"], s["draws"] = meta.get("best_step"), DRAWS
    s["train_s"], s["total_s"] = t1 - t0, time.time() - t0
    return cached(score_f, lambda: s)


def predict_and_score(runs, d, sp, out, seed, log, *extra):
    """predict.py test of `runs` (one run dir, or several comma-joined: an ensemble) into out/test, scored."""
    from state.data import Prepared
    sh([sys.executable, "predict.py", "test", f"--run={runs}", f"--data={d}", f"--split={sp}",
        f"--out={out}/test", f"--seed={seed}", *extra], log)
    return mean_scores(os.path.join(out, "test", "pred.h5ad"), os.path.join(out, "test", "real.h5ad"), Prepared(d))


ENSEMBLES = {"ensemble": "mixture", "ensemble_shift": "shift"}  # folder -> predict.py --ensemble


def ensemble_job(task, seeds, out, cache, shared, name="ensemble"):
    """The seeds' runs as one ensemble (predict.py --ensemble=ENSEMBLES[name]), scored at every seed's
    control draws (--seed=s), so that each score pairs with the member trained and scored with seed s:
    one draw alone moves pearson_delta and DE overlap by about a seed sd on Papalexi (dev/LOG.md, session
    6). -> the mean of each metric, and the per-seed scores."""
    d, sp = task_data(task, cache, shared)
    ens = os.path.join(out, task, name)
    score_f = os.path.join(ens, "scores.json")
    if (done := scored(score_f, drop=True)) is not None:
        return done
    runs = ",".join(os.path.join(out, task, f"s{s}") for s in seeds)
    per = [predict_and_score(runs, d, sp, os.path.join(ens, f"d{s}"), s, os.path.join(out, task, f"{name}.log"),
                             f"--ensemble={ENSEMBLES[name]}") for s in seeds]
    mean = {m: float(np.nanmean([p[m] for p in per])) for m in per[0]}
    return cached(score_f, lambda: dict(mean, per_seed=per, draws=DRAWS))


def pick_tasks(spec):
    """--tasks: names of config/protocol.py's tasks or roles (a role stands for its tasks; all = every
    task), comma-separated, in order, each once."""
    roles = {v[2] for v in TASKS.values()}
    tasks = []
    for x in filter(None, (x.strip() for x in spec.split(","))):
        tasks += list(TASKS) if x == "all" else [t for t, v in TASKS.items() if v[2] == x] if x in roles else [x]
    bad = [x for x in tasks if x not in TASKS]
    if bad or not tasks:
        raise UserError(f"python -m state.experiment run: --tasks={spec!r}: unknown task(s) {bad}; give tasks "
                        f"{list(TASKS)} or roles {sorted(roles | {'all'})}")
    return list(dict.fromkeys(tasks))


def run(tasks, seeds, out, cache, shared, recipe, jobs=2, ensemble=False):
    from state.data import Prepared
    from state.splits import Split
    os.makedirs(out, exist_ok=True)
    os.makedirs(cache, exist_ok=True)
    cfg_f = os.path.join(out, "protocol.json")
    cfg = {"recipe": recipe, "tasks": tasks, "seeds": seeds}
    if os.path.exists(cfg_f):
        old = json.load(open(cfg_f))
        if old["recipe"] != recipe:
            raise UserError(f"{out} holds a protocol run with another recipe ({old['recipe']!r}); use another --out")
        # more tasks or seeds into the same folder: the table keeps the earlier ones
        cfg.update(tasks=list(dict.fromkeys(old["tasks"] + tasks)), seeds=list(dict.fromkeys(old["seeds"] + seeds)))
    json.dump(cfg, open(cfg_f, "w"), indent=1)
    for t in tasks:  # data, splits, ceilings and baselines first (cheap, cached)
        d, sp = task_data(t, cache, shared)
        data = Prepared(d)
        split = Split.load(sp).validate(data)
        cached(os.path.join(cache, f"{t}_ceiling.json"), lambda: ceiling(data, split))
        for s in seeds:
            f = os.path.join(cache, f"{t}_baselines_{DRAWS}_s{s}.json")
            have = json.load(open(f)) if os.path.exists(f) else {}
            if set(names_for(t)) - set(have):  # a baseline added since: compute it alone
                os.path.exists(f) and os.remove(f)
                cached(f, lambda: baseline_scores(data, split, s, have, names_for(t)))
    todo = [(t, s) for t in tasks for s in seeds]
    t0 = time.time()
    with ThreadPoolExecutor(jobs) as ex:
        futs = {ex.submit(st_job, t, s, out, cache, shared, recipe): (t, s) for t, s in todo}
        for i, f in enumerate(futs):
            t, s = futs[f]
            r = f.result()
            print(f"[{i + 1}/{len(todo)}] {t} seed {s}: pearson_delta {r['pearson_delta']:.3f} "
                  f"disc_l1 {r['discrimination_score_l1']:.3f} mae {r['mae']:.4f} "
                  f"({r.get('train_s', 0):.0f}s train; {time.time() - t0:.0f}s elapsed)", flush=True)
        if ensemble:
            list(ex.map(lambda tn: ensemble_job(*tn[:1], seeds, out, cache, shared, tn[1]),
                        [(t, n) for t in tasks for n in ENSEMBLES]))
    txt = table(out, cache)
    print(txt)
    return txt

# -----------------------------------------------------------------------------------------------
# the table


def collect(out, cache):
    cfg = json.load(open(os.path.join(out, "protocol.json")))
    res = {}
    for t in cfg["tasks"]:
        seeds = [s for s in cfg["seeds"] if os.path.exists(os.path.join(out, t, f"s{s}", "scores.json"))]
        old = [s for s in seeds if json.load(open(os.path.join(out, t, f"s{s}", "scores.json"))).get("draws") != DRAWS]
        if old:
            raise UserError(f"{out}: {t} seeds {old} were scored by an earlier protocol (predicted cells not "
                            f"recentred on their controls); run `python -m state.experiment run` on {out} again "
                            "to score them anew (no training)")
        st = [dict(json.load(open(os.path.join(out, t, f"s{s}", "scores.json"))),
                   anchor=json.load(open(os.path.join(out, t, f"s{s}", "meta.json")))["st"].get("anchor", "none"))
              for s in seeds]
        bl = [json.load(open(os.path.join(cache, f"{t}_baselines_{DRAWS}_s{s}.json"))) for s in seeds]  # paired with st
        ens = {n: os.path.join(out, t, n, "scores.json") for n in ENSEMBLES}
        groups = json.load(open(os.path.join(cache, f"{t}.json")))["test_groups"]
        res[t] = dict(st=st, bl=bl, ceil=json.load(open(os.path.join(cache, f"{t}_ceiling.json"))),
                      n_perts=len({p for _, p in groups}),
                      **{n: scored(f) for n, f in ens.items()})
    return cfg, res


def uninformative(m, n_real_de, n_perts):
    if m in ONE_PERT and (n_perts or 0) < 2:
        return "one perturbation"
    if m in DE and not (n_real_de or 0) > 0:
        return "no real DE gene"
    return None


def analyse(res):
    """Per task and metric: method means/sds, best baseline, paired diff, wins, ceiling, calibrated."""
    out = {}
    np.seterr(all="ignore")
    import warnings
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # NaN metrics (e.g. no DE) are reported as NaN
    for t, r in res.items():
        if not r["st"]:
            continue
        K, BASELINES = len(r["st"]), [n for n in r["bl"][0] if n in SHORT]  # the baselines scored for t
        rows = {}
        for m in METRICS:
            st = np.array([x[m] for x in r["st"]], float)
            bl = {n: np.array([x[n][m] for x in r["bl"][:K]], float) for n in BASELINES}
            sign = -1 if m in LOWER else 1
            best = None if m in DIAG else max(BASELINES, key=lambda n: sign * np.nanmean(bl[n])
                                              if np.isfinite(np.nanmean(bl[n])) else -np.inf)
            d = st - bl[best] if best else None
            c = r["ceil"].get(m, np.nan)
            cal = None
            if best:
                gap = sign * (c - np.nanmean(bl[best]))
                cal = float(sign * np.nanmean(d) / gap) if gap > 1e-9 else None
            rows[m] = dict(st=(float(np.nanmean(st)), float(np.nanstd(st, ddof=1)) if K > 1 else 0.0),
                           **{n: None if not r.get(n) else float(r[n][m]) for n in ENSEMBLES},
                           # ensemble - member, paired on seed s's control draws (older results: None)
                           **{n + "_diff": float(np.nanmean([p[m] for p in r[n]["per_seed"]] - st))
                              for n in ENSEMBLES if r.get(n) and len(r[n].get("per_seed", [])) == K},
                           bl={n: (float(np.nanmean(v)), float(np.nanstd(v, ddof=1)) if K > 1 else 0.0)
                               for n, v in bl.items()},
                           best=best, ceil=float(c),
                           diff=None if d is None else (float(np.nanmean(d)), float(np.nanstd(d, ddof=1))
                                                        if K > 1 else 0.0),
                           wins=None if d is None else int(np.sum(sign * d > 0)), K=K, cal=cal,
                           flag=uninformative(m, r["bl"][0]["perturbation_mean"]["de_nsig_counts_real"],
                                              r["n_perts"]))
        out[t] = rows
    return out


def targets(rows):
    """Issue 11's targets on one task -> list of (name, ok or None when uninformative, detail)."""
    res = []
    dl = rows["discrimination_score_l1"]
    if dl["flag"]:
        res.append(("disc_l1 >= best", None, dl["flag"]))
    else:
        res.append(("disc_l1 >= best", dl["diff"][0] >= 0, f"{dl['diff'][0]:+.3f}"))
    ok = []
    for m in ("overlap_at_N", "pearson_delta"):
        r = rows[m]
        if not r["flag"]:
            ok.append(r["diff"][0] > 0 and r["diff"][0] > r["diff"][1])
    res.append(("overlap or pdelta: paired win > sd", any(ok), ""))
    ma = rows["mae"]
    res.append(("mae within 10% of best", ma["st"][0] <= 1.1 * ma["bl"][ma["best"]][0],
                f"{ma['st'][0] / ma['bl'][ma['best']][0]:.2f}x"))
    res.append(("spread >= 0.7", rows["spread"]["st"][0] >= 0.7, f"{rows['spread']['st'][0]:.2f}"))
    return res


def anchor_block(t, r):
    """ST against its own anchor (the baseline of the shift it starts from: --anchor=auto -> auto, ...)
    and, for guarded runs, against the same weights at full correction (alpha 1): paired per seed; alpha
    and the kept step per seed; predicted vs real DE genes beside DE overlap."""
    st, bl = r["st"], r["bl"][:len(r["st"])]
    kind = ANCHOR_BASELINE.get(st[0].get("anchor", "auto")) if st else None
    if not st or kind not in bl[0]:
        return []
    K = len(st)
    sd = (lambda v: float(np.nanstd(v, ddof=1)) if K > 1 else 0.0)
    lines = ["", f"| vs anchor | anchor ({SHORT[kind]}) | ST | ST - anchor (sd) | wins" +
             (" | ST alpha=1 | ST - alpha=1 (sd)" if "unguarded" in st[0] else "") + " |",
             "|---|---|---|---|---|" + ("---|---|" if "unguarded" in st[0] else "")]
    for m in ("pearson_delta", "mae", "overlap_at_N", "de_nsig_counts_pred"):
        a = np.array([b[kind].get(m, np.nan) for b in bl], float)
        s = np.array([x.get(m, np.nan) for x in st], float)
        sign = -1 if m in LOWER else 1
        d = s - a
        row = (f"| {m} | {np.nanmean(a):.4f} | {np.nanmean(s):.4f} +- {sd(s):.4f} | {np.nanmean(d):+.4f} ({sd(d):.4f})"
               f" | {int(np.sum(sign * d > 0)) if m != 'de_nsig_counts_pred' else '-'}/{K}")
        if "unguarded" in st[0]:
            u = np.array([x["unguarded"].get(m, np.nan) for x in st], float)
            row += f" | {np.nanmean(u):.4f} | {np.nanmean(s - u):+.4f} ({sd(s - u):.4f})"
        lines.append(row + " |")
    rules = list(st[0].get("guard_by") or {})
    if rules:  # the alpha each guard criterion/rule would choose, the same weights, paired with ST
        lines += ["", "| guard rule | alpha per seed | " + " | ".join(f"{m} (- ST, sd)" for m in
                  ("pearson_delta", "mae", "overlap_at_N")) + " |", "|---|---|---|---|---|"]
        for n in rules:
            g = [x["guard_by"][n] for x in st]
            cells = []
            for m in ("pearson_delta", "mae", "overlap_at_N"):
                v = np.array([y.get(m, np.nan) for y in g], float)
                d = v - np.array([x.get(m, np.nan) for x in st], float)
                cells.append(f"{np.nanmean(v):.4f} ({np.nanmean(d):+.4f}, {sd(d):.4f})")
            lines.append(f"| {n} | {[y['alpha'] for y in g]} | " + " | ".join(cells) + " |")
    real = np.nanmean([b[kind].get("de_nsig_counts_real", np.nan) for b in bl])
    lines.append(f"\nreal DE genes per perturbation: {real:.1f}; kept step per seed: "
                 f"{[x.get('best_step') for x in st]}" + (f"; alpha per seed: {[x.get('alpha') for x in st]}"
                                                           if "alpha" in st[0] else ""))
    return lines


def table(out, cache):
    cfg, res = collect(out, cache)
    A = analyse(res)
    lines = [f"# protocol: {out}", f"recipe: `{cfg['recipe']}`", ""]
    for t, rows in A.items():
        K, BASELINES = rows["mae"]["K"], list(rows["mae"]["bl"])
        lines += [f"## {t} ({TASKS[t][2]}; {K} seeds)", "",
                  "| metric | " + " | ".join(SHORT[n] for n in BASELINES) +
                  " | ceiling | ST mean +- sd | ST - best (sd) | wins | calibrated | ens. mixture (- members) | ens. shift (- members) |",
                  "|---|" + "---|" * (len(BASELINES) + 7)]
        for m, r in rows.items():
            b = " | ".join((f"**{r['bl'][n][0]:.4f}**" if n == r["best"] else f"{r['bl'][n][0]:.4f}")
                           for n in BASELINES)
            st = f"{r['st'][0]:.4f} +- {r['st'][1]:.4f}"
            en = " | ".join("" if r.get(n) is None else f"{r[n]:.4f}" + (
                f" ({r[n + '_diff']:+.4f})" if n + "_diff" in r else "") for n in ENSEMBLES)
            if r["flag"]:
                lines.append(f"| {m} | {b} | {r['ceil']:.4f} | {st} | uninformative: {r['flag']} | | | {en} |")
                continue
            df = "" if r["diff"] is None else f"{r['diff'][0]:+.4f} ({r['diff'][1]:.4f})"
            wins = "" if r["wins"] is None else f"{r['wins']}/{r['K']}"
            cal = "" if r["best"] is None else ("-" if r["cal"] is None else f"{r['cal']:+.2f}")
            lines.append(f"| {m} | {b} | {r['ceil']:.4f} | {st} | {df} | {wins} | {cal} | {en} |")
        lines += anchor_block(t, res[t])
        tg = targets(rows)
        lines += ["", "targets: " + "; ".join(f"{n}: {'n/a (' + d + ')' if ok is None else ('MET' if ok else 'not met')}"
                                               + (f" {d}" if d and ok is not None else "") for n, ok, d in tg), ""]
    txt = "\n".join(lines)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(txt + "\n")
    json.dump(A, open(os.path.join(out, "summary.json"), "w"), indent=1)
    return txt


def compare(outs, cache, metrics=("pearson_delta", "mae", "discrimination_score_l1", "overlap_at_N",
                                  "spread")):
    """Several protocol outputs (recipes) side by side: ST mean +- sd and ST - best baseline."""
    lines = []
    res = {o: analyse(collect(o, cache)[1]) for o in outs}
    tasks = [t for t in TASKS if any(t in r for r in res.values())]
    for t in tasks:
        lines += [f"## {t}", "", "| recipe | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        A0 = next(A for A in res.values() if t in A)[t]
        cells = []
        for m in metrics:
            r = A0[m]
            cells.append("uninformative: " + r["flag"] if r["flag"] else
                         "-" if r["best"] is None else f"{SHORT[r['best']]} {r['bl'][r['best']][0]:.3f}")
        lines.append("| best baseline | " + " | ".join(cells) + " |")
        for o, A in res.items():
            if t not in A:
                continue
            cells = []
            for m in metrics:
                r = A[t][m]
                s = f"{r['st'][0]:.3f}+-{r['st'][1]:.3f}"
                if r["diff"] is not None and not r["flag"]:
                    s += f" ({r['diff'][0]:+.3f}+-{r['diff'][1]:.3f}, {r['wins']}/{r['K']})"
                cells.append(s)
            lines.append(f"| {os.path.basename(o.rstrip('/'))} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = Parser(prog="python -m state.experiment", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--tasks", default="all", help="task names or roles, comma-separated: all (every task "
                   "type, the default), choose, check, zeroshot, combo, unseen, or a task of config/protocol.py")
    r.add_argument("--seeds", default="0,1,2")
    r.add_argument("--recipe", default="", help="train.py overrides, e.g. '--preset=cpu --max_steps=2000'")
    r.add_argument("--out", required=True)
    r.add_argument("--cache", default="runs/exp/data", help="prepared data, splits, ceilings, baselines")
    r.add_argument("--shared", default=SHARED)
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--ensemble", action="store_true", help="also score the seeds' ensemble per task")
    t = sub.add_parser("table")
    t.add_argument("out")
    t.add_argument("--cache", default="runs/exp/data")
    c = sub.add_parser("compare")
    c.add_argument("outs", nargs="+")
    c.add_argument("--cache", default="runs/exp/data")
    c.add_argument("--metrics", default="pearson_delta,mae,discrimination_score_l1,overlap_at_N,spread")
    a = ap.parse_args(dashes(argv))
    if a.cmd == "run":
        tasks = pick_tasks(a.tasks)
        try:
            seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"python -m state.experiment run: --seeds={a.seeds}: give integers, e.g. --seeds=0,1,2") from None
        if not seeds or len(set(seeds)) < len(seeds):
            raise UserError(f"python -m state.experiment run: --seeds={a.seeds}: give distinct integer seeds, "
                            "e.g. --seeds=0,1,2")
        run(tasks, seeds, os.path.abspath(a.out), os.path.abspath(a.cache), a.shared, a.recipe, a.jobs,
            a.ensemble)
    for o in ([a.out] if a.cmd == "table" else a.outs if a.cmd == "compare" else []):
        if not os.path.isfile(os.path.join(o, "protocol.json")):
            raise UserError(f"python -m state.experiment {a.cmd}: {o}: not a protocol run folder (no protocol.json); "
                            "give the --out of a `python -m state.experiment run`")
    if a.cmd == "table":
        print(table(os.path.abspath(a.out), os.path.abspath(a.cache)))
    elif a.cmd == "compare":
        print(compare([os.path.abspath(o) for o in a.outs], os.path.abspath(a.cache), a.metrics.split(",")))
    return 0


if __name__ == "__main__":
    from state.errors import run as run_cli
    sys.exit(run_cli("python -m state.experiment", main, None, __doc__))
