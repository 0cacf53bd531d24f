"""
Train / val / test splits over a prepared dataset (SPEC 6): zero-shot context, few-shot context, unseen
perturbation, unseen combination; reading and writing the reference's TOML split files.

    python -m state.splits make --data=DIR --task=fewshot --context=U87MG --support=0.3 --seed=0 --out=split.json
    python -m state.splits make --data=DIR --task=fewshot --context=U87MG --support_perts=MAP2K3,MAP2K6,MAP3K21 --out=s.json
    python -m state.splits make --data=DIR --task=fewshot --context=rep_1 --support=0.3 --guard_perts=2 --out=s.json
    python -m state.splits make --data=DIR --task=zeroshot --context=U87MG --out=split.json
    python -m state.splits toml --data=DIR --toml=split.toml --out=split.json   # a reference TOML
    python -m state.splits make --data=DIR --task=combo --out=split.json   # doubles whose singles were measured
    python -m state.splits make --data=DIR --task=unseen --pert_features=pca --test_perts=JAK2,STAT1 --out=s.json
    python -m state.splits make --data=DIR --task=unseen --pert_features=pca --test_perts=JAK2 --guard_perts=2 --out=s.json
    python -m state.splits report --data=DIR --split=split.json

`make` also writes a reference-compatible TOML next to the JSON (split.toml). The JSON lists held-out
(context, perturbation) groups, the val fraction and seed, and the prepared data's checksum, never row
indices: its size and the memory to load it grow with the number of groups, not cells. Controls of every
context train; the held-out context's controls are also `test_ctrl`. `val` is a fraction of the cells of
every training group (controls included), never from test groups.
"""

import json
import os
import sys
import tomllib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from state.config import dashes
from state.data import Prepared, Rows, hkey
from state.errors import Parser, UserError, message, output_file
from state.perts import check_combo_labels, parts_of, read_vectors, target_gene


FORMAT = 2  # 1: row indices listed in the file
REMAKE = ("re-make it with `python -m state.splits make --data=DIR ...` (or `python -m state.splits toml ...`) "
          "rather than editing it by hand")
# -----------------------------------------------------------------------------
# split tasks: one builder each, in TASKS (a new task is one function and one entry there)

@dataclass
class Held:
    """What a task holds out. groups: the test (context, perturbation) name pairs; context: the held-out
    context (None: whole perturbations in every context that has them); support: its perturbations that
    train; guard_from: candidates for guard perturbations (held out of training as the test ones are: in
    the held-out context (few-shot, drawn from its support), or whole (unseen, combo); None: the task has
    none) and guard_what, what they are; combo_sep: the labels' separator (combination tasks)."""
    groups: list
    context: str = None
    support: list = field(default_factory=list)
    guard_from: list = None
    guard_what: str = None
    combo_sep: str = None


def _perts_of(data, k):
    """Perturbation names with cells in context code k (from the group table)."""
    gt = data.group_table
    return sorted({data.pert_names[p] for p in np.unique(gt[(gt[:, 0] == k) & (gt[:, 1] != data.control_code), 1])})


def _ctx(data, context):
    if context is None:
        if len(data.context_names) == 1:
            return 0
        raise UserError(f"which context to hold out? pass context= one of {data.context_names}")
    if context not in data.context_names:
        raise UserError(f"context '{context}' not in the data's column '{data.context_col}'; "
                         f"contexts: {data.context_names}")
    return data.context_names.index(context)


def _named(names, allowed, msg):
    """sorted(names), or ValueError(msg(the names not in `allowed`))."""
    bad = [p for p in names if p not in allowed]
    if bad:
        raise UserError(msg(bad))
    return sorted(names)


def _in_every_context(data, held):
    """Test groups for perturbations held out whole: every context that has them."""
    gt = data.group_table
    hc = [data.pert_names.index(p) for p in held]
    return sorted({(data.context_names[c], data.pert_names[p]) for c, p in gt[np.isin(gt[:, 1], hc), :2].tolist()})


def _context_task(data, rng, context=None, support=0.3, support_perts=None, zero=False, **_):
    """fewshot: one context held out but for its support perturbations (support_perts, or a seeded
    `support` fraction of its perturbations); zeroshot (zero=True): all of them."""
    k = _ctx(data, context)
    perts = _perts_of(data, k)
    if not perts:
        raise UserError(f"context '{data.context_names[k]}' has no perturbed cells to test")
    if zero:
        sup = []
    elif support_perts is not None:
        sup = _named(support_perts, perts, lambda bad: f"support perturbation(s) {bad} have no cells in "
                     f"context '{data.context_names[k]}'; its perturbations: {perts}")
    else:
        n = int(round(support * len(perts)))
        sup = sorted(np.array(perts)[np.sort(rng.permutation(len(perts))[:n])].tolist()) if n else []
    held = [p for p in perts if p not in sup]
    if not held:
        raise UserError(f"empty split: every perturbation of '{data.context_names[k]}' is in the support set")
    cname = data.context_names[k]
    return Held([(cname, p) for p in held], cname, sup, guard_from=None if zero else sup,
                guard_what=f"support perturbations of '{cname}'")


