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

import errno
import os
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
}


BY_CLASS = {FileNotFoundError: errno.ENOENT, PermissionError: errno.EACCES, IsADirectoryError: errno.EISDIR,
            NotADirectoryError: errno.ENOTDIR}


class UserError(ValueError):
    """A mistake in what the user handed us (an option, a file): printed as `command: message`, exit 2.
    A ValueError, so library callers that catch ValueError keep working."""


class Refused(SystemExit):
    """SystemExit with status 2 whose str() is the one-line message (already printed)."""

    def __init__(self, msg):
        super().__init__(msg)
        self.code = 2


def message(command, e):
    """The one line for exception e, or None when it is not the user's (a bug: keep the traceback)."""
    if isinstance(e, UserError):
        msg = " ".join(str(e).split("\n"))
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
    global _hard
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        usage(doc, extra() if callable(extra) else extra)
        sys.exit(0)
    prev, _hard = sys.excepthook, True

    def hook(t, e, tb):
        m = message(command, e)
        if m is None:
            return prev(t, e, tb)
        print(m, file=sys.stderr)
        _exit(2)

    sys.excepthook = hook


def run(command, main, argv=None, doc=None):
    """For modules with main(argv): --help, then main; a user's error becomes its line and exit 2.
    argv=None: the process's own command line (`if __name__ == "__main__": sys.exit(run(...))`)."""
    global _hard
    _hard = _hard or argv is None
    args = sys.argv[1:] if argv is None else list(argv)
    if wants_help(args):
        usage(doc)
        return 0
    try:
        return main(args)
    except (UserError, OSError) as e:
        m = message(command, e)
        if m is None:
            raise
        print(m, file=sys.stderr, flush=True)
        if _hard:
            _exit(2)
        raise Refused(m) from None


def output_file(out, inputs, command):
    """Check an output file path before anything is written: not a folder, not any of the command's
    input files (the screen must never replace the controls it was made from), its folder writable.
    -> the absolute path."""
    if not out:
        raise UserError(f"{command}: --out is empty; give the output file's path")
    if os.path.isdir(out):
        raise UserError(f"{command}: --out={out} is a folder; give a file path (e.g. {os.path.join(out, 'out.h5ad')})")
    for p in inputs:
        if p and os.path.exists(out) and os.path.exists(p) and os.path.samefile(out, p):
            raise UserError(f"{command}: --out={out} is one of the inputs ({p}); it would be overwritten: "
                            "choose another output path")
    return os.path.abspath(out)


def need_space(path, nbytes, command):
    """Refuse before writing when the disk holding `path` has less than nbytes free (a write that fills
    the disk half-way helps nobody, and some writers crash on it)."""
    import shutil
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(d):
        d = os.path.dirname(d)
    free = shutil.disk_usage(d).free
    if free < nbytes:
        raise UserError(f"{command}: {d}: {free / 2**30:.2f} GiB free but writing {os.path.basename(path)} needs "
                        f"about {nbytes / 2**30:.2f} GiB; free space on that disk or write somewhere else")


def stale_tmp(target):
    """Remove `<target>.tmp<pid>` files left by killed runs (their pid is gone): the next run cleans its
    own leftovers."""
    import glob
    for p in glob.glob(glob.escape(target) + ".tmp*"):
        pid = p.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            try:
                os.remove(p)
            except OSError:
                pass
