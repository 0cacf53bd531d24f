"""
Flat `--key=value` overrides for the scripts (nanoGPT's configurator, made strict).

    python train.py config/st_cpu.py --lr=3e-4 --hidden=256

- A bare argument ending in `.py` is executed as a config file into the same namespaces (a name that no
  namespace holds is refused, as an unknown --key is; imported modules and functions are left out). The recipes in config/ at the repo root are such files; the library
  reads them too (`recipe`).
- `--key=value`: the value is parsed with `ast.literal_eval` (falling back to the raw string), the
  key must exist in one of the namespaces, and the type must match the default's type (an int is
  accepted where a float is expected; `--flag` alone means True for a bool).
- Unknown keys and type mismatches raise `ValueError` naming the key.
"""

import ast
import os

from state.errors import UserError

# the recipes (config/*.py) sit beside the package in the checkout, which an editable install
# (`pip install -e .`, as the README installs) imports the package from
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config")


def _coerce(key, val, default):
    if isinstance(val, str) and not isinstance(default, str):
        try:
            val = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            pass
    if default is None:
        return val
    if isinstance(default, bool):
        if not isinstance(val, bool):
            raise UserError(f"--{key}: expected a bool (True/False), got {val!r}")
        return val
    if isinstance(default, float) and isinstance(val, int) and not isinstance(val, bool):
        return float(val)
    if isinstance(default, (tuple, list)) and isinstance(val, (tuple, list)):
        return type(default)(val)
    if type(val) is not type(default):
        raise UserError(f"--{key}: expected {type(default).__name__}, got {type(val).__name__} ({val!r})")
    return val


def configure(argv, *namespaces):
    """Apply overrides in `argv` to the dicts `namespaces` (first one holding the key wins).
    Returns the set of keys that were overridden."""
    seen = set()
    for arg in argv:
        if not arg.startswith("--"):
            if not arg.endswith(".py"):
                raise UserError(f"unexpected argument {arg!r} (use --key=value or a config .py file)")
            known = {kk for ns in namespaces for kk in ns}
            items = {k: v for k, v in read(arg).items() if not callable(v) and not hasattr(v, "__spec__")}
            bad = [k for k in items if k not in known]  # a misspelt name must not be dropped in silence
            if bad:
                raise UserError(f"{arg}: sets {', '.join(bad)}, which {'is' if len(bad) == 1 else 'are'} not "
                                f"a setting here; known: {', '.join(sorted(known))}")
            for k, v in items.items():
                try:
                    _set(namespaces, k, v, seen)
                except UserError as e:  # a wrong type set by the file: name the file, not only the key
                    raise UserError(f"{arg}: {e}") from None
            continue
        key, eq, val = arg[2:].partition("=")
        if not eq:
            val = True
        _set(namespaces, key, val, seen)
    return seen


def read(path):
    """The names a config file sets (those not starting with _), in the file's order."""
    g = {}
    with open(path, "rb") as f:  # bytes: a file that is not UTF-8 is compile()'s SyntaxError below
        src = f.read()
    try:  # a config file is the user's: its syntax error or failing line is one line naming it, not a traceback
        exec(compile(src, path, "exec"), g)
    except SyntaxError as e:
        raise UserError(f"{path}{f':{e.lineno}' if e.lineno else ''}: not valid Python ({e.msg}); fix the config file") from None
    except Exception as e:
        import traceback
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == path), "?")
        raise UserError(f"{path}:{line}: running the config file failed ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]}); fix the config file") from None
    return {k: v for k, v in g.items() if not k.startswith("_")}


def recipe(name):
    """config/<name>.py of the repo, read: the recipe a script runs as a file (`python train.py
    config/st_cpu.py`) and the library reads by name (state/st.py's cpu preset, state/experiment.py's tasks)."""
    path = os.path.join(CONFIG_DIR, f"{name}.py")
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found; the recipes in config/ are read from the checkout beside the "
                        "state package: install it with `pip install -e .`")
    return read(path)


def _set(namespaces, key, val, seen):
    for ns in namespaces:
        if key in ns:
            ns[key] = _coerce(key, val, ns[key])
            seen.add(key)
            return
    known = sorted(k for ns in namespaces for k in ns)
    raise UserError(f"unknown config key --{key}; known keys: {', '.join(known)}")


def dashes(argv):
    """The module CLIs (state.data, state.splits, state.baselines, state.eval, state.synth,
    state.experiment) take `--key=value` with the same underscore names as train.py; `--key-name`
    spellings of earlier versions still parse: option names get their hyphens turned into underscores
    (values are left alone)."""
    import sys
    out = []
    for a in (sys.argv[1:] if argv is None else argv):
        if a.startswith("--"):
            k, eq, v = a[2:].partition("=")
            a = f"--{k.replace('-', '_')}{eq}{v}"
        out.append(a)
    return out
