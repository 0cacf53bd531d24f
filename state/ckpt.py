"""
What a run folder is (train.py and embed.py write one, predict.py and embed.py transform read one): the
one module that opens, saves, resumes and loads it.

One checkpoint is one commit. Everything of a step is written into `<out>/ckpt-<step>.tmp/`, that folder
is renamed to `ckpt-<step>/`, and the symlink `<out>/ckpt` is switched to it with one atomic rename: that
switch is the commit. A process killed at any point leaves `ckpt` naming a complete checkpoint (the
previous one until the switch), so `--resume` always reads one consistent step. `<out>/model.safetensors`,
`meta.json`, `state.pt` and `ema.safetensors` are fixed symlinks into `ckpt/`, so readers (predict.py,
embed.py transform) need not know the layout. Older checkpoint folders are removed after the switch.

A checkpoint holds `dcp/` (torch.distributed.checkpoint: weights + optimizer sharded per rank, reloadable
at any world size), `state.pt` (step, the sampler's global cursor, every rank's RNG: plain data only),
the consolidated fp32 `model.safetensors` (the weights inference uses), `meta.json` (what the script
records: train.py's `meta`, state/se.py's `model_files`) and, with an EMA, `ema.safetensors`.

    ck = open_run(out, resume, "train.py", master, ddp)   # checks, lock, repair; the checkpoint to resume
    meta, state = read(ck, "train.py", "st", "an ST run of train.py")
    changed = check_resume(meta["train"], cfg, fixed, "train.py")   # refused or said
    restore(ck, model, opt, weight_decay, "train.py"); restore_rng(state, rank, world, seed, dev)
    save(out, step, model, opt, dev, {"sampler": ...}, lambda sd: {"model.safetensors": fn, ...})
    meta, sd = load_run(run, "--run=DIR", "st")          # a finished run, for inference

One writer per run folder: `lock(out)` holds an exclusive lock on `<out>/.lock` (released by the kernel
when the process ends, however it ends); a second writer is refused at once, naming the holder's pid.
`repair(out)` puts back the layout of a run folder copied with its links dereferenced (`cp -rL`).

NANOSTATE_FAULT=k (tests only): SIGKILL this process right after the k-th file operation of its saves.

`init_from(model, run, ...)` (train.py --init_from) reads a finished run folder's weights into a new model
for fine-tuning, re-initialising the parts the new data changes.
"""

import os
import shutil
import signal

import torch
import torch.distributed as dist

from state.dist import full_state_dict, load_sharded, print0, rng_state, save_sharded, set_rng_state
from state.errors import UserError, die, on_error

LINKS = ("model.safetensors", "meta.json", "state.pt", "ema.safetensors")
LOCK = ".lock"
_ops = 0
_held = {}  # lock file path -> open fd: kept for the life of the process


def _done():
    """One file operation finished: the fault-injection point."""
    global _ops
    _ops += 1
    k = os.environ.get("NANOSTATE_FAULT")
    if k and int(k) == _ops:
        os.kill(os.getpid(), signal.SIGKILL)


def latest(out):
    """The folder of the last committed checkpoint, or None. Files directly in `out` (a run written before
    this layout) are read as its checkpoint, so such a folder is named for what it is (read)."""
    link = os.path.join(out, "ckpt")
    if os.path.islink(link):
        return os.path.join(out, os.readlink(link))
    if os.path.isfile(os.path.join(out, "state.pt")) and not os.path.islink(os.path.join(out, "state.pt")):
        return out
    return None


