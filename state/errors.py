"""
One way for every command to end a user's mistake: one line `command: file: what is wrong; what to do`
on stderr, exit status 2, nothing written. A traceback means a bug of ours.

    from state.errors import UserError, die, guard, run
    raise UserError(f"{path}: what is wrong; what to do")   # anywhere in the library (a ValueError)
    guard("train.py", __doc__)        # flat scripts, first thing: --help, and the hook for the rest
    sys.exit(run("state.data", main, argv, __doc__))        # modules with a main(argv)
    die("train.py: --out: ...")       # a script's own check: print the line, exit 2

What counts as the user's: a UserError (every reader of a user's file raises it), and the operating
system's refusals that name a path (a full disk, a read-only or missing folder, no permission). Both
are printed as one line with the command in front; anything else keeps its traceback.
"""

import argparse
import errno
import os
import re
import sys

# what to do when the operating system refuses a path: the errors a user's environment causes
FIX = {
    errno.ENOSPC: "free space on that disk (or write somewhere else) and run it again",
    errno.EDQUOT: "free space within your quota (or write somewhere else) and run it again",
    errno.EROFS: "that file system is read-only: write somewhere else",
    errno.EACCES: "you may not access it: check its permissions or choose another path",
    errno.EPERM: "you may not change it: check its permissions or choose another path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "it is a folder: give a file",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ELOOP: "it is a loop of symbolic links: check the path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) and run it again",
    errno.EEXIST: "it exists already: choose another path",
}


BY_CLASS = {FileNotFoundError: errno.ENOENT, PermissionError: errno.EACCES, IsADirectoryError: errno.EISDIR,
            NotADirectoryError: errno.ENOTDIR}


class UserError(ValueError):
    """A mistake in what the user handed us (an option, a file): printed as `command: message`, exit 2.
    A ValueError, so library callers that catch ValueError keep working."""


class UnknownName(UserError, KeyError):
    """A name that is not in a table (a preset): a UserError, and a KeyError for callers that catch that."""
    __str__ = ValueError.__str__


class Refused(SystemExit):
    """SystemExit with status 2 whose str() is the one-line message (already printed)."""

    def __init__(self, msg):
        super().__init__(msg)
        self.code = 2


def message(command, e):
    """The one line for exception e, or None when it is not the user's (a bug: keep the traceback)."""
    if isinstance(e, UserError):
        msg = " ".join(str(e).split("\n"))
    elif isinstance(e, BrokenPipeError):  # stdout's reader left (`| head`): say so once, on stderr
        try:  # and point stdout at /dev/null, or the interpreter's last flush fails again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        msg = "the output pipe was closed (its reader, e.g. `head`, stopped reading); stopped there"
    elif (isinstance(e, OSError) and e.errno == errno.EEXIST and e.filename and os.path.lexists(e.filename)
          and not os.path.isdir(e.filename)):  # os.makedirs(exist_ok=True) on a path whose part is a file
        msg = f"{e.filename}: is a file where a folder is needed; {FIX[errno.ENOTDIR]}"
    elif isinstance(e, OSError) and e.errno in FIX:
        where = f"{e.filename}: " if e.filename else ""
        msg = f"{where}{e.strerror or os.strerror(e.errno)}; {FIX[e.errno]}"
    elif type(e) in BY_CLASS:  # raised with a message only (no errno): the class says which refusal
        msg = f"{' '.join(str(e).split())}; {FIX[BY_CLASS[type(e)]]}"
    else:
        return None
    short = command.removeprefix("python -m ").split()[0]
    return msg if msg.startswith((command, short, "python -m " + short)) else f"{command}: {msg}"


_hard = False  # set by guard(): this process is a flat script's, with nothing to unwind
_command = None  # the command this process runs (guard/run): die() puts it in front of a bare message
_cleanups = []  # run before a refused process exits: undo what it created (an empty run folder)


def on_error(fn):
    """Call fn() when this process ends on a user's error (after it printed its line)."""
    _cleanups.append(fn)


def _exit(code):
    for fn in reversed(_cleanups):
        try:
            fn()
        except OSError:
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: Triton's extension would print dozens of lines there


def die(msg):
    """A script's own check failed: print the line, exit 2 (in a library call: Refused carries the line)."""
    if _command and not msg.startswith((_command, _command.removeprefix("python -m "))):
        msg = f"{_command}: {msg}"
    print(msg, file=sys.stderr, flush=True)
    if _hard:
        _exit(2)
    raise Refused(msg)


def wants_help(argv):
    return "--help" in argv or "-h" in argv


def usage(doc, extra=""):
    try:
        print((doc or "").strip() + ("\n\n" + extra if extra else ""))
        sys.stdout.flush()
    except BrokenPipeError:  # `--help | head`
        pass


def guard(command, doc=None, argv=None, extra=""):
    """For flat scripts (train.py): `--help` prints the docstring and exits 0; a UserError or a refused
    path anywhere later ends the process with its one line and status 2 (os._exit: a flat script has
    nothing to unwind, and loader processes watch their parent)."""
    global _hard, _command
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        usage(doc, extra() if callable(extra) else extra)
        sys.exit(0)
    prev, _hard, _command = sys.excepthook, True, command

    def hook(t, e, tb):
        m = message(command, e)
        if m is None:  # a bug of ours: the traceback, but still no empty run folder left behind
            prev(t, e, tb)
            _exit(1)
        print(m, file=sys.stderr)
        _exit(2)

    sys.excepthook = hook


