"""
Reading pickles that a user hands us without running anything they contain.

A pickle names the functions it calls to rebuild its objects ("globals": `os.system` as easily as
`collections.OrderedDict`). Every reader of a user's pickle here goes through `restricted(allowed)`: an
Unpickler that resolves only the globals on its list and refuses any other by name, before anything is
called. Used by DCP checkpoint indexes (state/dist.py) and arc-state's `var_dims.pkl` (state/convert.py);
torch.save files (Lightning `.ckpt`, `.pt` maps) load with torch.load(weights_only=True) and the same lists
as its safe globals.

    Unpickler = restricted({("collections", "OrderedDict"): None})   # None: the real global
    obj = load(path, ALLOWED, "an arc-state checkpoint")              # UserError naming the global
"""

import pickle

import numpy as np
import torch

from state.errors import UserError

try:  # numpy >= 2
    from numpy._core.multiarray import scalar as _scalar
except ImportError:
    from numpy.core.multiarray import scalar as _scalar


def _np_dtype(*args):
    """numpy.dtype as pickles rebuild it, for plain kinds only (strings, bytes, bools, numbers): an object
    or structured dtype could carry anything."""
    d = np.dtype(*args)
    if d.kind not in "USbiuf" or d.names is not None:
        raise pickle.UnpicklingError(f"numpy dtype {d} is not allowed (only strings and numbers)")
    return d


def _np_scalar(dtype, *args):
    """numpy scalar (e.g. np.str_ names in arc-state's maps) -> the plain Python value."""
    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError("numpy scalar without a plain dtype")
    return _scalar(dtype, *args).item()


# plain data: containers, numpy's string/number scalars (as plain values), tensors and their storages
# (torch.load resolves storage names itself), the few torch rebuild functions, sizes and dtypes
PLAIN = {("collections", "OrderedDict"): None, ("builtins", "set"): None, ("builtins", "frozenset"): None,
         ("numpy", "dtype"): _np_dtype, ("numpy._core.multiarray", "scalar"): _np_scalar,
         ("numpy.core.multiarray", "scalar"): _np_scalar, ("torch._utils", "_rebuild_tensor_v2"): None,
         ("torch._utils", "_rebuild_parameter"): None, ("torch", "Size"): None}


class Opaque:
    """Stand-in for a config class of another package (omegaconf's DictConfig and its nodes, typing.Any)
    inside a checkpoint: rebuilt as plain data, none of that package's code runs. `plain(x)` reads it."""

    def __new__(cls, *args, **kw):
        return object.__new__(cls)

    def __init__(self, *args, **kw):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def plain(x):
    """An Opaque omegaconf tree -> plain dicts/lists/values (DictConfig/ListConfig `_content`, node `_val`)."""
    if isinstance(x, Opaque):
        st = getattr(x, "state", None)
        st = st[1] if isinstance(st, tuple) and len(st) == 2 and isinstance(st[1], dict) else st
        if isinstance(st, dict) and "_content" in st:
            return plain(st["_content"])
        if isinstance(st, dict) and "_val" in st:
            return plain(st["_val"])
        return None
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


# checkpoints that carry an omegaconf config (arc-state's Lightning hyper_parameters): its classes are
# Opaque, the builtins its pickle names (protocol-2 `__builtin__` names) are plain containers and numbers
CONFIGS = {**{("omegaconf." + m, n): Opaque for m, n in (
    ("dictconfig", "DictConfig"), ("listconfig", "ListConfig"), ("base", "Metadata"), ("base", "ContainerMetadata"),
    ("nodes", "AnyNode"), ("nodes", "StringNode"), ("nodes", "IntegerNode"), ("nodes", "FloatNode"),
    ("nodes", "BooleanNode"), ("nodes", "ValueNode"))}, ("typing", "Any"): Opaque,
    ("collections", "defaultdict"): None, **{(b, n): None for b in ("builtins", "__builtin__")
                                               for n in ("list", "dict", "int", "float", "str", "bool", "tuple")},
    ("__builtin__", "long"): int}


def restricted(allowed):
    """An Unpickler class that resolves only the globals in `allowed` ({(module, name): replacement or
    None for the real one}) and torch dtypes; any other is an UnpicklingError naming it."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, mod, name):
            if (mod, name) in allowed:
                return allowed[(mod, name)] or super().find_class(mod, name)
            if mod == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return super().find_class(mod, name)
            raise pickle.UnpicklingError(f"global '{mod}.{name}' is not allowed")

    return Unpickler


def _np_globals():
    """What torch.load(weights_only=True) needs beyond tensors to read numpy string/number scalars (the
    np.str_ names of arc-state's one-hot maps): the checked scalar and dtype builders above and numpy's
    plain dtype classes (their state is set, nothing is called)."""
    kinds = ("Str", "Bytes", "Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
             "Float16", "Float32", "Float64")
    classes = [getattr(np.dtypes, k + "DType") for k in kinds if hasattr(np.dtypes, k + "DType")]
    return [(_np_scalar, "numpy._core.multiarray.scalar"), (_np_scalar, "numpy.core.multiarray.scalar"),
            (_np_dtype, "numpy.dtype"), *classes]


def weights_load(path, what="it"):
    """A torch.save file of tensors and plain data (e.g. arc-state's one-hot maps): torch.load with
    weights_only=True, numpy's string and number scalars allowed; anything else a UserError."""
    from torch.serialization import safe_globals
    try:
        with safe_globals(_np_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _refuse(path, what, e) from None


def _refuse(path, what, e):
    import re
    g = re.search(r"GLOBAL ([\w.]*\w)", str(e))  # torch's weights-only unpickler names the global there
    msg = f"global '{g.group(1)}' is not allowed" if g else (str(e).splitlines() or [""])[0][:200]
    return UserError(f"{path}: not plain data ({type(e).__name__}: {msg}); refusing to unpickle {what} that "
                     "needs anything but tensors, numbers, strings and containers (it could run code)")


def load(path, allowed=PLAIN, what="it"):
    """A plain pickle file (e.g. var_dims.pkl) through restricted(allowed); anything else a UserError."""
    with open(path, "rb") as f:
        try:
            return restricted(allowed)(f).load()
        except Exception as e:  # refused globals, truncated or not a pickle
            raise _refuse(path, what, e) from None


def _safe_globals(allowed):
    """`allowed` as torch.load(weights_only=True)'s safe globals: (object, "module.name") pairs, stand-ins
    under the names they replace; globals of a package that is not installed are left out (refused)."""
    import importlib
    out = []
    for (mod, name), rep in allowed.items():
        if rep is None:
            try:
                rep = getattr(importlib.import_module("builtins" if mod == "__builtin__" else mod), name)
            except (ImportError, AttributeError):
                continue
        out.append((rep, f"{mod}.{name}"))
    return out + _np_globals()


def torch_load(path, allowed=PLAIN, what="it"):
    """A torch.save file (zip or legacy, e.g. a Lightning .ckpt) through torch's own weights-only
    unpickler, with only the globals in `allowed` (stand-ins for another package's config classes)."""
    from torch.serialization import safe_globals
    try:
        with safe_globals(_safe_globals(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _refuse(path, what, e) from None