def lock(out, command="train.py"):
    """Create `out` if needed and lock it for this process (rank 0 only under torchrun). A folder this
    call created is removed again if the process then ends on a user's error with nothing in it."""
    import fcntl

    made = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    path = os.path.realpath(os.path.join(out, LOCK))
    if path in _held:  # this process holds it already (a library caller running twice): same writer
        try:
            if os.fstat(_held[path]).st_ino == os.stat(path).st_ino:
                return
        except OSError:
            pass
        os.close(_held.pop(path))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UserError(f"{command}: {out}: another process (pid {pid}) is writing this run folder; wait for it "
                        "to end (or stop it) or choose another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[path] = fd
    if made:  # a run refused or failed before its first checkpoint leaves no folder behind
        on_error(lambda: latest(out) is None and leftovers_only(out) and shutil.rmtree(out, ignore_errors=True))


def empty(out):
    """True when `out` is missing or holds nothing but its lock file."""
    return not os.path.isdir(out) or all(f == LOCK for f in os.listdir(out))


def repair(out):
    """A run folder copied with its links dereferenced (`cp -rL`, some archivers) has a real `ckpt`
    folder and real copies of the files that were links: move that folder to a checkpoint name and put
    the links back, so resume and the next commit see the usual layout. No-op on an intact folder."""
    link = os.path.join(out, "ckpt")
    if not os.path.isdir(link) or os.path.islink(link):
        return False
    name = "ckpt-copied"
    shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    os.rename(link, os.path.join(out, name))
    os.symlink(name, link)
    for f in LINKS:
        p = os.path.join(out, f)
        if os.path.exists(os.path.join(out, name, f)) and not os.path.islink(p):
            if os.path.lexists(p):
                os.remove(p)
            os.symlink(os.path.join("ckpt", f), p)
    return True


def leftovers_only(out):
    """True when `out` holds nothing but what a run killed before its first commit leaves (its log, staging
    folders, and a checkpoint folder renamed from its staging name but never switched in: no `ckpt` link names
    it): --resume may then start from step 0 instead of refusing."""
    import re
    return all(f in ("log.jsonl", "ckpt.tmp", LOCK) or re.fullmatch(r"ckpt-\d+(-b)?(\.tmp)?", f)
               for f in os.listdir(out))


def clear(out):
    for f in os.listdir(out):
        if f == LOCK:
            continue
        p = os.path.join(out, f)
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)


def trim_log(path, step):
    """Drop log.jsonl lines past `step` (written by a run killed after its last commit)."""
    import json
    if not os.path.exists(path):
        return
    keep = []
    for line in open(path, errors="replace"):
        try:  # a line torn by a kill or a full disk is dropped, not a reason to refuse the resume
            if json.loads(line).get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, AttributeError, TypeError):  # not JSON, not an object, a step that is no number
            continue
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def _name(out, step):
    """ckpt-<step>, or ckpt-<step>-b when ckpt-<step> is the committed one (a run resumed at its last
    step saves that step again): never overwrite the live checkpoint."""
    cur = latest(out)
    name = f"ckpt-{step}"
    return name + "-b" if cur and os.path.basename(cur) == name else name


def abandon(out, step):
    """A save failed (full disk, ...): remove its staging folder; the committed checkpoint is untouched."""
    shutil.rmtree(staging(out, step), ignore_errors=True)