def _unseen(data, rng, features=None, test_perts=None, test_frac=0.2, **_):
    """Whole perturbations held out in every context (test_perts, or a seeded test_frac of those with
    features): an unseen perturbation is predicted from its features alone."""
    if features is None:
        raise UserError("the unseen-perturbation task needs perturbation features (e.g. gene embeddings): "
                         "with one-hot encodings a perturbation never seen in training has no embedding. "
                         "Pass features= / --pert-features")
    perts = [p for p in data.pert_names if p != data.control]
    if test_perts is not None:
        held = _named(test_perts, perts,
                      lambda bad: f"test perturbation(s) {bad} not in the data's '{data.pert_col}' labels")
    else:  # among the perturbations that have features: an unseen one is only predictable from them
        have = [p for p in perts if p in features]
        held = sorted(np.array(have)[rng.permutation(len(have))[:max(1, int(round(test_frac * len(have))))]].tolist())
    missing = [p for p in held if p not in features]
    if missing:
        raise UserError(f"no features for test perturbation(s) {sorted(set(missing))[:10]}: an unseen "
                         "perturbation is predicted from its features alone")
    cand = sorted(set(p for p in perts if p in features) - set(held))
    return Held(_in_every_context(data, held), guard_from=cand, guard_what="perturbations with features")


def _combo(data, rng, test_perts=None, combo_sep="+", **_):
    """Combinations held out in every context (test_perts, or every one whose parts are all measured
    singles); singles and the other combinations train, so a test combination comes from its parts."""
    labels = [p for p in data.pert_names if p != data.control]
    check_combo_labels(labels, combo_sep, data.control, where=f"{data.dir}: '{data.pert_col}' labels")
    combos = [p for p in labels if len(parts_of(p, combo_sep)) > 1]
    if not combos:
        raise UserError(f"task combo: no label of '{data.pert_col}' holds the separator '{combo_sep}' "
                         f"(labels include {labels[:10]}); pass --combo-sep")
    if test_perts is not None:
        held = _named(test_perts, combos, lambda bad: f"test combination(s) {bad} are not combination "
                      f"labels of the data (combinations: {combos[:20]})")
    else:
        singles = set(labels) - set(combos)
        held = [p for p in combos if all(q in singles for q in parts_of(p, combo_sep))]
        if not held:
            raise UserError("task combo: no combination has all its parts measured as singles; "
                             "name the test combinations (test_perts=)")
    return Held(_in_every_context(data, held), guard_from=sorted(set(combos) - set(held)),
                guard_what="combinations", combo_sep=combo_sep)


# task name (the split file's "task", --task) -> its builder
TASKS = {"fewshot": _context_task, "zeroshot": partial(_context_task, zero=True), "unseen": _unseen,
         "combo": _combo}


# the fields of a split file: name -> (required, what it must be)
FIELDS = {"format": (True, f"the integer {FORMAT}"), "task": (True, f"one of {', '.join(TASKS)}"),
          "context": (True, "the held-out context's name (a string), or null"),
          "test_groups": (True, "a list of [context, perturbation] pairs of strings"),
          "support": (True, "a list of perturbation names (strings)"),
          "val_frac": (True, "a number in [0, 1)"), "seed": (True, "an integer >= 0"),
          "checksum": (True, "the prepared data's checksum (a string, DIR/index.json 'checksum')"),
          "combo_sep": (False, "the separator of combination labels (a string), or null"),
          "guard_perts": (False, "a list of perturbation names (strings) held out of training as the test ones are"),
          "counts": (False, "an object of cell counts per part")}


