"""arc-state ST runs in: real `state tx train` runs (tests/fixtures/arc/, recorded by
dev/record_arc_fixtures.py with arc-state installed) converted by `python -m state.convert` give arc-state's
own recorded outputs (predicted cells, decoded genes, confidence) within 1e-5 in fp32, without arc-state
installed; predict.py simulate on the converted run gives what `state tx infer` wrote on the same file;
crafted files are refused without running their payload; settings nanostate does not compute are refused
by name."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from state.convert import convert
from state.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "arc"
RUNS = ("hvg_sm", "emb_dec", "emb_conf_batch", "hvg_nores", "hvg_all")
TOL = 1e-5


def fixture(name):
    """A recorded arc-state run: missing fixtures fail (a skipped parity test would pass CI silently)."""
    p = FIX / name
    assert (p / "checkpoints" / "final.ckpt").is_file() and (p / "arc_outputs.safetensors").is_file(), \
        f"{p}: arc-state fixture missing; record it with dev/record_arc_fixtures.py (see its docstring)"
    return p


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Every fixture run converted once: name -> (run folder, model, meta, notes)."""
    from predict import load_run
    out = {}
    for name in RUNS:
        d = tmp_path_factory.mktemp("nano") / name
        _, notes = convert(str(fixture(name)), str(d))
        model, meta = load_run(str(d))
        out[name] = (d, model, meta, notes)
    return out


@pytest.mark.parametrize("name", RUNS)
def test_forward_matches_arc_state(converted, name):
    """Each recorded set (lengths S down to 1, every perturbation, the control too) through the converted
    model: predictions, decoded genes and the confidence as arc-state's predict_step gave them."""
    _, model, meta, _ = converted[name]
    path = fixture(name) / "arc_outputs.safetensors"
    rec = load_file(path)
    arc_names = json.loads(safe_open(str(path), "pt").metadata()["pert_names"])
    code = {n: i for i, n in enumerate(meta["pert_names"])}
    assert sorted(code) == sorted(arc_names)
    worst = {"preds": 0.0, "dec": 0.0, "conf": 0.0}
    n_sets = len(rec["pert"])
    assert n_sets >= len(arc_names) and len(set(rec["set"].tolist())) == n_sets
    for i in range(n_sets):
        s = rec["set"] == i
        pert = torch.tensor([code[arc_names[int(rec["pert"][i])]]])
        batch = rec["batch"][s][None] if model.cfg.n_batch else None
        with torch.no_grad():
            y, conf = model(rec["ctrl"][s][None].float(), pert, batch=batch, with_conf=True)
            worst["preds"] = max(worst["preds"], (y[0] - rec["preds"][s]).abs().max().item())
            if "dec" in rec and model.decoder is not None:
                worst["dec"] = max(worst["dec"], (model.decode(y)[0] - rec["dec"][s]).abs().max().item())
            if "conf" in rec:
                worst["conf"] = max(worst["conf"], abs(conf.item() - rec["conf"][i].item()))
    print(f"{name}: max |diff| {worst}")
    assert worst["preds"] <= TOL and worst["dec"] <= TOL and worst["conf"] <= TOL, worst
    # outputs that could hide a wrong mapping: not all zero, not all the same
    assert rec["preds"].abs().max() > 0.05 and rec["preds"].std(0).max() > 1e-3
    if "conf" in rec:
        assert rec["conf"].min() > 0  # the confidence head's final ReLU is not simply clipping everything


