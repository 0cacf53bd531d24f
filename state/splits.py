"""
Train / val / test splits over a prepared dataset (SPEC 6): zero-shot context, few-shot context, unseen
perturbation; reading and writing the reference's TOML split files.

    python -m state.splits make --data DIR --task fewshot --context U87MG --support 0.3 --seed 0 --out split.json
    python -m state.splits make --data DIR --task fewshot --context U87MG --support-perts MAP2K3,MAP2K6,MAP3K21 --out s.json
    python -m state.splits make --data DIR --task zeroshot --context U87MG --out split.json
    python -m state.splits toml --data DIR --toml split.toml --out split.json   # a reference TOML
    python -m state.splits report --data DIR --split split.json

`make` also writes a reference-compatible TOML next to the JSON (split.toml). Rows are indices into the
prepared data. Controls of every context train; the held-out context's controls are also `test_ctrl`.
`val` is a fraction of the cells of every training group (controls included), never from test groups.
"""

import argparse
import json
import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from state.data import Prepared


@dataclass
class Split:
    task: str
    context: str  # held-out context name (comma-joined when a TOML holds out several), or None
    train: np.ndarray  # (n,) int64 row indices, sorted
    val: np.ndarray
    test: np.ndarray  # perturbed cells of the held-out groups
    test_ctrl: np.ndarray  # controls of the held-out context(s): also in train
    test_groups: list = field(default_factory=list)  # [(context_name, pert_name)]
    support: list = field(default_factory=list)  # perts of the held-out context that train
    checksum: str = None  # of the prepared data it indexes

    def __post_init__(self):
        for k in ("train", "val", "test", "test_ctrl"):
            setattr(self, k, np.sort(np.asarray(getattr(self, k), np.int64)))
        self.test_groups = [tuple(g) for g in self.test_groups]

    def validate(self, data):
        """Raise ValueError unless the split is usable and leak-free."""
        if self.checksum and self.checksum != data.checksum:
            raise ValueError(f"split was made for prepared data {self.checksum}, not {data.checksum} ({data.dir})")
        for k in ("train", "val", "test", "test_ctrl"):
            a = getattr(self, k)
            if len(a) and (a.min() < 0 or a.max() >= data.n_cells):
                raise ValueError(f"split '{k}' has row indices outside [0, {data.n_cells})")
            if len(np.unique(a)) != len(a):
                raise ValueError(f"split '{k}' lists a row twice")
        if len(self.train) == 0:
            raise ValueError("empty split: no training cells")
        if len(self.test) == 0:
            raise ValueError(f"empty split: no test cells (task {self.task}, context {self.context})")
        ctl = data.control_code
        if np.any(data.pert[self.test] == ctl):
            raise ValueError("test holds control cells; they belong in test_ctrl")
        if np.intersect1d(self.test, self.train).size or np.intersect1d(self.test, self.val).size:
            raise ValueError("a test cell is also in train or val")
        if np.intersect1d(self.train, self.val).size:
            raise ValueError("a val cell is also in train")
        key = lambda r: set(zip(data.context[r].tolist(), data.pert[r].tolist()))
        tr, te, va = key(self.train), key(self.test), key(self.val)
        both = {(c, p) for c, p in tr & te if p != ctl}
        if both:
            c, p = next(iter(both))
            raise ValueError(f"{len(both)} (context, perturbation) pairs are in both train and test, e.g. "
                             f"({data.context_names[c]}, {data.pert_names[p]})")
        if va - tr:
            c, p = next(iter(va - tr))
            raise ValueError(f"val group ({data.context_names[c]}, {data.pert_names[p]}) is not a training group")
        for c, p in self.test_groups:
            ci, pi = data.context_names.index(c), data.pert_names.index(p)
            if not np.any((data.context[self.test] == ci) & (data.pert[self.test] == pi)):
                raise ValueError(f"test perturbation '{p}' in context '{c}' has no cells")
        for c in sorted({c for c, _ in tr}):
            if not np.any((data.context[self.train] == c) & (data.pert[self.train] == ctl)):
                raise ValueError(f"context '{data.context_names[c]}' has no control cells in train")
        for c in sorted({c for c, _ in te}):
            if not np.any(data.context[self.test_ctrl] == c):
                raise ValueError(f"held-out context '{data.context_names[c]}' has no control cells in test_ctrl")
        return self

    def report(self, data):
        """Cells per split, context and perturbation, as text."""
        out = [f"split task={self.task} context={self.context}: train {len(self.train)}, val {len(self.val)}, "
               f"test {len(self.test)} (+{len(self.test_ctrl)} test controls) cells; support {self.support}"]
        for ci, cn in enumerate(data.context_names):
            parts = []
            for k in ("train", "val", "test", "test_ctrl"):
                r = getattr(self, k)
                r = r[data.context[r] == ci]
                n_p = len(set(data.pert[r].tolist()) - {data.control_code})
                parts.append(f"{k} {len(r)} cells/{n_p} perts")
            out.append(f"  {cn}: " + ", ".join(parts))
        if len(self.test):
            c, p = data.context[self.test], data.pert[self.test]
            u, n = np.unique(np.stack([c, p], 1), axis=0, return_counts=True)
            out.append("  test groups: " + ", ".join(f"{data.context_names[a]}/{data.pert_names[b]} {k}"
                                                      for (a, b), k in zip(u, n)))
        return "\n".join(out)

    def save(self, path):
        d = dict(task=self.task, context=self.context, support=self.support, test_groups=self.test_groups,
                 checksum=self.checksum, counts={k: len(getattr(self, k)) for k in ("train", "val", "test", "test_ctrl")},
                 **{k: getattr(self, k).tolist() for k in ("train", "val", "test", "test_ctrl")})
        Path(path).write_text(json.dumps(d))
        return path

    @classmethod
    def load(cls, path):
        d = json.loads(Path(path).read_text())
        return cls(d["task"], d["context"], d["train"], d["val"], d["test"], d["test_ctrl"],
                   d["test_groups"], d["support"], d.get("checksum"))

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
        Path(path).write_text("\n".join(lines))
        return path