def _kind(v):
    """What a JSON value is, for an error message: 'the string "0.1"', 'null', 'a list'."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if isinstance(v, str):
        return f"the string {json.dumps(v)}"
    if isinstance(v, (int, float)):
        return f"the {'integer' if isinstance(v, int) else 'number'} {v!r}"
    return {list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_fields(d, where):
    """Every field of a split file's object `d`: present, of its type, in range, no unknown field, no
    duplicated entry. Raises UserError(`where`: field, what is wrong, what to do)."""
    def bad(field, what):
        raise UserError(f"{where}: field '{field}' {what}; {REMAKE}")
    if not isinstance(d, dict):
        raise UserError(f"{where}: holds {_kind(d)}, not a split (a JSON object with the fields "
                        f"{', '.join(FIELDS)}); {REMAKE}")
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
        raise UserError(f"{where}: unknown field(s) {unknown} (a split has {', '.join(FIELDS)}); {REMAKE}")
    for k, (req, what) in FIELDS.items():
        if req and k not in d:
            bad(k, f"is missing (it must be {what})")
    if type(d["format"]) is not int or d["format"] != FORMAT:
        bad("format", f"is {_kind(d['format'])}; it must be {FIELDS['format'][1]}")
    if d["task"] not in TASKS:
        bad("task", f"is {_kind(d['task'])}, not one of {', '.join(TASKS)}")
    for k in ("context", "combo_sep"):
        if d.get(k) is not None and (not isinstance(d[k], str) or not d[k]):
            bad(k, f"is {_kind(d[k])}; it must be {FIELDS[k][1]}")
    if d["task"] == "combo" and not d.get("combo_sep"):
        bad("combo_sep", f"is {_kind(d.get('combo_sep'))}, but a combo split needs its labels' separator (e.g. \"+\")")
    if not _num(d["val_frac"]) or not 0 <= d["val_frac"] < 1:
        bad("val_frac", f"is {_kind(d['val_frac'])}; it must be a number in [0, 1)")
    if not isinstance(d["seed"], int) or isinstance(d["seed"], bool) or not 0 <= d["seed"] < 2 ** 63:
        bad("seed", f"is {_kind(d['seed'])}; it must be an integer >= 0")
    if not isinstance(d["checksum"], str) or not d["checksum"]:
        bad("checksum", f"is {_kind(d['checksum'])}: a split must carry the checksum of the prepared data "
            "it was made on (DIR/index.json 'checksum'), or it would validate against any data")
    tg = d["test_groups"]
    if not isinstance(tg, list):
        bad("test_groups", f"is {_kind(tg)}; it must be {FIELDS['test_groups'][1]}")
    seen = set()
    for i, g in enumerate(tg):
        if not (isinstance(g, list) and len(g) == 2 and all(isinstance(x, str) and x for x in g)):
            bad("test_groups", f"entry {i} is {json.dumps(g)}; each entry must be a [context, perturbation] "
                "pair of non-empty strings")
        if tuple(g) in seen:
            bad("test_groups", f"lists {json.dumps(g)} twice (entry {i})")
        seen.add(tuple(g))
    for k in ("support", "guard_perts"):
        v = d.get(k, [])
        if not isinstance(v, list):
            bad(k, f"is {_kind(v)}; it must be {FIELDS[k][1]}")
        for i, p in enumerate(v):
            if not isinstance(p, str) or not p:
                bad(k, f"entry {i} is {_kind(p)}; each entry must be a perturbation name")
            if p in v[:i]:
                bad(k, f"lists '{p}' twice (entry {i})")
    ctxs = {c for c, _ in tg}
    c = d["context"]
    if c is not None and ctxs and c not in ctxs and set(c.split(",")) != ctxs:
        bad("context", f"is '{c}' but the test groups hold out context(s) {sorted(ctxs)}")
    if "counts" in d and not (isinstance(d["counts"], dict) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in d["counts"].values())):
        bad("counts", f"is {_kind(d['counts'])}; it must be {FIELDS['counts'][1]} (integers >= 0)")


def _write_atomic(path, text):
    """Write text to path through a temp file and a rename: a failed write leaves no half file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@dataclass
