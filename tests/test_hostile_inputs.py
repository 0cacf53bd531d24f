"""Hostile inputs (Reliability III): split files and split TOMLs edited by hand, perturbation feature
files and combination labels, --init_from sources that load nothing. Every case is a UserError (one
line naming the file and the entry: the CLIs print it and exit 2), never a traceback, never silently
accepted. Tiny synthetic data; library calls, plus two CLI runs. Budget: ~15 s on 2 cores."""

import json
import re

import numpy as np
import pytest
import torch

from state.ckpt import init_from
from state.errors import UserError
from state.perts import check_combo_labels, combo_table, load_pert_features, pca_pert_features
from state.splits import Split, make_split, read_toml
from state.st import STConfig, StateTransition


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    from state.prepare import prepare
    from state.synth import make_synthetic
    d = tmp_path_factory.mktemp("hostile")
    make_synthetic(d / "s.h5ad", n_cells=600, n_genes=20, n_perts=6, n_contexts=2, seed=3)
    return prepare(d / "s.h5ad", d / "p")


def one_line(e, *must):
    """A UserError whose message is one line holding every string of `must`."""
    assert isinstance(e.value, UserError), type(e.value)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for m in must:
        assert m in msg, (m, msg)
    return msg


# -----------------------------------------------------------------------------
# A. split files edited by hand


def test_split_file_schema_every_field(syn, tmp_path):
    s = make_split(syn, "fewshot", context=syn.context_names[1], support=0.4, seed=0)
    good = json.loads(open(s.save(tmp_path / "good.json")).read())
    Split.load(tmp_path / "good.json").validate(syn)  # the untouched file is fine
    ctx = syn.context_names[1]
    test_p, sup_p = s.test_groups[0][1], s.support[0]
    other = [p for p in syn.pert_names if p != syn.control and (ctx, p) not in s.test_groups and p not in s.support]
    cases = [  # (edit, field or phrase the message names)
        (dict(checksum=None), "field 'checksum'"),
        (dict(checksum=""), "field 'checksum'"),
        (dict(checksum=7), "field 'checksum'"),
        (dict(val_frac="0.1"), "field 'val_frac'"),
        (dict(val_frac=1.5), "field 'val_frac'"),
        (dict(val_frac=True), "field 'val_frac'"),
        (dict(seed=1.5), "field 'seed'"),
        (dict(seed="0"), "field 'seed'"),
        (dict(seed=-1), "field 'seed'"),
        (dict(task=None), "field 'task'"),
        (dict(task="fewshots"), "field 'task'"),
        (dict(context=3), "field 'context'"),
        (dict(context="nowhere"), "field 'context'"),
        (dict(combo_sep=5), "field 'combo_sep'"),
        (dict(format="2"), "field 'format'"),
        (dict(format=3), "field 'format'"),
        (dict(test_groups="A"), "field 'test_groups'"),
        (dict(test_groups=[[ctx]]), "field 'test_groups' entry 0"),
        (dict(test_groups=[[ctx, 5]]), "field 'test_groups' entry 0"),
        (dict(test_groups=[[ctx, test_p], [ctx, test_p]]), "twice"),
        (dict(support=sup_p), "field 'support'"),
        (dict(support=[sup_p, 3]), "field 'support' entry 1"),
        (dict(support=[sup_p, sup_p]), "twice"),
        (dict(counts=[1, 2]), "field 'counts'"),
        (dict(extra=1), "unknown field(s) ['extra']"),
        (dict(task="combo"), "field 'combo_sep'"),
    ]
    for i, (edit, what) in enumerate(cases):
        p = tmp_path / f"e{i}.json"
        p.write_text(json.dumps({**good, **edit}))
        with pytest.raises(ValueError) as e:
            Split.load(p)
        one_line(e, str(p), what, "state.splits make")
    p = tmp_path / "notask.json"
    p.write_text(json.dumps({k: v for k, v in good.items() if k != "task"}))
    with pytest.raises(ValueError) as e:
        Split.load(p)
    one_line(e, str(p), "field 'task' is missing")
    for name, text, what in (("list.json", json.dumps([good]), "holds a list"), ("empty.json", "", "is empty"),
                             ("ws.json", "  \n", "is empty"), ("nojson.json", "{task: fewshot", "not JSON"),
                             ("old.json", '{"task": "zeroshot", "train": [0, 1], "val": []}', "older format"),
                             ("fmt1.json", json.dumps({**good, "format": 1}), "older format"),
                             ("bin.json", b"\xff\xfe\x00", "cannot read")):
        p = tmp_path / name
        p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
        with pytest.raises(ValueError) as e:
            Split.load(p)
        one_line(e, str(p), what)


