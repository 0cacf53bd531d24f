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
    else:
        return None
    return msg if msg.startswith(command + ":") or msg.startswith(command + " ") else f"{command}: {msg}"


def die(msg):
    """A script's own check failed: print the line, exit 2 (Refused carries the line for tests)."""
    print(msg, file=sys.stderr, flush=True)
    raise Refused(msg)


def wants_help(argv):
    return "--help" in argv or "-h" in argv


def usage(doc, extra=""):
    print((doc or "").strip() + ("\n\n" + extra if extra else ""))
    sys.stdout.flush()


def guard(command, doc=None, argv=None, extra=""):
    """For flat scripts (train.py): `--help` prints the docstring and exits 0; a UserError or a refused
    path anywhere later ends the process with its one line and status 2 (os._exit: a flat script has
    nothing to unwind, and loader processes watch their parent)."""
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        usage(doc, extra() if callable(extra) else extra)
        sys.exit(0)
    prev = sys.excepthook

    def hook(t, e, tb):
        m = message(command, e)
        if m is None:
            return prev(t, e, tb)
        print(m, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)

    sys.excepthook = hook


def run(command, main, argv=None, doc=None):
    """For modules with main(argv): --help, then main; a user's error becomes its line and exit 2."""
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
        raise Refused(m) from None