class Split:
    """A split as group ids (O(groups) to store and to derive): the held-out (context, perturbation)
    pairs, the val fraction and its seed, and the checksum of the prepared data. Bound to the data by
    validate(), it gives each part as Rows (`part`) or, materialised, as sorted row indices (`train`,
    `val`, `test`, `test_ctrl`). Every prepared group (context, pert, batch) whose pair is held out is
    test; every other group trains, less its val cells: the first floor(val_frac * n) cells (n >= 2) of
    a seeded permutation of the group (the same one the train part starts after). test_ctrl = the
    controls of every context with a test group; they also train."""
    task: str
    context: str  # held-out context name (comma-joined when a TOML holds out several), or None
    test_groups: list = field(default_factory=list)  # [(context_name, pert_name)]
    support: list = field(default_factory=list)  # perts of the held-out context that train
    val_frac: float = 0.1
    seed: int = 0
    checksum: str = None  # of the prepared data it indexes
    combo_sep: str = None  # combination labels' separator (combo task): B+A is the same test group as A+B
    guard_perts: list = field(default_factory=list)  # perts held out of training as the test ones are (few-shot:
    # in the held-out context; unseen / combo: in every context): those cells are all val, the data the guard
    # and support selection score perturbations the model did not train on

    def __post_init__(self):
        self.test_groups = [tuple(g) for g in self.test_groups]
        self.data, self._parts, self._arrays = None, None, {}
        self.path = None  # the file it was read from (load), named by every error

    def _err(self, what, fix=None):
        where = f"split file {self.path}" if self.path else f"split (task {self.task})"
        return UserError(f"{where}: {what}; {fix or REMAKE}")

    def validate(self, data):
        """Check the split against the data, derive its parts, raise UserError (a ValueError) naming the
        split file unless usable and leak-free. Returns self, bound to `data`."""
        if not isinstance(self.checksum, str) or not self.checksum:
            raise self._err(f"no checksum ({self.checksum!r}): a split must carry the checksum of the prepared "
                            f"data it was made on, or it would validate against any data")
        if self.checksum != data.checksum:
            raise self._err(f"split was made for prepared data {self.checksum}, not {data.checksum} ({data.dir})",
                            f"use the prepared folder it was made on, or make a split for {data.dir} with "
                            f"`python -m state.splits make --data={data.dir} ...`")
        if not _num(self.val_frac) or not 0 <= self.val_frac < 1:
            raise self._err(f"val_frac={self.val_frac!r}: the fraction of each training group moved to val "
                            "must be a number in [0, 1)")
        gt = data.group_table
        c, p, a, n = gt[:, 0], gt[:, 1], gt[:, 3], gt[:, 4] - gt[:, 3]
        ctl = data.control_code
        cix, pix = {x: i for i, x in enumerate(data.context_names)}, {x: i for i, x in enumerate(data.pert_names)}
        held = set()
        for cn, pn in self.test_groups:
            if cn not in cix:
                raise self._err(f"test group ({cn}, {pn}): context '{cn}' not in the data's contexts "
                                f"{data.context_names[:20]}")
            if pn not in pix:
                raise self._err(f"test group ({cn}, {pn}): perturbation '{pn}' not in the data's "
                                f"'{data.pert_col}' labels")
            if pix[pn] == ctl:
                raise self._err(f"test group ({cn}, {pn}) is the control; controls belong in test_ctrl")
            if (cix[cn], pix[pn]) in held:
                raise self._err(f"test group ({cn}, {pn}) is listed twice")
            held.add((cix[cn], pix[pn]))
        for what, names in (("support", self.support), ("guard", self.guard_perts)):
            for i, q in enumerate(names):
                if q not in pix:
                    raise self._err(f"{what} perturbation '{q}' not in the data's '{data.pert_col}' labels")
                if pix[q] == ctl:
                    raise self._err(f"{what} perturbation '{q}' is the control (controls always train)")
                if what == "support" and q in names[:i]:
                    raise self._err(f"support perturbation '{q}' is listed twice")
                if what == "guard" and (q in self.support or q in {pn for _, pn in self.test_groups}
                                        or names.count(q) > 1):
                    raise self._err(f"guard perturbation '{q}' is also a support or test perturbation, or listed "
                                    "twice: guard perturbations are held out of training, apart from the test")
        if self.combo_sep:  # a test combination must not train under a reordered name (B+A for A+B)
            check_combo_labels([pn for _, pn in self.test_groups], self.combo_sep, data.control,
                               where=f"split file {self.path}" if self.path else "split")
            canon = lambda n: "\0".join(sorted(parts_of(n, self.combo_sep)))
            test_names = {(k, canon(data.pert_names[q])): data.pert_names[q] for k, q in held}
            for k, q in {(int(a), int(b)) for a, b in gt[:, :2]} - held:
                hit = test_names.get((k, canon(data.pert_names[q])))
                if hit is not None:
                    raise self._err(f"test combination '{hit}' in context '{data.context_names[k]}' trains as "
                                    f"'{data.pert_names[q]}' (the same parts reordered): hold both out")
        key = c * len(data.pert_names) + p
        is_test = np.isin(key, [k * len(data.pert_names) + q for k, q in held])
        for k, q in held:
            if not np.any(is_test & (c == k) & (p == q)):
                raise self._err(f"test perturbation '{data.pert_names[q]}' in context "
                                 f"'{data.context_names[k]}' has no cells")
        hctx = sorted({k for k, _ in held})
        is_tc = np.isin(c, hctx) & (p == ctl)
        is_g = np.isin(p, [pix[q] for q in self.guard_perts]) & ~is_test  # guard groups: every cell is val
        if self.task == "fewshot":  # held out like the test: in the held-out context only
            is_g &= np.isin(c, hctx)
        for q in self.guard_perts:  # a guard perturbation without cells there would guard nothing, silently
            if not np.any(is_g & (p == pix[q])):
                raise self._err(f"guard perturbation '{q}' has no cells to hold out" + (
                    f" in the held-out context(s) {[data.context_names[k] for k in hctx]}"
                    if self.task == "fewshot" else ""))
        tr = ~is_test & ~is_g
        m = np.where(tr & (n >= 2), np.floor(self.val_frac * n), 0).astype(np.int64)
        m = np.where(is_g, n, m)
        key = hkey(self.seed, a, 7)
        va = tr | is_g
        self._parts = dict(train=Rows(a[tr], n[tr], m[tr], n[tr], key[tr], m[tr] > 0),
                           val=Rows(a[va], n[va], 0 * m[va], m[va], key[va], (m[va] > 0) & ~is_g[va]),
                           test=Rows(a[is_test], n[is_test], 0 * n[is_test], n[is_test]),
                           test_ctrl=Rows(a[is_tc], n[is_tc], 0 * n[is_tc], n[is_tc]))
        self._arrays, self.data = {}, data
        if not np.any(tr & (p != ctl)):
            raise self._err("empty split: no perturbed training cells")
        if not held:
            raise self._err(f"empty split: no test cells (task {self.task}, context {self.context})")
        for k in np.unique(c[tr]):
            if not np.any(tr & (c == k) & (p == ctl)):
                raise self._err(f"context '{data.context_names[k]}' has no control cells in train")
        for k in hctx:
            if not np.any(is_tc & (c == k)):
                raise self._err(f"held-out context '{data.context_names[k]}' has no control cells in test_ctrl")
        trains = {(int(k), int(q)) for k, q in gt[tr, :2].tolist()}
        for q in self.support:  # support: perturbations of the held-out context(s) that train there
            if not any((k, pix[q]) in trains for k in hctx):
                where = [data.context_names[k] for k in hctx if (k, pix[q]) in held]
                raise self._err(f"support perturbation '{q}' " + (
                    f"is a test perturbation of {where}" if where else
                    f"has no cells in the held-out context(s) {[data.context_names[k] for k in hctx]}") +
                    ": support perturbations are those of the held-out context that train")
        return self

    def part(self, name, contexts=None, perturbed=None, perts=None):
        """Rows of one part; contexts (codes), perturbed (True: no controls, False: only controls) and
        perts (codes) keep some of its groups."""
        if self.data is None:
            raise UserError("split not bound to its data: call split.validate(data) first")
        r = self._parts[name]
        if contexts is None and perturbed is None and perts is None:
            return r
        gi = np.searchsorted(self.data.group_table[:, 3], r.start, "right") - 1
        gc, gp = self.data.group_table[gi, 0], self.data.group_table[gi, 1]
        keep = np.ones(len(gi), bool) if contexts is None else np.isin(gc, list(contexts))
        if perturbed is not None:
            keep &= (gp != self.data.control_code) == perturbed
        if perts is not None:
            keep &= np.isin(gp, list(perts))
        return Rows(r.start[keep], r.n[keep], r.lo[keep], r.hi[keep], r.key[keep], r.shuf[keep])

    def _rows(self, name):
        if name not in self._arrays:
            self._arrays[name] = self.part(name).array()
        return self._arrays[name]

    train = property(lambda self: self._rows("train"))  # (n,) int64 sorted row indices
    val = property(lambda self: self._rows("val"))
    test = property(lambda self: self._rows("test"))  # perturbed cells of the held-out groups
    test_ctrl = property(lambda self: self._rows("test_ctrl"))  # controls of the held-out context(s)

    def report(self, data):
        """Cells per split, context and perturbation, as text (O(groups))."""
        counts = {k: len(self._parts[k]) for k in self._parts}
        out = [f"split task={self.task} context={self.context}: train {counts['train']}, val {counts['val']}, "
               f"test {counts['test']} (+{counts['test_ctrl']} test controls) cells; support {self.support}"
               + (f"; guard perturbations (held out of training) {self.guard_perts}" if self.guard_perts else "")]
        gt = data.group_table
        per = {}
        for k, r in self._parts.items():
            gi = np.searchsorted(gt[:, 3], r.start, "right") - 1
            per[k] = (gt[gi, 0], gt[gi, 1], r.hi - r.lo)
        for ci, cn in enumerate(data.context_names):
            parts = []
            for k, (c, p, m) in per.items():
                s = c == ci
                parts.append(f"{k} {int(m[s].sum())} cells/{len(set(p[s].tolist()) - {data.control_code})} perts")
            out.append(f"  {cn}: " + ", ".join(parts))
        c, p, m = per["test"]
        tot = {}
        for a, b, x in zip(c.tolist(), p.tolist(), m.tolist()):
            tot[(a, b)] = tot.get((a, b), 0) + x
        out.append("  test groups: " + ", ".join(f"{data.context_names[a]}/{data.pert_names[b]} {k}"
                                                  for (a, b), k in sorted(tot.items())))
        return "\n".join(out)

    def save(self, path):
        d = dict(format=FORMAT, task=self.task, context=self.context, support=self.support,
                 test_groups=self.test_groups, val_frac=self.val_frac, seed=self.seed, checksum=self.checksum,
                 combo_sep=self.combo_sep)
        if self.guard_perts:
            d["guard_perts"] = self.guard_perts
        if self._parts:
            d["counts"] = {k: len(v) for k, v in self._parts.items()}
        _write_atomic(path, json.dumps(d, indent=1))
        return path

    @classmethod
    def load(cls, path):
        """A split file (format 2) -> Split, every field checked (check_fields); UserError naming the file
        and the field otherwise. validate(data) then checks its names against the data."""
        where = f"split file {path}"
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{where}: cannot read it ({getattr(e, 'strerror', None) or e}); check the path, "
                            "or make a split with `python -m state.splits make --data=DIR ...`") from None
        if not text.strip():
            raise UserError(f"{where}: is empty; {REMAKE}")
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not JSON ({e}); {REMAKE}") from None
        if isinstance(d, dict) and (d.get("format") == 1 or ("format" not in d and ("train" in d or "val" in d))):
            raise UserError(f"{where} has an older format (row indices listed; format {d.get('format', 1)}); "
                            "re-make it with python -m state.splits make (or toml)")
        check_fields(d, where)
        s = cls(d["task"], d["context"], d["test_groups"], d["support"], d["val_frac"], d["seed"],
                d["checksum"], d.get("combo_sep"), d.get("guard_perts", []))
        s.path = str(path)
        return s

    def write_toml(self, path, data, dataset="data"):
        """A reference-compatible TOML ([datasets], [training], [zeroshot] or [fewshot."ds.ctx"])."""
        q = lambda s: json.dumps(str(s))  # TOML basic strings share JSON's escaping
        lines = ["[datasets]", f"{dataset} = {q(data.dir)}", "", "[training]", f'{dataset} = "train"', ""]
        ctxs = sorted({c for c, _ in self.test_groups})
        if self.task == "zeroshot":
            lines += ["[zeroshot]"] + [f"{q(dataset + '.' + c)} = \"test\"" for c in ctxs] + [""]
        else:
            for c in ctxs:
                ps = [p for cc, p in self.test_groups if cc == c]
                lines += [f"[fewshot.{q(dataset + '.' + c)}]", "val = []",
                          "test = [" + ", ".join(q(p) for p in ps) + "]", ""]
        _write_atomic(path, "\n".join(lines))
        return path