def run(command, main, argv=None, doc=None):
    """For modules with main(argv): --help, then main; a user's error becomes its line and exit 2.
    argv=None: the process's own command line (`if __name__ == "__main__": sys.exit(run(...))`)."""
    global _hard, _command
    _hard = _hard or argv is None
    _command = _command or (command if argv is None else None)
    args = sys.argv[1:] if argv is None else list(argv)
    if wants_help(args):
        usage(doc)
        return 0
    try:
        return main(args)
    except (UserError, OSError) as e:
        m = message(command, e)
        if m is None or (not _hard and not isinstance(e, UserError)):  # a library caller keeps OS errors
            raise
        print(m, file=sys.stderr, flush=True)
        if _hard:
            _exit(2)
        raise Refused(m) from None
    except Exception:  # a bug of ours: its traceback, and still no empty run folder left behind
        if not _hard:
            raise
        import traceback
        traceback.print_exc()
        _exit(1)


# files a command writes and owns: an output path may never name one of them in someone else's folder
PREPARED_FILES = ("index.json", "X.bin", "G.bin", "codes.npy", "groups.npy", "sums.npy", "obs_names.npy")
RUN_FILES = ("meta.json", "model.safetensors", "state.pt", "ema.safetensors", "log.jsonl", ".lock")


def owned(path):
    """What `path` belongs to when it is a file of a prepared folder or of a run folder, else None."""
    d, f = os.path.split(os.path.abspath(path))
    if f in PREPARED_FILES and os.path.isfile(os.path.join(d, "index.json")):
        return f"a file of the prepared folder {d}"
    if f in RUN_FILES and (os.path.lexists(os.path.join(d, "ckpt")) or os.path.isfile(os.path.join(d, "meta.json"))):
        return f"a file of the run folder {d}"
    up = os.path.dirname(d)
    if re.fullmatch(r"ckpt(-\d+(-b)?(\.tmp)?|-copied)?", os.path.basename(d)) and (
            os.path.lexists(os.path.join(up, "ckpt")) or os.path.isfile(os.path.join(up, "meta.json"))):
        return f"inside the checkpoint {d}"
    return None


def output_file(out, inputs, command, flag="--out"):
    """Check an output file path before anything is written: not a folder, not any of the command's
    input files (the screen must never replace the controls it was made from), not a file of a prepared
    or run folder (a split written over index.json). -> the absolute path."""
    if not out:
        raise UserError(f"{command}: {flag} is empty; give the output file's path")
    if os.path.isdir(out):
        raise UserError(f"{command}: {flag}={out} is a folder; give a file path (e.g. {os.path.join(out, 'out.h5ad')})")
    for p in inputs:
        if p and os.path.exists(out) and os.path.exists(p) and os.path.samefile(out, p):
            raise UserError(f"{command}: {flag}={out} is one of the inputs ({p}); it would be overwritten: "
                            "choose another output path")
    what = owned(out)
    if what:
        raise UserError(f"{command}: {flag}={out} is {what}; writing there would damage it: choose another path")
    return os.path.abspath(out)


def output_folder(out, inputs, command, flag="--out"):
    """An output folder: not a file, not a prepared or run folder's internals, none of the inputs inside
    it would be written over by the files it gets (checked by the caller's output_file on each)."""
    if not out:
        raise UserError(f"{command}: {flag} is empty; give a folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{command}: {flag}={out} is a file; give a folder")
    for p in inputs:
        if p and os.path.isdir(p) and os.path.exists(out) and os.path.samefile(out, p):
            raise UserError(f"{command}: {flag}={out} is the input folder {p}; choose another folder")
    if os.path.isfile(os.path.join(out, "index.json")):
        raise UserError(f"{command}: {flag}={out} is a prepared folder; choose another folder")
    return os.path.abspath(out)


def size(n):
    for u, k in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= k:
            return f"{n / k:.2f} {u}"
    return f"{n} B"


class Parser(argparse.ArgumentParser):
    """argparse with a user's mistake as one line (a UserError), not usage + error on two lines."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see --help)")


def need_space(path, nbytes, command):
    """Refuse before writing when the disk holding `path` has less than nbytes free (a write that fills
    the disk half-way helps nobody, and some writers crash on it)."""
    import shutil
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(d):
        d = os.path.dirname(d)
    free = shutil.disk_usage(d).free
    if free < nbytes:
        raise UserError(f"{command}: {d}: {size(free)} free but writing {os.path.basename(path)} needs "
                        f"about {size(nbytes)}; free space on that disk or write somewhere else")


def stale_tmp(target):
    """Remove `<target>.tmp<pid>` files left by killed runs (their pid is gone): the next run cleans its
    own leftovers."""
    import glob
    import shutil
    for p in glob.glob(glob.escape(target.rstrip(os.sep)) + ".tmp*"):
        pid = p.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            try:
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
            except OSError:
                pass


class staged_folder:
    """Write a command's output files into a staging folder beside `out` and move them into `out` only
    when all of them are written: a failure (full disk, a bad input found half-way) leaves `out` as it
    was and no partial file behind.

        with staged_folder(out) as d:
            write(os.path.join(d, "results.csv"))
    """

    def __init__(self, out):
        self.out = os.path.abspath(out)
        self.tmp = f"{self.out.rstrip(os.sep)}.tmp{os.getpid()}"

    def __enter__(self):
        import shutil
        stale_tmp(self.out)
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        return self.tmp

    def __exit__(self, t, e, tb):
        import shutil
        try:
            if t is None:
                os.makedirs(self.out, exist_ok=True)
                for root, _, files in os.walk(self.tmp):
                    rel = os.path.relpath(root, self.tmp)
                    os.makedirs(os.path.join(self.out, rel), exist_ok=True)
                    for f in files:
                        os.replace(os.path.join(root, f), os.path.join(self.out, rel, f))
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False