def test_mapping_of_each_variant(converted, tmp_path):
    """What each arc-state variant became: decoder kept only where arc-state trained it, ReLU where it
    applies one, residual, batch encoder, confidence token, activation, 1-layer MLPs."""
    c = {n: converted[n][1].cfg for n in RUNS}
    m = {n: converted[n][2] for n in RUNS}
    assert c["hvg_sm"].gene_space and not c["hvg_sm"].basal_proj and c["hvg_sm"].n_enc == 4
    assert converted["hvg_sm"][1].decoder is None and m["hvg_sm"]["key"] == "obsm/X_hvg"
    assert converted["emb_dec"][1].decoder is not None and c["emb_dec"].n_genes == 48
    assert c["emb_dec"].decoder_hidden == (32, 24) and not c["emb_dec"].gene_space and not c["emb_dec"].relu_embedding
    assert m["emb_dec"]["genes_out"] and len(m["emb_dec"]["genes_out"]) == 48 and m["emb_dec"]["key"] == "obsm/X_emb"
    e = c["emb_conf_batch"]
    assert e.relu_embedding and e.confidence_token and e.n_batch == 3 and e.activation == "relu" and e.n_enc == 3
    assert m["emb_conf_batch"]["batch_names"] == ["rep_1", "rep_2", "rep_3"]
    assert c["hvg_nores"].residual == "none" and c["hvg_nores"].n_enc == 1 and c["hvg_nores"].n_dec == 1
    assert converted["hvg_nores"][1].decoder is None and any("never trained" in n for n in converted["hvg_nores"][3])
    assert m["hvg_sm"]["control"] == "non-targeting" and m["hvg_sm"]["pert_col"] == "target_gene"
    # arc-state's default output_space=all: the residual after project_out, then its down/up block
    assert c["hvg_all"].residual == "output" and c["hvg_all"].down_up and converted["hvg_all"][1].down_up is not None
    from state.convert import export_arc
    with pytest.raises(UserError, match="down_up"):
        export_arc(str(converted["hvg_all"][0]), str(tmp_path / "arc_all"))


@pytest.mark.parametrize("name", ["hvg_sm", "emb_dec"])
def test_simulate_matches_state_tx_infer(converted, name, tmp_path):
    """predict.py simulate (unchanged) on the converted run vs `state tx infer` on the same file. The file's
    one cell type has one control cell, so both tools' control draws can only pick it (arc-state draws with
    np.random.RandomState per window, nanostate with its own generator: with a larger pool the draws, not
    the models, would differ). Genes are compared by name (decoded genes for the decoder run)."""
    import predict
    from state.h5ad import H5AD
    d, model, meta, _ = converted[name]
    src, ref = fixture(name) / "infer_in.h5ad", fixture(name) / "infer_out.h5ad"
    out = tmp_path / "screen.h5ad"
    predict.cmd_simulate([f"--run={d}", f"--adata={src}", "--perts=STAT1,JAK2,non-targeting", "--n_cells=10",
                          f"--out={out}"])
    with H5AD(str(ref)) as f:
        labels = np.asarray(f.column("target_gene")).astype(str)
        arc_genes = list(f.var_names())
        arc = f.matrix("obsm/X_hvg").rows(np.arange(f.n_obs))  # predictions (HVG run) / decoded genes
    with H5AD(str(out)) as f:
        pred = np.asarray(f.column("is_predicted")).astype(bool)
        plabels = np.asarray(f.column("target_gene")).astype(str)
        genes = list(f.var_names())
        X = f.matrix("X").rows(np.arange(f.n_obs))
    col = [arc_genes.index(g) for g in genes]
    for p in ("STAT1", "JAK2", "non-targeting"):
        ours, theirs = X[pred & (plabels == p)], arc[labels == p][:, col]
        assert len(ours) == 10 and len(theirs) >= 1
        diff = np.abs(ours[:, None, :] - theirs[None, :, :]).max()
        assert diff <= TOL, (p, diff)
        assert np.abs(theirs - theirs.mean(0)).max() <= TOL  # one control in: every predicted cell alike
    assert np.abs(arc[labels == "STAT1"] - arc[labels == "JAK2"]).max() > 20 * TOL  # the perturbation shows


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.getcwd()}/PWNED_BY_ARC",))


def _copy(tmp_path, name="hvg_sm"):
    d = tmp_path / "arc"
    shutil.copytree(fixture(name), d)
    return d


