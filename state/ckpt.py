"""
One checkpoint is one commit (train.py and embed.py).

Everything of a step is written into `<out>/ckpt-<step>.tmp/`, that folder is renamed to `ckpt-<step>/`,
and the symlink `<out>/ckpt` is switched to it with one atomic rename: that switch is the commit. A process
killed at any point leaves `ckpt` naming a complete checkpoint (the previous one until the switch), so
`--resume` always reads one consistent step. `<out>/model.safetensors`, `meta.json`, `state.pt` and
`ema.safetensors` are fixed symlinks into `ckpt/`, so readers (predict.py, embed.py transform) need not
know the layout. Older checkpoint folders are removed after the switch.

    d = begin(out, step)          # fresh staging folder (rank 0; then a barrier under torchrun)
    write(f"{d}/x", fn)           # fn(path) writes the file
    commit(out, step)             # rename + switch + links + clean-up

NANOSTATE_FAULT=k (tests only): SIGKILL this process right after the k-th file operation of its saves.
"""

import os
import shutil
import signal

LINKS = ("model.safetensors", "meta.json", "state.pt", "ema.safetensors")
_ops = 0


def _done():
    """One file operation finished: the fault-injection point."""
    global _ops
    _ops += 1
    k = os.environ.get("NANOSTATE_FAULT")
    if k and int(k) == _ops:
        os.kill(os.getpid(), signal.SIGKILL)


def latest(out):
    """The folder of the last committed checkpoint, or None. A run written before this layout (files
    directly in `out`) is its own checkpoint folder."""
    link = os.path.join(out, "ckpt")
    if os.path.islink(link):
        return os.path.join(out, os.readlink(link))
    if os.path.isfile(os.path.join(out, "state.pt")) and not os.path.islink(os.path.join(out, "state.pt")):
        return out
    return None


def leftovers_only(out):
    """True when `out` holds nothing but what a run killed before its first commit leaves (its log and
    staging folders): --resume may then start from step 0 instead of refusing."""
    return all(f in ("log.jsonl", "ckpt.tmp") or (f.startswith("ckpt-") and f.endswith(".tmp"))
               for f in os.listdir(out))


def clear(out):
    for f in os.listdir(out):
        p = os.path.join(out, f)
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)


def trim_log(path, step):
    """Drop log.jsonl lines past `step` (written by a run killed after its last commit)."""
    import json
    if not os.path.exists(path):
        return
    keep = [l for l in open(path) if l.strip() and json.loads(l).get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def _name(out, step):
    """ckpt-<step>, or ckpt-<step>-b when ckpt-<step> is the committed one (a run resumed at its last
    step saves that step again): never overwrite the live checkpoint."""
    cur = latest(out)
    name = f"ckpt-{step}"
    return name + "-b" if cur and os.path.basename(cur) == name else name


def begin(out, step):
    """A fresh staging folder for this step's files (a stale one from a killed save is removed)."""
    tmp = os.path.join(out, _name(out, step) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def staging(out, step):
    return os.path.join(out, _name(out, step) + ".tmp")


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
            if os.path.lexists(p):
                os.remove(p)  # a file of the old flat layout
            os.symlink(os.path.join("ckpt", f), p)
    for f in os.listdir(out):  # older checkpoints and stale staging folders
        if (f.startswith("ckpt-") or f.startswith("dcp-")) and f != name:
            shutil.rmtree(os.path.join(out, f), ignore_errors=True)
    _done()