def begin(out, step):
    """A fresh staging folder for this step's files (a stale one from a killed save is removed)."""
    tmp = os.path.join(out, _name(out, step) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def staging(out, step):
    return os.path.join(out, _name(out, step) + ".tmp")


def write_text(path, text):
    with open(path, "w") as f:  # closed here: an error at close (full disk) is raised, not ignored
        f.write(text)


def read(ck, command, need=None, what=None):
    """(meta, state) of a committed checkpoint folder, checked: both files there, meta.json valid JSON
    (holding the key `need`: "st" for train.py's runs, "preset" for embed.py's; else "not <what>") of the
    same step as state.pt (loaded without unpickling anything but plain data), the sharded part inside
    the folder."""
    import json

    for f in ("meta.json", "state.pt"):
        if not os.path.isfile(os.path.join(ck, f)):
            raise UserError(f"{command}: {ck}: {f} is missing: the run folder is incomplete (copied in part?); "
                            "copy the whole folder, or start a new run")
    try:
        meta = json.load(open(os.path.join(ck, "meta.json")))
        assert isinstance(meta, dict) and isinstance(meta.get("step"), int)
    except (ValueError, AssertionError):
        raise UserError(f"{command}: {ck}/meta.json is not a run's meta.json (not JSON, or no step); "
                        "it was edited or damaged: start a new run") from None
    if need and meta.get(need) is None:
        raise UserError(f"{command}: {os.path.dirname(ck)} is not {what} (its meta.json has no '{need}'); "
                        "check --out")
    if need == "st":
        check_st_meta(meta, f"{command}: {ck}", ("data_checksum",))
    elif need == "preset":  # an embed.py run to resume: what fit reads of its own settings too
        check_se_meta(meta, f"{command}: {ck}")
        for k in ("fit", "gene_emb"):
            if not isinstance(meta.get(k), dict):
                raise UserError(f"{command}: {ck}/meta.json's {k!r} is {type(meta.get(k)).__name__}, not an object; "
                                "the file was edited or damaged: copy the run folder again, or start a new run")
        if not isinstance(meta["fit"].get("grad_accum"), int) or isinstance(meta["fit"].get("grad_accum"), bool):
            raise UserError(f"{command}: {ck}/meta.json's fit settings have no grad_accum count; the file was edited "
                            "or damaged: copy the run folder again, or start a new run")
    state = load_state(os.path.join(ck, "state.pt"))
    if not isinstance(state, dict) or state.get("step") != meta["step"]:
        raise UserError(f"{command}: {ck}: meta.json is at step {meta['step']} but state.pt at step "
                        f"{state.get('step') if isinstance(state, dict) else '?'}; cannot resume exactly")
    r = state.get("rng_ranks") or state.get("rng")
    if not isinstance(state.get("sampler"), dict) or not isinstance(r, list) or not r:
        what = "sampler cursor" if not isinstance(state.get("sampler"), dict) else "RNG states"
        raise UserError(f"{command}: {ck}/state.pt holds no {what}; it was edited or damaged: copy the run folder "
                        "again, or start a new run")
    if state.get("dcp") not in (None, "dcp"):
        raise UserError(f"{command}: {ck}/state.pt names the sharded checkpoint {state['dcp']!r}; only 'dcp' "
                        "inside the checkpoint folder is read")
    return meta, state


def read_run(run, who, kind="st"):
    """meta.json of a finished run folder, checked: a folder holding model.safetensors and a readable
    meta.json object, of a train.py run with an 'st' config (kind "st": predict.py's --run, train.py's
    --init_from; an SE run is named as such) or of an embed.py run (kind "se": embed.py transform's --ckpt).
    Anything else is a UserError starting with `who` (e.g. "--run=DIR")."""
    import json

    script = "train.py" if kind == "st" else "embed.py"
    what = f"a run folder of {script} (model.safetensors + meta.json)"
    if not os.path.isdir(run):
        raise UserError(f"{who}: {'is a file' if os.path.exists(run) else 'not found'}; give {what}")
    if not os.path.isfile(os.path.join(run, "model.safetensors")):
        raise UserError(f"{who}: no model.safetensors (not a finished {script} run, or copied in part); give {what}")
    try:
        with open(os.path.join(run, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{who}: cannot read its meta.json ({getattr(e, 'strerror', None) or e}); give {what}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{who}: its meta.json is not an object; give {what}")
    if kind == "se":
        if meta.get("kind") != "nanostate-se":
            raise UserError(f"{who}: not an SE run of embed.py (meta.json kind={meta.get('kind')!r}); give {what}")
        check_se_meta(meta, who)
        return meta
    if meta.get("kind") == "nanostate-se" or ("st" not in meta and ("se_hash" in meta or "fit" in meta
                                                                     or "preset" in meta)):
        raise UserError(f"{who}: is an SE run (embed.py), not an ST run: its weights embed cells (embed.py "
                        "transform uses them; to train ST on its embeddings, prepare the data with --key "
                        "obsm/X_state); give a train.py run folder")
    if "st" not in meta:
        raise UserError(f"{who}: its meta.json has no 'st' config: not an ST run of train.py; give {what}")
    check_st_meta(meta, who)
    return meta


def load_run(run, who, kind="st"):
    """A finished run folder for inference: -> (meta.json, its checked weights) (read_run, load_weights)."""
    meta = read_run(run, who, kind)
    return meta, load_weights(os.path.join(run, "model.safetensors"), who)


# an ST run's meta.json as its readers use it (predict.py, train.py --resume, init_from, convert --to_arc):
# name -> the types it may hold (None: a run may record none), checked when present (older runs lack some);
# ST_REQUIRED (and what a reader adds: `need`) must be there.
ST_META = {"st": (dict,), "genes": (list,), "pert_names": (list,), "control": (str,), "data_checksum": (str, None),
           "pert_col": (str, None), "context_names": (list,), "batch_names": (list,), "genes_out": (list, None),
           "corr_scale": (list, None), "split_hash": (str, None), "context_col": (str, None), "batch_col": (str, None),
           "genes_key": (str, None), "key": (str,), "combos": (str, None), "combo_parts": (list, None),
           "recipe": (dict, None), "gene_space": (bool,), "pert_features": (str, None), "combo_reduce": (str,),
           "train": (dict,), "global_batch": (int,), "ema": (bool,), "select": (str,), "best_step": (int, None),
           "best_support_loss": (float, int, None), "support_curve": (list, None)}
EDITED = "the file was edited or damaged: copy the run folder again, or train again"
ST_REQUIRED = ("st", "genes", "pert_names")  # what every reader uses; predict.py and --to_arc need more (st_model)
NAMES = ("genes", "pert_names", "context_names", "batch_names", "genes_out", "combo_parts")  # lists of str


def check_st_meta(meta, where, need=ST_REQUIRED):
    """An ST run's meta.json (a dict) holds what its readers use, of the types they use (ST_META), and a model
    config (`st`) whose fields have their types and values in range: else a UserError starting with
    `where` (an edited or damaged meta.json is one line, not a traceback in a reader)."""
    from state.st import STConfig

    lack = [k for k in dict.fromkeys(ST_REQUIRED + tuple(need)) if k not in meta]
    if lack:
        raise UserError(f"{where}: meta.json has no {', '.join(map(repr, lack))}; {EDITED}")
    for k, types in ST_META.items():
        v = meta.get(k)
        if k in meta and not (v is None and None in types) and not any(
                t is not None and isinstance(v, t) and not (t is int and isinstance(v, bool)) for t in types):
            raise UserError(f"{where}: meta.json's {k!r} is {type(v).__name__} ({str(v)[:40]!r}), not "
                            f"{' or '.join('null' if t is None else t.__name__ for t in types)}; {EDITED}")
        if k in NAMES and isinstance(v, list) and not all(isinstance(x, str) for x in v):
            raise UserError(f"{where}: meta.json's {k!r} holds something other than names (strings); {EDITED}")
    num = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
    if not all(num(x) for x in meta.get("corr_scale") or []):
        raise UserError(f"{where}: meta.json's 'corr_scale' holds something other than numbers; {EDITED}")
    if not all(isinstance(x, list) and len(x) == 2 and all(map(num, x)) for x in meta.get("support_curve") or []):
        raise UserError(f"{where}: meta.json's 'support_curve' holds something other than [step, loss] pairs; {EDITED}")
    return config_of(STConfig, meta["st"], where)


def config_of(cls, d, where):
    """The model config dataclass `cls` from meta.json's dict `d` (keys it does not know are left out, missing
    ones take their defaults: older runs), each value of its default's type and in range, else a UserError
    starting with `where`."""
    from dataclasses import fields

    for f in fields(cls):
        if f.name in d:
            v, dv = d[f.name], f.default
            ok = (isinstance(v, bool) if isinstance(dv, bool) else isinstance(v, (list, tuple)) if isinstance(dv, tuple)
                  else (isinstance(v, (int, float)) and not isinstance(v, bool)) if isinstance(dv, float)
                  else (isinstance(v, int) and not isinstance(v, bool)) if isinstance(dv, int)
                  else isinstance(v, str) if isinstance(dv, str) else True)
            if not ok:
                raise UserError(f"{where}: meta.json's model config has {f.name}={v!r}, not a "
                                f"{type(dv).__name__}; {EDITED}")
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in d.items() if k in names})
    except UserError as e:
        raise UserError(f"{where}: meta.json's model config: {e}; {EDITED}") from None


def fit_weights(model, sd, who):
    """model.load_state_dict(sd), after checking that the run's weights `sd` are the tensors of the model its
    meta.json describes: else a UserError naming one (meta.json edited, or files of two runs mixed)."""
    own = model.state_dict()
    extra, lack = sorted(set(sd) - set(own)), sorted(set(own) - set(sd))
    shape = [n for n in own if n in sd and tuple(own[n].shape) != tuple(sd[n].shape)]
    if extra or lack or shape:
        n = (shape or lack or extra)[0]
        what = (f"is {tuple(sd[n].shape)} in model.safetensors but {tuple(own[n].shape)} in the model meta.json "
                f"describes" if shape else "is missing from model.safetensors" if lack else
                "in model.safetensors is no tensor of the model meta.json describes")
        raise UserError(f"{who}: tensor '{n}' {what} ({len(shape)} other shapes, {len(lack)} missing, {len(extra)} "
                        "unknown): meta.json and the weights are not of one run (edited, or files of two runs "
                        "mixed); copy the run folder again, or train again")
    model.load_state_dict(sd)
    return model


def check_se_meta(meta, where):
    """An SE run's meta.json (a dict; kind nanostate-se or embed.py's "preset"): its model config (`config`) and
    gene names (`genes`) of the types its readers use -> the SEConfig; else a UserError starting with `where`."""
    from state.se import SEConfig

    for k, t in (("config", dict), ("genes", list)):
        if not isinstance(meta.get(k), t):
            raise UserError(f"{where}: meta.json's {k!r} is {type(meta.get(k)).__name__}, not {t.__name__}"
                            f"{' (missing)' if k not in meta else ''}; {EDITED}")
    if not all(isinstance(g, str) for g in meta["genes"]):
        raise UserError(f"{where}: meta.json's 'genes' holds something other than names (strings); {EDITED}")
    for k in ("recipe", "fit", "gene_emb"):
        if meta.get(k) is not None and not isinstance(meta[k], dict):
            raise UserError(f"{where}: meta.json's {k!r} is {type(meta[k]).__name__}, not an object; {EDITED}")
    return config_of(SEConfig, meta["config"], where)


def st_model(meta, sd, who):
    """The StateTransition an ST run's meta.json (checked) describes, holding its weights `sd`: weights that do
    not fit that config (meta.json edited, or files of two runs mixed) are a UserError naming a tensor."""
    from state.st import StateTransition

    cfg = check_st_meta(meta, who, ("control", "pert_col", "data_checksum"))  # what predict.py reads of it
    model = fit_weights(StateTransition(cfg, pert_table=sd.get("pert_table"), anchor_table=sd.get("anchor_table")),
                        sd, who)
    cs = meta.get("corr_scale")
    if cs is not None and (model.corr_scale is None or len(cs) != model.corr_scale.numel()):
        raise UserError(f"{who}: meta.json's 'corr_scale' ({len(cs)} values) does not fit the model "
                        f"({'no guarded correction' if model.corr_scale is None else model.corr_scale.numel()}); "
                        + EDITED)
    return model


def load_weights(path, command=""):
    """A run's safetensors weights, checked: a damaged file (bad header, offsets past its end) or a
    non-finite value in any tensor is a UserError naming the file and the tensor (predictions from NaN
    weights would be NaN with exit 0). Safetensors never runs code."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    pre = f"{command}: " if command else ""
    try:
        sd = load_file(path)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise UserError(f"{pre}cannot read {os.path.basename(path)} ({path}: not a readable safetensors file: "
                        f"{(str(e).splitlines() or [''])[0][:160]}); the run folder is damaged: copy it again or "
                        "train again") from None
    import torch
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f"{pre}{path}: tensor '{k}' has NaN/Inf values; these weights cannot predict: "
                            "use an earlier checkpoint or train again")
    return sd


def load_state(path):
    """A state.pt (optimizer, sampler, RNG) loaded with weights_only=True: a file that needs any other
    class to unpickle is refused, naming the file (it cannot run code here)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends
        die(f"{path}: not a plain state file (tensors, numbers, strings only); refusing to "
                         f"unpickle it ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")


def write(path, fn):
    """fn(path) writes one file of the checkpoint (inside the staging folder: no temp names needed)."""
    fn(path)
    _done()


def commit(out, step):
    """Rename the staging folder, switch `ckpt` to it atomically, refresh the links, drop old folders."""
    name = _name(out, step)
    tmp, final = os.path.join(out, name + ".tmp"), os.path.join(out, name)
    shutil.rmtree(final, ignore_errors=True)  # a stale folder of a save killed before its switch
    os.rename(tmp, final)
    _done()
    link, tl = os.path.join(out, "ckpt"), os.path.join(out, "ckpt.tmp")
    if os.path.lexists(tl):
        os.remove(tl)
    os.symlink(name, tl)
    os.replace(tl, link)  # the commit
    _done()
    for f in LINKS:  # stable links into the committed checkpoint
        p = os.path.join(out, f)
        if os.path.exists(os.path.join(final, f)) and not os.path.islink(p):
            os.symlink(os.path.join("ckpt", f), p)
    for f in os.listdir(out):  # older checkpoints and stale staging folders
        if (f.startswith("ckpt-") or f.startswith("dcp-")) and f != name:
            shutil.rmtree(os.path.join(out, f), ignore_errors=True)
    _done()


# -----------------------------------------------------------------------------
# a run of train.py or embed.py: open its folder, save a step, resume


def open_run(out, resume, command, master, ddp):
    """The run folder `out` for writing (every rank calls it): a new run needs it missing or empty, --resume
    needs it to exist; rank 0 locks it (one writer) and puts back the links of a dereferenced copy. -> the
    last committed checkpoint folder to resume, or None: a new run, or a --resume of a run killed before its
    first commit (its leftovers are cleared and it starts at step 0)."""
    if not out:
        die(f"{command}: --out is empty; give a folder for the run")
    if os.path.exists(out) and not os.path.isdir(out):
        die(f"{command}: --out={out} is a file; give a folder for the run")
    if not empty(out) and not resume:
        die(f"{command}: run directory {out} exists and is not empty; pass --resume to continue it "
            "or choose another --out")
    if resume and not os.path.isdir(out):
        die(f"{command}: --resume but {out} does not exist; check --out (or drop --resume to start a run)")
    if master:  # one writer per run folder (a second is refused naming this pid); created here
        lock(out, command)
        if resume and repair(out):
            print0(f"note: {out} was copied with its links dereferenced: its checkpoint links were put back")
    if ddp:
        dist.barrier()
    ck = latest(out) if resume else None
    if resume and ck is None:
        if not (os.path.isdir(out) and leftovers_only(out)):
            die(f"{command}: --resume but {out} holds no committed checkpoint")
        print0(f"note: --resume: {out} holds no committed checkpoint (killed before its first one): starting at step 0")
        if master:
            clear(out)
    return ck


def check_resume(old, new, fixed, command, also=(), ignore=("resume",)):
    """Settings of a --resume against the run's own (`old`, from meta.json): a change of one in `fixed`, or
    any refusal the script adds in `also` (strings), ends the run naming them; the other changes are
    applied from this step on and said. -> the changed names."""
    bad = [f"{k} ({old[k]!r} -> {new[k]!r})" for k in fixed if k in old and old[k] != new[k]] + list(also)
    if bad:
        die(f"{command}: --resume cannot change {', '.join(bad)}: they fix the data, its order or the model; "
            "start a new run instead")
    changed = [k for k in new if k in old and old[k] != new[k] and k not in ignore]
    if changed:
        print0("note: resumed with changed settings (applied from this step on): " +
               ", ".join(f"{k} {old[k]!r} -> {new[k]!r}" for k in changed))
    return changed


def check_steps(start, max_steps, out, command):
    """A resumed run continues to --max_steps: one below the checkpoint's step cannot be reached (the run would
    end at once, doing nothing while saying it applied the change)."""
    if start > max_steps:
        die(f"{command}: --max_steps={max_steps} is below the checkpoint's step {start} in {out}; give "
            f"--max_steps >= {start} (a run cannot go back: start a new one"
            + (f", or --init_from={out})" if command == "train.py" else ")"))


def restore(ck, model, opt, weight_decay, command):
    """Weights and optimizer from the checkpoint's `dcp/`, resharded to this world size; the weight decay
    of the optimizer's first group (the decayed one) is this run's, not the one its state carries."""
    path = os.path.join(ck, "dcp")
    if not os.path.isdir(path):
        die(f"{command}: --resume needs the sharded checkpoint {path}/ (copied in part?); copy the whole "
            "run folder, or start a new run")
    load_sharded(model, opt, path)
    opt.param_groups[0]["weight_decay"] = weight_decay


def rngs(state):
    """The RNG state of every rank of the run that saved `state` (its world size is their number)."""
    return state.get("rng_ranks") or state["rng"]  # embed.py wrote them under "rng" until 2026-12


def restore_rng(state, rank, world, seed, device):
    """This rank's RNG as saved. At another world size the data order still continues (one global cursor)
    and each rank gets a fresh dropout stream from (seed, rank, step)."""
    r = rngs(state)
    if len(r) == world:
        set_rng_state(r[rank], device)
    else:
        torch.manual_seed(seed + rank + 7919 * state["step"])
        print0(f"note: resuming a world-{len(r)} run at world {world}: data order continues, "
               "dropout RNG reseeded per rank")


def stage(out, step, model, opt, device):
    """The collective part of a save, on every rank: rank 0 opens the staging folder, all ranks write
    `dcp/`, rank 0 gathers the consolidated fp32 weights, and every rank's RNG state is gathered.
    -> (staging folder, CPU state dict ({} off rank 0), [RNG state of each rank])."""
    master = not dist.is_initialized() or dist.get_rank() == 0
    if master:
        begin(out, step)
    if dist.is_initialized():
        dist.barrier()
    d = staging(out, step)
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        save_sharded(model, opt, os.path.join(d, "dcp"))
    except (CheckpointException, OSError) as e:  # a full disk: the committed checkpoint stays as it was
        if master:
            abandon(out, step)
        fails = getattr(e, "failures", {}).values() if isinstance(e, CheckpointException) else [e]
        for f in fails:
            inner = f[0] if isinstance(f, tuple) else f
            if isinstance(inner, OSError):
                raise OSError(inner.errno, inner.strerror, d) from None
            if isinstance(inner, RuntimeError) and "unexpected pos" in str(inner):  # torch's writer on ENOSPC
                import errno
                raise OSError(errno.ENOSPC, "a write stopped short (disk full?)", d) from None
        raise
    if master:
        _done()
    sd = {k: v.detach().cpu().contiguous() for k, v in full_state_dict(model).items()}
    ranks = [rng_state(device)]
    if dist.is_initialized():
        mine, ranks = ranks[0], [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    return d, sd, ranks


def save(out, step, model, opt, device, state, files):
    """One checkpoint; collective: every rank calls it. All ranks write `dcp/` (stage); rank 0 then writes
    `state.pt` (`state`, e.g. the sampler's cursor, with the step and every rank's RNG) and the files
    `files(sd)` returns ({name: fn(path)}, in that order; sd: the consolidated fp32 weights) and commits
    the step with one atomic switch. A failed write (full disk) removes the staging folder and leaves the
    committed checkpoint as it was."""
    d, sd, ranks = stage(out, step, model, opt, device)
    if not dist.is_initialized() or dist.get_rank() == 0:
        state = {**state, "step": step, "rng_ranks": ranks, "dcp": "dcp", "world": len(ranks)}
        try:
            write(os.path.join(d, "state.pt"), lambda p: torch.save(state, p))
            for name, fn in files(sd).items():
                write(os.path.join(d, name), fn)
            commit(out, step)
        except OSError:
            abandon(out, step)
            raise
    if dist.is_initialized():
        dist.barrier()


# -----------------------------------------------------------------------------
# fine-tuning: another run's weights into a new model

def init_from(model, run, pert_names, genes, combo_parts=None, reinit=(), skip=False, say=print):
    """Load a trained run's weights into `model` for fine-tuning: every tensor whose name and shape match,
    except the parts re-initialised: the perturbation encoder (f_pert) when the perturbation vocabulary
    (or combination parts) or the feature width differ from the run's, or 'pert' in `reinit`; the gene
    side (f_cell's input layer, f_out's output layer, the gene decoder) when the gene list differs, or
    'decoder' in `reinit`. Buffers (pert_table, anchor_table) always come from this run's data. A tensor
    whose shape differs outside those parts is an error naming it (skip=True: left at its init). Prints a
    table of loaded / re-initialised / skipped tensors; returns a note for meta.json."""
    bad = [r for r in reinit if r not in ("pert", "decoder")]
    if bad:
        raise UserError(f"--reinit {bad}: choose from pert, decoder")
    run = str(run)
    meta, src = load_run(run, f"--init_from={run}")
    why = {}
    if "pert" in reinit:
        why["pert"] = "asked"
    elif meta.get("pert_names") != pert_names or meta.get("combo_parts") != combo_parts:
        why["pert"] = "another perturbation vocabulary"
    if "decoder" in reinit:
        why["decoder"] = "asked"
    elif list(meta.get("genes", [])) != list(genes):
        why["decoder"] = "another gene list"
    first = lambda mod: next(n for n, _ in mod.named_parameters())
    gene_side = {f"f_cell.{first(model.f_cell)}", f"f_cell.{first(model.f_cell)}".replace("weight", "bias")}
    last = [n for n, _ in model.f_out.named_parameters()][-2:]
    gene_side |= {f"f_out.{n}" for n in last}
    part = lambda n: "pert" if n.startswith("f_pert.") else \
        ("decoder" if n.startswith("decoder.") or n in gene_side else None)
    own = model.state_dict()
    rows, load = [], {}
    for n, v in own.items():
        if n in ("pert_table", "anchor_table"):
            rows.append((n, "this run's data", tuple(v.shape)))
        elif part(n) in why:
            rows.append((n, f"re-initialised ({why[part(n)]})", tuple(v.shape)))
        elif n not in src:
            rows.append((n, "not in the source run: initialised", tuple(v.shape)))
        elif tuple(src[n].shape) != tuple(v.shape):
            if not skip:
                raise UserError(f"--init_from={run}: tensor '{n}' is {tuple(src[n].shape)} there and "
                                 f"{tuple(v.shape)} here (another hidden size or preset?); --init_skip=True "
                                 "leaves mismatched tensors at their initialisation")
            rows.append((n, f"skipped: shape {tuple(src[n].shape)} in the source", tuple(v.shape)))
        else:
            load[n] = src[n]
            rows.append((n, "loaded", tuple(v.shape)))
    if not load:
        raise UserError(f"--init_from={run}: loads nothing: none of its {len(src)} tensors matches a tensor of this "
                        f"model by name and shape (its tensors: {sorted(src)[:3]} ..., this model's: {sorted(own)[:3]} ...); "
                        "--init_from would train from scratch. Give a run of the same model (preset, hidden "
                        "size), or drop --init_from to train from scratch")
    model.load_state_dict(load, strict=False)
    params = dict(model.named_parameters())
    n_all = sum(p.numel() for p in params.values())
    n_got = sum(params[n].numel() for n in load if n in params)
    n_t = sum(1 for n in own if n in params)
    k_t = sum(1 for n in load if n in params)
    frac = n_got / max(n_all, 1)
    if frac < 0.5:
        say(f"WARNING: init_from {run}: loaded {k_t} of {n_t} tensors ({100 * frac:.1f}% of parameters): most of "
            "the model starts from its initialisation (see the table below)")
    kinds = {}
    for _, k, _ in rows:
        kinds[k.split(" (")[0].split(":")[0]] = kinds.get(k.split(" (")[0].split(":")[0], 0) + 1
    say(f"init_from {run}: " + ", ".join(f"{v} {k}" for k, v in kinds.items()))
    for n, k, shp in rows:
        if k != "loaded":
            say(f"  {n:<40s} {str(shp):<16s} {k}")
    return dict(run=os.path.abspath(run), reinit=why, loaded=sum(k == "loaded" for _, k, _ in rows),
                rows=len(rows), loaded_params=n_got, params=n_all)