def _val(data, train, val_frac, rng):
    """Move floor(val_frac * n) random cells of every training group (n >= 2) from train to val."""
    if not val_frac:
        return train, np.zeros(0, np.int64)
    key = data.context[train].astype(np.int64) * len(data.pert_names) + data.pert[train]
    val = []
    for k in np.unique(key):
        r = train[key == k]
        m = int(np.floor(val_frac * len(r))) if len(r) >= 2 else 0
        if m:
            val.append(rng.choice(r, m, replace=False))
    val = np.concatenate(val) if val else np.zeros(0, np.int64)
    return np.setdiff1d(train, val), val


def _ctx(data, context):
    if context is None:
        if len(data.context_names) == 1:
            return 0
        raise ValueError(f"which context to hold out? pass context= one of {data.context_names}")
    if context not in data.context_names:
        raise ValueError(f"context '{context}' not in the data's column '{data.context_col}'; "
                         f"contexts: {data.context_names}")
    return data.context_names.index(context)


def make_split(data, task="fewshot", context=None, support=0.3, support_perts=None, val_frac=0.1, seed=0,
               features=None, test_perts=None, test_frac=0.2):
    """Build and validate a Split (see module docstring). `features`, `test_perts`, `test_frac` (additive)
    serve the unseen-perturbation task: it holds out whole perturbations across all contexts."""
    if not 0 <= support <= 1:
        raise ValueError(f"support={support}: the fraction of the held-out context's perturbations that "
                         "train must be in [0, 1]")
    if not 0 <= val_frac < 1:
        raise ValueError(f"val_frac={val_frac}: the fraction of each training group moved to val must be in [0, 1)")
    if not 0 < test_frac <= 1:
        raise ValueError(f"test_frac={test_frac} must be in (0, 1]")
    rng = np.random.default_rng(seed)
    ctl = data.control_code
    allr = np.arange(data.n_cells, dtype=np.int64)
    is_ctl = data.pert == ctl
    if task in ("fewshot", "zeroshot"):
        k = _ctx(data, context)
        in_k = data.context == k
        perts = sorted({data.pert_names[p] for p in np.unique(data.pert[in_k & ~is_ctl])})
        if not perts:
            raise ValueError(f"context '{data.context_names[k]}' has no perturbed cells to test")
        if task == "zeroshot":
            sup = []
        elif support_perts is not None:
            bad = [p for p in support_perts if p not in perts]
            if bad:
                raise ValueError(f"support perturbation(s) {bad} have no cells in context "
                                 f"'{data.context_names[k]}'; its perturbations: {perts}")
            sup = sorted(support_perts)
        else:
            n = int(round(support * len(perts)))
            sup = sorted(np.array(perts)[np.sort(rng.permutation(len(perts))[:n])].tolist()) if n else []
        held = [p for p in perts if p not in sup]
        if not held:
            raise ValueError(f"empty split: every perturbation of '{data.context_names[k]}' is in the support set")
        hcodes = np.array([data.pert_names.index(p) for p in held])
        test_m = in_k & np.isin(data.pert, hcodes)
        test, test_ctrl = allr[test_m], allr[in_k & is_ctl]
        train = allr[~test_m]
        cname = data.context_names[k]
        groups = [(cname, p) for p in held]
    elif task == "unseen":
        if features is None:
            raise ValueError("the unseen-perturbation task needs perturbation features (e.g. gene embeddings): "
                             "with one-hot encodings a perturbation never seen in training has no embedding. "
                             "Pass features= / --pert-features")
        perts = [p for p in data.pert_names if p != data.control]
        if test_perts is not None:
            bad = [p for p in test_perts if p not in perts]
            if bad:
                raise ValueError(f"test perturbation(s) {bad} not in the data's '{data.pert_col}' labels")
            held = sorted(test_perts)
        else:
            held = sorted(np.array(perts)[rng.permutation(len(perts))[:max(1, int(round(test_frac * len(perts))))]].tolist())
        missing = [p for p in held + perts if p not in features]
        if missing:
            raise ValueError(f"no features for perturbation(s) {sorted(set(missing))[:10]}")
        hcodes = np.array([data.pert_names.index(p) for p in held])
        test_m = np.isin(data.pert, hcodes)
        test, train = allr[test_m], allr[~test_m]
        ctxs = np.unique(data.context[test_m])
        test_ctrl = allr[is_ctl & np.isin(data.context, ctxs)]
        cname, sup = None, []
        groups = sorted({(data.context_names[c], data.pert_names[p])
                         for c, p in zip(data.context[test_m].tolist(), data.pert[test_m].tolist())})
    else:
        raise ValueError(f"task '{task}' not one of fewshot, zeroshot, unseen")
    train, val = _val(data, train, val_frac, rng)
    s = Split(task, cname, train, val, test, test_ctrl, groups, sup, data.checksum)
    return s.validate(data)