@pytest.mark.parametrize("what", ["ckpt", "ckpt_legacy", "var_dims", "pert_map"])
def test_crafted_files_are_refused_and_never_run(tmp_path, monkeypatch, what):
    import pickle
    monkeypatch.chdir(tmp_path)
    d = _copy(tmp_path)
    evil = {"state_dict": {}, "hyper_parameters": {"x": Payload()}}
    if what == "ckpt":
        torch.save(evil, d / "checkpoints" / "final.ckpt")
    elif what == "ckpt_legacy":
        torch.save(evil, d / "checkpoints" / "final.ckpt", _use_new_zipfile_serialization=False)
    elif what == "var_dims":
        (d / "var_dims.pkl").write_bytes(pickle.dumps({"input_dim": Payload()}))
    else:
        torch.save({"A": torch.ones(3), "B": Payload()}, d / "pert_onehot_map.pt")
    with pytest.raises(UserError, match="refusing to unpickle|not plain data") as e:
        convert(str(d), str(tmp_path / "out"))
    assert "system" in str(e.value) or what == "pert_map"  # the refused global is named
    assert not (tmp_path / "PWNED_BY_ARC").exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()


def _edit_hp(d, **kw):
    """Re-save the fixture checkpoint with hyper-parameters changed (what another arc-state config gives)."""
    from state import unpickle
    p = d / "checkpoints" / "final.ckpt"
    ck = unpickle.torch_load(str(p))
    for k, v in kw.items():
        if "." in k:
            a, b = k.split(".")
            ck["hyper_parameters"][a][b] = v
        else:
            ck["hyper_parameters"][k] = v
    torch.save(ck, p)


@pytest.mark.parametrize("edit,field", [
    (dict(mask_attn=True), "mask_attn"),
    (dict(transformer_backbone_key="GPT2"), "transformer_backbone_key"),
    (dict(output_space="all", embed_key="X_emb"), "output_space=all with embed_key=X_emb"),
    ({"transformer_backbone_kwargs.num_key_value_heads": 2}, "num_key_value_heads"),
    ({"transformer_backbone_kwargs.bidirectional_attention": False}, "bidirectional_attention"),
    ({"lora.enable": True}, "lora.enable"),
    (dict(activation="tanh"), "activation"),
])
def test_unmapped_settings_are_refused_by_name(tmp_path, edit, field):
    d = _copy(tmp_path)
    _edit_hp(d, **edit)
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        convert(str(d), str(tmp_path / "out"))