def make_split(data, task="fewshot", context=None, support=0.3, support_perts=None, val_frac=0.1, seed=0,
               features=None, test_perts=None, test_frac=0.2, combo_sep="+", guard_perts=None):
    """Build and validate a Split (see module docstring; each task's builder in TASKS says what it holds
    out). `features`, `test_perts`, `test_frac` serve the unseen-perturbation task: it holds out whole
    perturbations across all contexts. task="combo": the test groups are combinations (labels with
    `combo_sep`), `test_perts` or by default every combination whose parts are all measured singles.
    guard_perts: perturbations held out of training as the test ones are, the data on which support
    selection and the guard (train.py --select=support --guard) score what the model did not train on: a
    list of names, or a count drawn (seeded) from the candidates (fewshot: the support perturbations, which
    then no longer train in the held-out context; unseen: perturbations with features, held out whole;
    combo: combinations, held out whole)."""
    if not 0 <= support <= 1:
        raise UserError(f"support={support}: the fraction of the held-out context's perturbations that "
                         "train must be in [0, 1]")
    if not 0 <= val_frac < 1:
        raise UserError(f"val_frac={val_frac}: the fraction of each training group moved to val must be in [0, 1)")
    if not 0 < test_frac <= 1:
        raise UserError(f"test_frac={test_frac} must be in (0, 1]")
    if task not in TASKS:
        raise UserError(f"task '{task}' not one of {', '.join(TASKS)}")
    rng = np.random.default_rng(seed)
    h = TASKS[task](data, rng, context=context, support=support, support_perts=support_perts, features=features,
                    test_perts=test_perts, test_frac=test_frac, combo_sep=combo_sep)
    gp = []
    if guard_perts is not None:
        if h.guard_from is None:
            raise UserError(f"guard_perts: task {task} has no candidates (it holds out every perturbation of "
                            "the context); guard perturbations serve the fewshot, unseen and combo tasks")
        cand = h.guard_from
        if not cand:
            raise UserError(f"guard_perts: 0 candidates ({h.guard_what}: none) to hold out as guard; few-shot: "
                            "give at least 2 support perturbations (--support or --support_perts)")
        if isinstance(guard_perts, (int, np.integer)) and not isinstance(guard_perts, bool):
            if not 1 <= guard_perts < len(cand):
                raise UserError(f"guard_perts={guard_perts}: draw between 1 and {len(cand) - 1} of the "
                                f"{len(cand)} candidates ({cand[:20]}), so that some still train")
            gp = sorted(np.array(cand)[rng.permutation(len(cand))[:guard_perts]].tolist())
        else:
            gp = _named(guard_perts, cand, lambda bad: f"guard perturbation(s) {bad} are not candidates: "
                        f"{h.guard_what} that are not test perturbations ({cand[:20]})")
        if gp and h.support and len(gp) >= len(h.support):
            raise UserError(f"guard_perts={guard_perts}: every support perturbation would be a guard one; leave "
                            "at least one to train in the held-out context")
        h.support = [q for q in h.support if q not in gp]
    return Split(task, h.context, h.groups, h.support, val_frac, seed, data.checksum, h.combo_sep, gp).validate(data)