def test_split_names_checked_against_the_data(syn, tmp_path):
    """A well-typed file whose names do not fit the data: unknown context or perturbation, support that is
    a test perturbation or not in the data, the control as a test group, another data's checksum."""
    s = make_split(syn, "fewshot", context=syn.context_names[1], support=0.4, seed=0)
    good = json.loads(open(s.save(tmp_path / "good.json")).read())
    ctx = syn.context_names[1]
    test_p = s.test_groups[0][1]
    cases = [
        (dict(test_groups=[["nowhere", test_p]], context="nowhere"), "context 'nowhere' not in"),
        (dict(test_groups=[[ctx, "NOPE"]]), "perturbation 'NOPE' not in"),
        (dict(test_groups=[[ctx, syn.control]]), "is the control"),
        (dict(support=s.support + [test_p]), f"support perturbation '{test_p}' is a test perturbation"),
        (dict(support=["NOPE"]), "support perturbation 'NOPE' not in"),
        (dict(support=[syn.control]), "is the control"),
        (dict(checksum="0" * 16), "split was made for prepared data"),
    ]
    for i, (edit, what) in enumerate(cases):
        p = tmp_path / f"n{i}.json"
        p.write_text(json.dumps({**good, **edit}))
        with pytest.raises(ValueError) as e:
            Split.load(p).validate(syn)
        one_line(e, f"split file {p}", what)
    # in memory too: a Split without the data's checksum validates against nothing
    with pytest.raises(UserError, match="no checksum"):
        Split(s.task, s.context, s.test_groups, s.support, checksum=None).validate(syn)