def test_cli_one_line_errors(tmp_path):
    """The command line: --help exit 0; a missing file and an extra tensor: one line, exit 2, no folder."""
    cmd = [sys.executable, "-m", "state.convert"]
    r = subprocess.run(cmd + ["--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "--arc_run" in r.stdout
    d = _copy(tmp_path)
    os.remove(d / "var_dims.pkl")
    r = subprocess.run(cmd + [f"--arc_run={d}", f"--out={tmp_path / 'o'}"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "var_dims.pkl is missing" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    d2 = _copy(tmp_path / "b")
    from state import unpickle
    p = d2 / "checkpoints" / "final.ckpt"
    ck = unpickle.torch_load(str(p))
    ck["state_dict"]["batch_token"] = torch.zeros(1, 1, 32)
    torch.save(ck, p)
    r = subprocess.run(cmd + [f"--arc_run={d2}", f"--out={tmp_path / 'o2'}"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "batch_token" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o").exists()


def test_predict_test_on_a_bound_import(tmp_path):
    """--data=PREPARED binds the import to a prepared folder (its perturbation order, checksum): predict.py
    test (unchanged) then replays a split of it, and its predictions are arc-state's (one control cell:
    the draws are forced, as in the simulate test)."""
    from state.h5ad import H5AD
    src = fixture("hvg_sm")
    py = lambda *a: subprocess.run([sys.executable, *a], capture_output=True, text=True, cwd=ROOT)
    r = py("-m", "state.data", "prepare", str(src / "infer_in.h5ad"), str(tmp_path / "prep"), "--key=obsm/X_hvg",
           "--pert_col=target_gene", "--control=non-targeting", "--context_col=cell_type")
    assert r.returncode == 0, r.stderr[-2000:]
    r = py("-m", "state.splits", "make", f"--data={tmp_path / 'prep'}", "--task=fewshot", "--context=THP-1",
           "--support_perts=JAK2", f"--out={tmp_path / 'split.json'}")
    assert r.returncode == 0, r.stderr[-2000:]
    r = py("-m", "state.convert", f"--arc_run={src}", f"--out={tmp_path / 'nb'}", f"--data={tmp_path / 'prep'}")
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.load(open(tmp_path / "nb" / "meta.json"))
    assert meta["pert_names"] == ["non-targeting", "JAK2", "STAT1"] and meta["data_checksum"]
    r = py("predict.py", "test", f"--run={tmp_path / 'nb'}", f"--data={tmp_path / 'prep'}",
           f"--split={tmp_path / 'split.json'}", f"--out={tmp_path / 'test'}", "--center=False")  # raw outputs
    assert r.returncode == 0, r.stderr[-2000:]
    with H5AD(str(src / "infer_out.h5ad")) as f:
        arc = f.matrix("obsm/X_hvg").rows(np.flatnonzero(np.asarray(f.column("target_gene")).astype(str) == "STAT1"))
    with H5AD(str(tmp_path / "test" / "pred.h5ad")) as f:
        keep = np.asarray(f.column("is_predicted")).astype(bool)
        X = f.matrix("X").rows(np.flatnonzero(keep))
        assert set(np.asarray(f.column("target_gene")).astype(str)[keep]) == {"STAT1"}
    assert X.shape == (10, 48) and np.abs(X[:, None] - arc[None]).max() <= TOL
    # a folder of another input (genes, not the embedding run's columns) cannot be bound: one line, no run
    r = py("-m", "state.convert", f"--arc_run={fixture('emb_dec')}", f"--out={tmp_path / 'nb2'}",
           f"--data={tmp_path / 'prep'}")
    assert r.returncode == 2 and "input columns" in r.stderr and not (tmp_path / "nb2" / "meta.json").exists()


# --- SE -------------------------------------------------------------------------------------------

def _embed(tmp_path, se_dir, name):
    out = tmp_path / f"{name}.npy"
    r = subprocess.run([sys.executable, "embed.py", "transform", f"--ckpt={se_dir}", str(fixture_se() / "cells.h5ad"),
                        f"--output={out}"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return np.load(out)


def fixture_se():
    p = FIX / "se"
    assert (p / "se_tiny.ckpt").is_file() and (p / "arc_emb.npy").is_file(), \
        f"{p}: arc-state SE fixture missing; record it with dev/record_arc_fixtures.py"
    return p


def test_se_embeddings_match_state_emb_transform(tmp_path):
    """An arc-state SE checkpoint in the published layout (model .ckpt + protein_embeddings.pt in one folder)
    converted, then embed.py transform on the same raw-count cells: arc-state's `state emb transform` output
    within 1e-4 (cell embedding and dataset embedding). Also from the checkpoint alone (its packed gene
    vectors) and with --protein_embeddings=FILE."""
    from state.convert import convert_se
    arc = np.load(fixture_se() / "arc_emb.npy")
    model, _ = convert_se(str(fixture_se()), str(tmp_path / "se_folder"))
    assert model.cfg.pad_length == 41 and model.cfg.ds_token and model.cfg.d_out == 24 and model.V == 64
    a = _embed(tmp_path, tmp_path / "se_folder", "folder")
    print(f"SE max |diff| {np.abs(a - arc).max():.2e}")
    assert a.shape == arc.shape == (32, 34) and np.abs(a - arc).max() <= 1e-4
    assert np.abs(arc - arc.mean(0)).max() > 100 * 1e-4  # cells differ by far more than the tolerance
    only = tmp_path / "ckpt_only"
    only.mkdir()
    shutil.copy(fixture_se() / "se_tiny.ckpt", only / "se_tiny.ckpt")
    convert_se(str(only / "se_tiny.ckpt"), str(tmp_path / "se_packed"))
    assert np.abs(_embed(tmp_path, tmp_path / "se_packed", "packed") - arc).max() <= 1e-4
    convert_se(str(only), str(tmp_path / "se_given"), str(fixture_se() / "protein_embeddings.pt"))
    assert np.abs(_embed(tmp_path, tmp_path / "se_given", "given") - arc).max() <= 1e-4


@pytest.mark.parametrize("what", ["protein_embeddings", "ckpt"])
def test_se_crafted_files_are_refused(tmp_path, monkeypatch, what):
    from state.convert import convert_se
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "se"
    shutil.copytree(fixture_se(), d)
    if what == "protein_embeddings":
        torch.save({"STAT1": torch.ones(16), "X": Payload()}, d / "protein_embeddings.pt")
    else:
        torch.save({"state_dict": {}, "cfg_yaml": "model: {}", "x": Payload()}, d / "se_tiny.ckpt")
    with pytest.raises(UserError, match="refusing to unpickle"):
        convert_se(str(d), str(tmp_path / "out"))
    assert not (tmp_path / "PWNED_BY_ARC").exists() and not (tmp_path / "out").exists()


def test_scripts_help_and_gpu_check_dry_run():
    """The issue's scripts answer --help (exit 0); bench/gpu_check.sh --dry_run lists its steps on a CPU."""
    for cmd in ([sys.executable, "bench/bench_infer.py", "--help"], [sys.executable, "dev/record_arc_fixtures.py", "--help"],
                ["bash", "bench/gpu_check.sh", "--help"]):
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0 and len(r.stdout) > 100, (cmd, r.stderr[-500:])
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--dry_run"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "6 steps" in r.stdout
    for step in ("[tests]", "[attention]", "[energy]", "[train]", "[fsdp]", "[import]", "--preset=default", "--resume"):
        assert step in r.stdout, step
    r = subprocess.run([sys.executable, "bench/bench_infer.py", "--arc_python=/nonexistent/python"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["hvg_sm", "emb_dec", "emb_conf_batch", "hvg_nores"])
def test_export_to_arc_round_trip(converted, name, tmp_path):
    """--to_arc writes an arc-state run folder (config.yaml, var_dims.pkl, maps, checkpoints/final.ckpt) that
    the importer reads back to the same weights, vocabulary, batches and config. (That `state tx infer` loads
    such a folder and predicts what predict.py simulate does was checked with arc-state: dev/LOG.md.)"""
    from state.convert import export_arc
    d, model, meta, _ = converted[name]
    export_arc(str(d), str(tmp_path / "arc"))
    assert {p.name for p in (tmp_path / "arc").iterdir()} >= {"config.yaml", "var_dims.pkl", "pert_onehot_map.pt",
                                                             "batch_onehot_map.torch", "checkpoints"}
    back, _ = convert(str(tmp_path / "arc"), str(tmp_path / "back"))
    a, b = load_file(str(d / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    for k in ("pert_names", "batch_names", "control", "key", "genes", "genes_out", "st"):
        assert back[k] == meta[k], k


def test_export_refuses_what_arc_state_cannot_compute(converted, tmp_path):
    from state.convert import export_arc
    d = tmp_path / "run"
    shutil.copytree(converted["hvg_sm"][0], d, symlinks=True)
    meta = json.load(open(d / "meta.json"))
    meta["st"]["residual"] = "paper"
    os.remove(d / "meta.json")  # a link into ckpt/: write a plain file in its place
    json.dump(meta, open(d / "meta.json", "w"))
    with pytest.raises(UserError, match="residual=paper"):
        export_arc(str(d), str(tmp_path / "arc"))
    assert not (tmp_path / "arc").exists()


def test_export_refuses_a_meta_json_its_weights_do_not_fit(converted, tmp_path):
    """--to_arc of a run whose meta.json was edited so its config no longer fits the weights: another hidden size
    was written out as an arc-state run (exit 0, a config.yaml that cannot load the checkpoint), more layers a
    KeyError traceback; both are one UserError naming a tensor, nothing written."""
    from state.convert import export_arc
    for k, want in (("hidden", "is .* in model.safetensors but"), ("n_layers", "is missing from")):
        d = tmp_path / f"run_{k}"
        shutil.copytree(converted["hvg_sm"][0], d, symlinks=True)
        meta = json.load(open(d / "meta.json"))
        meta["st"][k] *= 2
        if k == "hidden":
            meta["st"]["head_dim"] = 0  # hidden / n_heads
        os.remove(d / "meta.json")
        json.dump(meta, open(d / "meta.json", "w"))
        with pytest.raises(UserError, match=f"tensor .* {want}"):
            export_arc(str(d), str(tmp_path / f"arc_{k}"))
        assert not (tmp_path / f"arc_{k}").exists()