TOML_TABLES = ("datasets", "training", "zeroshot", "fewshot")


def read_toml(path, data, val_frac=0.1, seed=0):
    """A reference split TOML -> Split. Keys are "<dataset>.<context value>"; fewshot val and test lists
    both leave training and become test groups here (our val comes from training groups). Every table
    and entry is checked (types, unknown tables and keys, duplicates, names against the data): a
    UserError names the file, the entry and what is wrong."""
    fix = "correct it (the reference's format: [datasets], [training], [zeroshot], [fewshot.\"<dataset>.<context>\"])"
    if not _num(val_frac) or not 0 <= val_frac < 1:
        raise UserError(f"val_frac={val_frac!r}: the fraction of each training group moved to val must be in [0, 1)")
    if not os.path.exists(path):
        raise UserError(f"split TOML {path} not found")
    try:
        with open(path, "rb") as f:
            t = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    bad = lambda what: UserError(f"{path}: {what}; {fix}")
    unknown = sorted(set(t) - set(TOML_TABLES))
    if unknown:
        raise bad(f"unknown table(s) or key(s) {unknown} (a split TOML has {', '.join(TOML_TABLES)})")
    for k in TOML_TABLES:
        if k in t and not isinstance(t[k], dict):
            raise bad(f"'{k}' is {_kind(t[k])}, not a table [{k}]")
    ds = t.get("datasets", {})
    if not ds:
        raise UserError(f"{path}: no [datasets] table")
    for name, where in ds.items():  # as given (from the working directory) or next to the TOML
        if not isinstance(where, str) or not where:
            raise bad(f"[datasets] {name} is {_kind(where)}, not a path (a string)")
        if not (os.path.exists(where) or os.path.exists(os.path.join(os.path.dirname(str(path)), where))):
            raise UserError(f"{path}: [datasets] {name} = {where!r} does not exist")
    tr = t.get("training", {})
    unknown = [k for k in tr if k not in ds]
    if unknown:
        raise UserError(f"{path}: [training] names dataset(s) {unknown} not in [datasets] ({sorted(ds)})")
    for k, v in tr.items():
        if v != "train":
            raise bad(f"[training] {k} is {_kind(v)}; the only value understood is \"train\"")
    if not tr:
        raise UserError(f"{path}: no dataset marked \"train\" in [training]")

    def parse(key, table):
        d, dot, c = key.partition(".")
        if not dot:
            raise bad(f"[{table}] key '{key}' is not '<dataset>.<context>'")
        if d not in ds:
            raise UserError(f"{path}: key '{key}' names dataset '{d}' not in [datasets] ({sorted(ds)})")
        if c not in data.context_names:
            raise UserError(f"{path}: key '{key}': context '{c}' not found in column '{data.context_col}' "
                            f"(contexts: {data.context_names}); the key after the dot is the context value")
        k = data.context_names.index(c)
        if k in held:
            raise bad(f"[{table}] '{key}': context '{c}' is held out twice (in [zeroshot] and [fewshot], or "
                      "under two dataset names)")
        return k

    ctl = data.control_code
    groups, held, task = set(), [], None
    for key, v in t.get("zeroshot", {}).items():
        if v not in ("test", "val"):
            raise bad(f"[zeroshot] '{key}' is {_kind(v)}; it must be \"test\" (or \"val\")")
        k = parse(key, "zeroshot")
        groups |= {(data.context_names[k], p) for p in _perts_of(data, k)}
        held.append(k); task = "zeroshot"
    for key, v in t.get("fewshot", {}).items():
        if not isinstance(v, dict):
            raise bad(f"[fewshot] '{key}' is {_kind(v)}, not a table [fewshot.\"{key}\"] with val = [...] "
                      "and test = [...]")
        extra = sorted(set(v) - {"val", "test"})
        if extra:
            raise bad(f"[fewshot.\"{key}\"] has unknown key(s) {extra} (only val and test)")
        for part in ("val", "test"):
            lst = v.get(part, [])
            if not isinstance(lst, list) or not all(isinstance(p, str) and p for p in lst):
                raise bad(f"[fewshot.\"{key}\"] {part} is {_kind(lst) if not isinstance(lst, list) else json.dumps(lst)}; "
                          "it must be a list of perturbation names (strings)")
            dup = sorted({p for p in lst if lst.count(p) > 1})
            if dup:
                raise bad(f"[fewshot.\"{key}\"] {part} lists {dup} more than once")
        k = parse(key, "fewshot")
        names = list(dict.fromkeys(list(v.get("val", [])) + list(v.get("test", []))))
        if v.get("val"):
            print(f"[splits] {path}: fewshot val perturbations of '{key}' are held out with the test ones")
        have = set(_perts_of(data, k))
        for p in names:
            if p == data.control:
                raise bad(f"[fewshot.\"{key}\"] names the control '{p}' (controls train, and are test_ctrl)")
            if p not in have:
                raise UserError(f"{path}: [fewshot.\"{key}\"] perturbation '{p}' matches zero cells")
            groups.add((data.context_names[k], p))
        held.append(k); task = task or "fewshot"
    if not held:
        raise UserError(f"{path}: no [zeroshot] or [fewshot] entries: nothing is held out")
    gt = data.group_table
    pairs = {(data.context_names[c], data.pert_names[p]) for c, p in gt[gt[:, 1] != ctl, :2].tolist()}
    if not pairs - groups:
        raise UserError(f"{path}: every perturbed cell is held out (contexts "
                        f"{sorted(data.context_names[k] for k in set(held))}): training would see controls only")
    sup = sorted({p for c, p in pairs - groups if c in {data.context_names[k] for k in held}})
    ctx = ",".join(data.context_names[k] for k in sorted(set(held)))
    s = Split(task, ctx, sorted(groups), sup, val_frac, seed, data.checksum)
    s.path = str(path)
    return s.validate(data)