def test_split_cli_refuses_in_one_line(syn, tmp_path):
    """python -m state.splits report on a hand-edited split: exit 2, one stderr line, no traceback."""
    from conftest import run_script
    s = make_split(syn, "zeroshot", context=syn.context_names[0], seed=0)
    d = json.loads(open(s.save(tmp_path / "s.json")).read())
    (tmp_path / "s.json").write_text(json.dumps({**d, "checksum": None}))
    r = run_script("-m", "state.splits", "report", f"--data={syn.dir}", f"--split={tmp_path / 's.json'}", ok=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("python -m state.splits report: split file") and "field 'checksum'" in lines[0]


def test_split_toml_every_table(syn, tmp_path):
    head = f'[datasets]\nd = "{syn.dir}"\n[training]\nd = "train"\n'
    c0, c1 = syn.context_names[:2]
    p1 = [p for p in syn.pert_names if p != syn.control][0]
    cases = [
        ("[other]\nx = 1\n", "unknown table(s) or key(s) ['other']"),
        ('[datasets]\nd = "x"\n', None),  # [datasets] twice: not valid TOML
        (f'[zeroshot]\n"d.{c0}" = 1\n', f"[zeroshot] 'd.{c0}' is the integer 1"),
        (f'[fewshot]\n"d.{c0}" = "test"\n', f"[fewshot] 'd.{c0}' is the string"),
        (f'[fewshot."d.{c0}"]\ntest = ["{p1}"]\nextra = 1\n', "unknown key(s) ['extra']"),
        (f'[fewshot."d.{c0}"]\ntest = "{p1}"\n', "test is the string"),
        (f'[fewshot."d.{c0}"]\ntest = [1]\n', "test is [1]"),
        (f'[fewshot."d.{c0}"]\ntest = ["{p1}", "{p1}"]\n', "more than once"),
        (f'[fewshot."d.{c0}"]\ntest = ["{syn.control}"]\n', "names the control"),
        (f'[zeroshot]\n"d.{c0}" = "test"\n[fewshot."d.{c0}"]\ntest = ["{p1}"]\n', "held out twice"),
        (f'[zeroshot]\n"{c0}" = "test"\n', "is not '<dataset>.<context>'"),
    ]
    for i, (body, what) in enumerate(cases):
        p = tmp_path / f"t{i}.toml"
        p.write_text(head + body)
        with pytest.raises(ValueError) as e:
            read_toml(p, syn)
        one_line(e, str(p), *([what] if what else ["not valid TOML"]))
    for i, (ds, tr, what) in enumerate(((f'd = 1', 'd = "train"', "[datasets] d is the integer 1"),
                                        (f'd = "{syn.dir}"', 'd = "val"', "[training] d is the string"))):
        p = tmp_path / f"h{i}.toml"
        p.write_text(f'[datasets]\n{ds}\n[training]\n{tr}\n[zeroshot]\n"d.{c1}" = "test"\n')
        with pytest.raises(ValueError) as e:
            read_toml(p, syn)
        one_line(e, str(p), what)
    p = tmp_path / "ok.toml"  # a good one still reads, and what it makes saves and loads back
    p.write_text(head + f'[zeroshot]\n"d.{c1}" = "test"\n[fewshot."d.{c0}"]\ntest = ["{p1}"]\n')
    s = read_toml(p, syn)
    assert (c0, p1) in s.test_groups and s.support and s.path == str(p)
    t = Split.load(s.save(tmp_path / "ok.json")).validate(syn)
    assert np.array_equal(t.test, s.test) and t.support == s.support


# -----------------------------------------------------------------------------
# B. perturbation feature files and combination labels


def test_feature_files_every_entry(tmp_path):
    from safetensors.torch import save_file
    v = lambda *x: torch.tensor(x, dtype=torch.float32)
    cases = []

    def pt(name, obj, what):
        torch.save(obj, tmp_path / name)
        cases.append((tmp_path / name, what))

    def tsv(name, text, what):
        (tmp_path / name).write_text(text)
        cases.append((tmp_path / name, what))

    pt("nan.pt", {"A": v(1, 2), "B": v(1, float("nan"))}, "entry 'B' holds 1 NaN/Inf")
    pt("inf.pt", {"A": v(1, float("inf")), "B": v(1, 2)}, "entry 'A' holds 1 NaN/Inf")
    pt("w0.pt", {"A": v(), "B": v()}, "entry 'A' has no values (width 0)")
    pt("ragged.pt", {"A": v(1, 2), "B": v(1, 2), "C": v(1, 2, 3)}, "'C' has 3")
    pt("tensor.pt", torch.ones(3, 4), "holds a (3, 4) tensor")
    pt("list.pt", [v(1, 2)], "holds a list")
    pt("intkey.pt", {1: v(1, 2)}, "key 1 (int) is not a name")
    pt("emptymap.pt", {}, "no vectors")
    pt("nested.pt", {"state_dict": {"A": v(1)}}, "entry 'state_dict' is dict")
    pt("str.pt", {"A": "x"}, "entry 'A' is str")
    pt("table.pt", {"emb": torch.ones(5, 3)}, "entry 'emb' is a (5, 3) array")
    np.savez(tmp_path / "arr.npz", np.ones((4, 3), np.float32))
    cases.append((tmp_path / "arr.npz", "entry 'arr_0' is a (4, 3) array"))
    np.savez(tmp_path / "inf.npz", A=np.array([1, np.inf], np.float32), B=np.ones(2, np.float32))
    cases.append((tmp_path / "inf.npz", "entry 'A' holds 1 NaN/Inf"))
    np.savez(tmp_path / "strs.npz", A=np.array(["a", "b"]))
    cases.append((tmp_path / "strs.npz", "entry 'A' holds <U1 values"))
    save_file({"A": v(1, 2), "B": v(float("nan"), 2)}, str(tmp_path / "nan.safetensors"))
    cases.append((tmp_path / "nan.safetensors", "entry 'B' holds 1 NaN/Inf"))
    tsv("dup.tsv", "name\tx\tz\nA\t1\t2\nB\t3\t4\nA\t5\t6\n", "duplicated name 'A' (first on line 2)")
    tsv("nan.tsv", "A\t1\t2\nB\tnan\t4\n", "entry 'B' holds 1 NaN/Inf")
    tsv("ragged.tsv", "A\t1\t2\nB\t1\t2\nC\t3\n", "'C' has 1")
    tsv("w0.tsv", "A\nB\n", "entry 'A' has no values (width 0)")
    tsv("noname.tsv", "A\t1\n\t2\n", ":2: a row with no name")
    tsv("text.tsv", "A\t1\nB\tx\n", ":2: non-numeric feature value in the row of 'B'")
    for ext in ("pt", "npz", "safetensors", "tsv"):
        (tmp_path / f"empty.{ext}").write_bytes(b"")
        cases.append((tmp_path / f"empty.{ext}", "the file is empty"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    cases.append((tmp_path / "junk.pt", "cannot read it as a .pt file"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    cases.append((tmp_path / "junk.safetensors", "cannot read it as a .safetensors file"))
    cases.append((tmp_path / "none.pt", "not found"))
    cases.append((tmp_path / "f.csv", "must be .pt, .safetensors, .npz or .tsv"))
    for path, what in cases:
        with pytest.raises(ValueError) as e:
            load_pert_features(path, ["A"])
        one_line(e, str(path), what)
    # combinations read their parts' vectors through the same checks
    with pytest.raises(ValueError) as e:
        combo_table(["ctrl", "A", "B", "A+B"], "ctrl", "+", features=str(tmp_path / "nan.pt"))
    one_line(e, "nan.pt", "entry 'B' holds 1 NaN/Inf")
    # a missing vector is a UserError and still a KeyError (callers catching KeyError keep working)
    torch.save({"A": v(1, 2)}, tmp_path / "ok.pt")
    with pytest.raises(KeyError) as e:
        load_pert_features(tmp_path / "ok.pt", ["A", "NOPE"])
    one_line(e, "ok.pt", "['NOPE']")
    with pytest.raises(UserError, match="--missing_pert_features='maybe'"):
        load_pert_features(tmp_path / "ok.pt", ["A"], missing="maybe")


def test_combination_labels_refused(tmp_path):
    for lab, what in (("A+A", "names the part 'A' twice"), ("+A", "has an empty part"), ("A+", "has an empty part"),
                      ("A++B", "has an empty part"), ("ctrl+A", "has the control 'ctrl' as a part"),
                      ("A + B", "with spaces around it (write 'A+B')"), ("B+C+B", "names the part 'B' twice")):
        with pytest.raises(ValueError) as e:
            combo_table(["ctrl", "A", "B", lab], "ctrl", "+")
        one_line(e, f"label '{lab}'", what)
    # the check predict.py's extend_combos can call: known singles, and no more parts than training saw
    assert check_combo_labels(["A+B", "ctrl"], "+", "ctrl", known_parts=["ctrl", "A", "B"], max_parts=2) == \
        [["A", "B"], ["ctrl"]]
    with pytest.raises(UserError) as e:
        check_combo_labels(["A+B+C"], "+", "ctrl", known_parts=["ctrl", "A", "B", "C"], max_parts=2, where="--perts")
    one_line(e, "--perts: combination 'A+B+C' has 3 parts", "at most 2")
    with pytest.raises(UserError) as e:
        check_combo_labels(["A+NOPE"], "+", "ctrl", known_parts=["ctrl", "A"], where="--perts")
    one_line(e, "single(s) ['NOPE'] that the run never saw")


def test_combo_split_refuses_malformed_labels(tmp_path):
    from state.prepare import prepare
    from state.h5ad import write_h5ad
    rng = np.random.default_rng(0)
    labels = ["ctrl", "A", "B", "A+B", "A+A"]
    lab = np.repeat(np.array(labels, object), 20)
    write_h5ad(tmp_path / "c.h5ad", rng.uniform(0, 3, (len(lab), 8)).astype(np.float32),
               [f"c{i}" for i in range(len(lab))], [f"g{j}" for j in range(8)], obs={"perturbation": lab})
    data = prepare(tmp_path / "c.h5ad", tmp_path / "p", control="ctrl")
    with pytest.raises(ValueError) as e:
        make_split(data, "combo")
    one_line(e, str(data.dir), "label 'A+A' names the part 'A' twice")


def test_pca_features_bad_arguments(syn):
    for d, rows, what in ((0, np.arange(100), "d=0"), (2.5, np.arange(100), "d=2.5"),
                          (4, np.arange(0), "0 training cell(s)")):
        with pytest.raises(UserError, match=re.escape(what)):
            pca_pert_features(syn, rows, list(syn.pert_names), d=d)


# -----------------------------------------------------------------------------
# C. --init_from that loads nothing


def _st_run(path, cfg, pert_names, genes, state=None, meta=None):
    from safetensors.torch import save_file
    path.mkdir()
    m = StateTransition(cfg)
    sd = state if state is not None else {k: v.contiguous() for k, v in m.state_dict().items() if v is not None}
    save_file(sd, str(path / "model.safetensors"))
    (path / "meta.json").write_text(json.dumps(meta if meta is not None else
                                               {"st": cfg.to_dict(), "pert_names": pert_names, "genes": genes}))
    return path


def test_init_from_loading_nothing_is_refused(tmp_path):
    cfg = STConfig.from_name("tiny", n_in=12, n_pert=4)
    perts, genes = ["c", "a", "b", "d"], [f"g{i}" for i in range(12)]
    model = StateTransition(cfg)
    ok = _st_run(tmp_path / "ok", cfg, perts, genes)
    note = init_from(model, str(ok), perts, genes, say=lambda s: None)
    assert note["loaded"] > 0 and note["loaded_params"] == note["params"]
    # an SE run (embed.py): refused naming what it is
    se = _st_run(tmp_path / "se", cfg, perts, genes, state={"encoder.0.weight": torch.ones(4, 4)},
                 meta={"kind": "nanostate-se", "se_hash": "abc", "preset": "tiny"})
    with pytest.raises(ValueError) as e:
        init_from(model, str(se), perts, genes, say=lambda s: None)
    one_line(e, f"--init_from={se}", "is an SE run (embed.py), not an ST run")
    # an ST run whose tensor names match nothing
    other = _st_run(tmp_path / "other", cfg, perts, genes, state={"net.w": torch.ones(2, 2), "net.b": torch.ones(2)})
    with pytest.raises(ValueError) as e:
        init_from(model, str(other), perts, genes, say=lambda s: None)
    one_line(e, f"--init_from={other}", "loads nothing", "'net.b'")
    # not a run folder: a file, a missing path, a folder without model.safetensors, no/broken meta.json
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    nometa = _st_run(tmp_path / "nometa", cfg, perts, genes)
    (nometa / "meta.json").unlink()
    badmeta = _st_run(tmp_path / "badmeta", cfg, perts, genes)
    (badmeta / "meta.json").write_text("{")
    nost = _st_run(tmp_path / "nost", cfg, perts, genes, meta={"step": 3})
    junk = _st_run(tmp_path / "junk", cfg, perts, genes)
    (junk / "model.safetensors").write_bytes(b"junk")
    for p, what in ((tmp_path / "f.txt", "is a file"), (tmp_path / "nope", "not found"),
                    (tmp_path / "empty", "no model.safetensors"), (nometa, "cannot read its meta.json"),
                    (badmeta, "cannot read its meta.json"), (nost, "no 'st' config"),
                    (junk, "cannot read model.safetensors")):
        with pytest.raises(ValueError) as e:
            init_from(model, str(p), perts, genes, say=lambda s: None)
        one_line(e, f"--init_from={p}", what)


def test_init_from_loading_few_warns_with_the_count(tmp_path):
    cfg = STConfig.from_name("tiny", n_in=12, n_pert=4)
    perts, genes = ["c", "a", "b", "d"], [f"g{i}" for i in range(12)]
    sd = {k: v.contiguous() for k, v in StateTransition(cfg).state_dict().items() if v is not None}
    few = {k: v for k, v in sd.items() if k.startswith("norm.") or k.startswith("f_pert.")}
    src = _st_run(tmp_path / "few", cfg, perts, genes, state=few)
    said = []
    note = init_from(StateTransition(cfg), str(src), perts, genes, say=said.append)
    warn = [s for s in said if s.startswith("WARNING")]
    n_t = sum(1 for _ in StateTransition(cfg).named_parameters())
    assert len(warn) == 1 and f"loaded {len(few)} of {n_t} tensors (" in warn[0] and "% of parameters)" in warn[0]
    assert 0 < note["loaded_params"] < 0.5 * note["params"]


def test_train_init_from_an_se_run_exits_2_in_one_line(tmp_path):
    """train.py --init_from=<an SE run>: exit 2, one stderr line, nothing trained."""
    from conftest import make_synth_prepared, run_script
    d = make_synth_prepared(tmp_path)
    cfg = STConfig.from_name("tiny", n_in=4, n_pert=4)
    se = _st_run(tmp_path / "se", cfg, [], [], state={"encoder.0.weight": torch.ones(4, 4)},
                 meta={"kind": "nanostate-se", "se_hash": "abc"})
    r = run_script("train.py", f"--data={d / 'prep'}", f"--split={d / 'split.json'}", "--preset=tiny",
                   "--max_steps=2", f"--out={tmp_path / 'run'}", f"--init_from={se}", ok=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "is an SE run (embed.py), not an ST run" in lines[-1], r.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run" / "model.safetensors").exists()