def read_toml(path, data, val_frac=0.1, seed=0):
    """A reference split TOML -> Split. Keys are "<dataset>.<context value>"; fewshot val and test lists
    both leave training and become test groups here (our val comes from training groups)."""
    if not 0 <= val_frac < 1:
        raise ValueError(f"val_frac={val_frac}: the fraction of each training group moved to val must be in [0, 1)")
    if not os.path.exists(path):
        raise ValueError(f"split TOML {path} not found")
    try:
        with open(path, "rb") as f:
            t = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    ds = t.get("datasets", {})
    if not ds:
        raise ValueError(f"{path}: no [datasets] table")
    for name, where in ds.items():  # as given (from the working directory) or next to the TOML
        if not (os.path.exists(str(where)) or os.path.exists(os.path.join(os.path.dirname(str(path)), str(where)))):
            raise ValueError(f"{path}: [datasets] {name} = {str(where)!r} does not exist")
    tr = t.get("training", {})
    unknown = [k for k in tr if k not in ds]
    if unknown:
        raise ValueError(f"{path}: [training] names dataset(s) {unknown} not in [datasets] ({sorted(ds)})")
    if not any(v == "train" for v in tr.values()):
        raise ValueError(f"{path}: no dataset marked \"train\" in [training]")

    def parse(key):
        d, _, c = key.partition(".")
        if d not in ds:
            raise ValueError(f"{path}: key '{key}' names dataset '{d}' not in [datasets] ({sorted(ds)})")
        if c not in data.context_names:
            raise ValueError(f"{path}: key '{key}': context '{c}' not found in column '{data.context_col}' "
                             f"(contexts: {data.context_names}); the key after the dot is the context value")
        return data.context_names.index(c)

    ctl = data.control_code
    test_m = np.zeros(data.n_cells, bool)
    held, groups, task = [], [], None
    for key, v in t.get("zeroshot", {}).items():
        k = parse(key)
        test_m |= (data.context == k) & (data.pert != ctl)
        held.append(k); task = "zeroshot"
    for key, v in t.get("fewshot", {}).items():
        k = parse(key)
        names = list(dict.fromkeys(list(v.get("val", [])) + list(v.get("test", []))))
        if v.get("val"):
            print(f"[splits] {path}: fewshot val perturbations of '{key}' are held out with the test ones")
        for p in names:
            if p not in data.pert_names or not np.any((data.context == k) & (data.pert == data.pert_names.index(p))):
                raise ValueError(f"{path}: [fewshot.\"{key}\"] perturbation '{p}' matches zero cells")
            test_m |= (data.context == k) & (data.pert == data.pert_names.index(p))
        held.append(k); task = task or "fewshot"
    if not held:
        raise ValueError(f"{path}: no [zeroshot] or [fewshot] entries: nothing is held out")
    if not np.any(~test_m & (data.pert != ctl)):
        raise ValueError(f"{path}: every perturbed cell is held out (contexts "
                         f"{sorted(data.context_names[k] for k in set(held))}): training would see controls only")
    allr = np.arange(data.n_cells, dtype=np.int64)
    test = allr[test_m]
    groups = sorted({(data.context_names[c], data.pert_names[p])
                     for c, p in zip(data.context[test].tolist(), data.pert[test].tolist())})
    test_ctrl = allr[np.isin(data.context, held) & (data.pert == ctl)]
    train, val = _val(data, allr[~test_m], val_frac, np.random.default_rng(seed))
    tr = allr[~test_m]
    sup = sorted({data.pert_names[p] for p in np.unique(data.pert[tr[np.isin(data.context[tr], held)]]) if p != ctl})
    ctx = ",".join(data.context_names[k] for k in sorted(set(held)))
    return Split(task, ctx, train, val, test, test_ctrl, groups, sup, data.checksum).validate(data)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m state.splits", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--data", required=True); m.add_argument("--task", default="fewshot")
    m.add_argument("--context"); m.add_argument("--support", type=float, default=0.3)
    m.add_argument("--support-perts", help="comma-separated perturbations of the held-out context that train")
    m.add_argument("--val-frac", type=float, default=0.1); m.add_argument("--seed", type=int, default=0)
    m.add_argument("--pert-features", help="safetensors/npz file of perturbation features (unseen task)")
    m.add_argument("--out", required=True)
    t = sub.add_parser("toml")
    t.add_argument("--data", required=True); t.add_argument("--toml", required=True)
    t.add_argument("--val-frac", type=float, default=0.1); t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True)
    r = sub.add_parser("report")
    r.add_argument("--data", required=True); r.add_argument("--split", required=True)
    a = ap.parse_args(argv)
    try:
        data = Prepared(a.data)
        if a.cmd == "make":
            feats = None
            if a.pert_features:
                if a.pert_features.endswith(".safetensors"):
                    from safetensors.numpy import load_file
                    feats = load_file(a.pert_features)
                else:
                    feats = dict(np.load(a.pert_features))
            sp = a.support_perts.split(",") if a.support_perts else None
            s = make_split(data, a.task, a.context, a.support, sp, a.val_frac, a.seed, features=feats)
        elif a.cmd == "toml":
            s = read_toml(a.toml, data, a.val_frac, a.seed)
        else:
            s = Split.load(a.split).validate(data)
        print(s.report(data))
        if a.cmd != "report":
            s.save(a.out)
            print(f"wrote {a.out}")
            if a.cmd == "make":
                tp = str(Path(a.out).with_suffix(".toml"))
                s.write_toml(tp, data)
                print(f"wrote {tp}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