def main(argv=None):
    ap = Parser(prog="python -m state.splits", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--data", required=True); m.add_argument("--task", default="fewshot")
    m.add_argument("--context"); m.add_argument("--support", type=float, default=0.3)
    m.add_argument("--support_perts", help="comma-separated perturbations of the held-out context that train")
    m.add_argument("--val_frac", type=float, default=0.1); m.add_argument("--seed", type=int, default=0)
    m.add_argument("--pert_features", help="safetensors/npz file of perturbation features, or pca (unseen task)")
    m.add_argument("--test_perts", help="comma-separated held-out perturbations (unseen / combo tasks)")
    m.add_argument("--test_frac", type=float, default=0.2, help="unseen task without --test_perts: the fraction "
                   "of the perturbations with features held out (a seeded draw)")
    m.add_argument("--combo_sep", default="+", help="separator of combination labels (combo task)")
    m.add_argument("--guard_perts", help="perturbations held out of training as the test ones are (fewshot: "
                   "drawn from the support, held out in the context; unseen / combo: held out whole), on which "
                   "train.py --select=support and --guard score: comma-separated names, or a count")
    m.add_argument("--out", required=True)
    t = sub.add_parser("toml")
    t.add_argument("--data", required=True); t.add_argument("--toml", required=True)
    t.add_argument("--val_frac", type=float, default=0.1); t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True)
    r = sub.add_parser("report")
    r.add_argument("--data", required=True); r.add_argument("--split", required=True)
    a = ap.parse_args(dashes(argv))
    try:
        data = Prepared(a.data)
        if a.cmd == "make":
            feats = None
            if a.pert_features == "pca":  # train.py --pert_features=pca: perturbations naming a measured gene
                feats = {p: None for p in data.pert_names if target_gene(p) in set(data.genes)}
                print(f"[splits] --pert-features pca: {len(feats)} of {len(data.pert_names) - 1} perturbations name "
                      "a measured gene (the others cannot be encoded)")
            elif a.pert_features:  # checked entry by entry, as train.py reads it
                feats = read_vectors(a.pert_features)[0]
            sp = a.support_perts.split(",") if a.support_perts else None
            s = make_split(data, a.task, a.context, a.support, sp, a.val_frac, a.seed, features=feats,
                           test_perts=a.test_perts.split(",") if a.test_perts else None, test_frac=a.test_frac,
                           combo_sep=a.combo_sep,
                           guard_perts=None if not a.guard_perts else int(a.guard_perts)
                           if a.guard_perts.isdigit() else a.guard_perts.split(","))
        elif a.cmd == "toml":
            s = read_toml(a.toml, data, a.val_frac, a.seed)
        else:
            s = Split.load(a.split).validate(data)
        print(s.report(data))
        if a.cmd != "report":  # never over an input, a prepared folder's or a run's own files
            ins = [getattr(a, k, None) for k in ("toml", "split", "pert_features")]
            output_file(a.out, ins, f"python -m state.splits {a.cmd}")
            if a.cmd == "make":
                output_file(str(Path(a.out).with_suffix(".toml")), ins, f"python -m state.splits {a.cmd}")
            s.save(a.out)
            print(f"wrote {a.out}")
            if a.cmd == "make":
                tp = str(Path(a.out).with_suffix(".toml"))
                s.write_toml(tp, data)
                print(f"wrote {tp}")
    except (ValueError, OSError) as e:
        m = message(f"python -m state.splits {a.cmd}", e)
        if m is None and isinstance(e, OSError):
            raise
        print(m or f"python -m state.splits {a.cmd}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from state.errors import run
    sys.exit(run("python -m state.splits", main, None, __doc__))
