"""
Perturbation labels and what a model reads for them: feature files ({name: vector}, checked entry by
entry), combination labels ('A+B': parsing, validation, multi-hot or feature tables from the parts), the
target gene a label names, and perturbation features computed from the training cells (pca). The model
(state/st.py) only receives the resulting table; splits, baselines, train.py and predict.py read labels
here, so every place parses 'A+B' and reads a features file the same way.
"""

import os

import numpy as np
import torch

from state.errors import UnknownName, UserError



class MissingFeatures(UnknownName):
    """Perturbations without a feature vector: a UserError, and a KeyError for callers that catch that."""


VECTOR_FORMATS = (".pt", ".pth", ".torch", ".safetensors", ".npz", ".tsv", ".txt")


def _vector(path, name, v):
    """One entry of a {name: vector} file -> float32 (P,) tensor, or UserError naming the entry."""
    if torch.is_tensor(v):
        v = v.detach().cpu()
        if v.is_complex() or v.dtype == torch.bool:
            raise UserError(f"{path}: entry '{name}' is a {v.dtype} tensor, not real numbers; save float vectors")
    else:
        if isinstance(v, (dict, str, bytes)) or v is None:
            raise UserError(f"{path}: entry '{name}' is {type(v).__name__ if v is not None else 'None'}, not a "
                            "vector of numbers; the file must map each name to one vector")
        try:
            a = np.asarray(v)
        except (ValueError, TypeError) as e:  # ragged lists
            raise UserError(f"{path}: entry '{name}' is not a vector of numbers ({e})") from None
        if a.dtype.kind not in "iuf":
            raise UserError(f"{path}: entry '{name}' holds {a.dtype} values, not real numbers; save float vectors")
        v = torch.from_numpy(np.array(a, dtype=np.float32))
    shape = tuple(v.shape)
    if sum(n > 1 for n in shape) > 1:
        raise UserError(f"{path}: entry '{name}' is a {shape} array, not one vector: the file must map each name to "
                        "one vector ({name: vector}); a table of rows needs its names, e.g. "
                        "np.savez(f, **dict(zip(names, rows)))")
    v = v.float().reshape(-1)
    if v.numel() == 0:
        raise UserError(f"{path}: entry '{name}' has no values (width 0); every vector needs the same width >= 1")
    bad = ~torch.isfinite(v)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise UserError(f"{path}: entry '{name}' holds {int(bad.sum())} NaN/Inf value(s) (first at position {i}: "
                        f"{v[i].item()}); fix or drop that vector (a NaN feature makes every loss NaN)")
    return v


def _read_tsv(path):
    """(name, values) pairs of a tab-separated file (an optional header row), duplicates named."""
    out, first = {}, {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            parts = line.rstrip("\r\n").split("\t")
            if not line.strip():
                continue
            try:
                v = [float(x) for x in parts[1:]]
            except ValueError:
                if not out and not first:
                    first[None] = i  # header row
                    continue
                raise UserError(f"{path}:{i + 1}: non-numeric feature value in the row of '{parts[0]}'; every "
                                "row is a name and its numbers, tab-separated") from None
            if not parts[0]:
                raise UserError(f"{path}:{i + 1}: a row with no name (the first column)")
            if parts[0] in first:
                raise UserError(f"{path}:{i + 1}: duplicated name '{parts[0]}' (first on line {first[parts[0]]}); "
                                "keep one vector per name")
            first[parts[0]] = i + 1
            out[parts[0]] = np.array(v, np.float32)
    return out


def read_vectors(path):
    """A {name: vector} file (.pt/.safetensors/.npz/.tsv) or dict -> ({name: float32 (P,) tensor} in file
    order, the path as a string). Every entry is checked: a name is a non-empty string and unique (tsv),
    a value is one vector of finite real numbers, all of one width >= 1; the file is not empty and is a
    mapping (not one tensor or array). Anything else is a UserError naming the file and the entry."""
    if isinstance(path, dict):
        d, path = path, "features"
    else:
        path = str(path)
        if not path.endswith(VECTOR_FORMATS):
            raise UserError(f"{path}: vector files must be .pt, .safetensors, .npz or .tsv")
        if not os.path.isfile(path):
            raise UserError(f"{path}: {'is a folder' if os.path.isdir(path) else 'not found'}; give a "
                            "{name: vector} file (.pt, .safetensors, .npz or .tsv)")
        if os.path.getsize(path) == 0:
            raise UserError(f"{path}: the file is empty (0 bytes); give a {{name: vector}} file")
        try:
            if path.endswith((".pt", ".pth", ".torch")):
                d = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
            elif path.endswith(".safetensors"):
                from safetensors.torch import load_file
                d = load_file(path)
            elif path.endswith(".npz"):
                with np.load(path, allow_pickle=False) as z:
                    d = {k: z[k] for k in z.files}
            else:
                d = _read_tsv(path)
        except UserError:
            raise
        except Exception as e:  # truncated, not that format, pickled objects: the file, not our code
            msg = " ".join(str(e).split())[:200]
            why = ("it names a class or function, not only tensors and plain containers: refusing to unpickle it; "
                   if "GLOBAL" in str(e) else "")  # what torch.load(weights_only=True) says of a class
            raise UserError(f"{path}: cannot read it as a {os.path.splitext(path)[1]} file of vectors "
                            f"({type(e).__name__}: {msg}); {why}save a {{name: vector}} mapping of tensors") from None
    if not isinstance(d, dict):
        what = f"a {tuple(d.shape)} tensor/array" if hasattr(d, "shape") else f"a {type(d).__name__}"
        raise UserError(f"{path}: holds {what}, not a {{name: vector}} mapping; save a dict of one vector per "
                        "name (e.g. torch.save(dict(zip(names, rows)), f))")
    if not d:
        raise UserError(f"{path}: no vectors in it (an empty mapping)")
    out = {}
    for k, v in d.items():
        if not isinstance(k, str) or not k:
            raise UserError(f"{path}: key {k!r} ({type(k).__name__}) is not a name: the file must map names "
                            "(non-empty strings) to vectors")
        out[str(k)] = _vector(path, k, v)
    widths = {}
    for k, v in out.items():
        widths.setdefault(v.numel(), []).append(k)
    if len(widths) > 1:
        common = max(widths, key=lambda w: len(widths[w]))
        odd = [(k, w) for w, ks in widths.items() if w != common for k in ks]
        raise UserError(f"{path}: vectors of unequal widths: {len(widths[common])} have {common} values but "
                        + ", ".join(f"'{k}' has {w}" for k, w in odd[:10]) + (" ..." if len(odd) > 10 else "")
                        + "; every vector needs the same width")
    return out, path


def load_pert_features(path, names, missing="error"):
    """{perturbation: vector} file (.pt/.safetensors/.npz/.tsv) or dict -> float32 (len(names), P) table.
    The file is checked entry by entry (read_vectors: UserError naming the file and the entry).

    A name of `names` absent from the file is an error listing them (the reference silently uses
    zeros; `missing="zero"` restores that with a warning and the coverage): MissingFeatures, a UserError
    that is also a KeyError."""
    if missing not in ("error", "zero"):
        raise UserError(f"--missing_pert_features={missing!r}: choose error or zero")
    d, path = read_vectors(path)
    P = next(iter(d.values())).numel()
    miss = [n for n in names if n not in d]
    if miss:
        msg = (f"{path}: {len(miss)}/{len(names)} perturbations have no feature vector: "
               f"{miss[:20]}{' ...' if len(miss) > 20 else ''}")
        if missing != "zero":
            raise MissingFeatures(msg + " (pass --missing_pert_features=zero to give them zero vectors)")
        print(f"WARNING: {msg}; using zero vectors (coverage {len(names) - len(miss)}/{len(names)})")
    return torch.stack([d.get(n, torch.zeros(P)) for n in names])


def target_gene(label):
    """The gene a perturbation label names: 'CRISPRi:STAT1' -> 'STAT1' (prepare --modality keys)."""
    return str(label).split(":", 1)[-1]


def gene_pca(data, rows, d=10, n_max=20000, seed=0):
    """Top-d principal axes of the training cells (G, d): gene embeddings."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(rows, min(len(rows), n_max), replace=False))
    X = data.rows(rows).astype(np.float64)
    X -= X.mean(0)
    d = min(d, *X.shape)
    if X.shape[1] <= 4096:  # exact: eigenvectors of the G x G scatter matrix
        w, V = np.linalg.eigh(X.T @ X)
        return V[:, ::-1][:, :d]
    torch.manual_seed(seed)  # many genes: randomized PCA, no G x G matrix
    _, _, V = torch.pca_lowrank(torch.from_numpy(X), q=min(d + 10, *X.shape), center=False, niter=6)
    return V[:, :d].numpy()


def pca_pert_features(data, rows, names, d=16):
    """Perturbation features from the training data itself, no download: the loadings of each
    perturbation's target gene on the top-d principal axes of the training cells' expression (the gene
    embedding the linear baseline uses). -> ({name: (d,) vector} for the names whose target is a
    measured gene, [names whose target is not])."""
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise UserError(f"pca perturbation features: d={d!r} axes; give an integer >= 1")
    if len(rows) < 2:
        raise UserError(f"pca perturbation features: {len(rows)} training cell(s) in {data.dir}; the pca of the "
                        "training cells needs at least 2 (check the split, or give a features file)")
    G = np.ascontiguousarray(gene_pca(data, rows, d), dtype=np.float32)  # (n_genes, d)
    if not np.isfinite(G).all():
        raise UserError(f"pca perturbation features: the training cells of {data.dir} hold NaN/Inf values, so "
                        "their pca does too; prepare the data again (state.data prepare refuses non-finite "
                        "values) or give a features file")
    col = {g: i for i, g in enumerate(data.genes)}
    have = {n: G[col[target_gene(n)]] for n in names if target_gene(n) in col}
    return have, [n for n in names if n not in have]


def parts_of(label, sep):
    """The single perturbations of a label: 'A+B' -> ['A', 'B'] (order kept); no separator -> [label].
    Lenient (empty parts dropped): check_combo_labels refuses malformed labels where they enter."""
    return [p for p in str(label).split(sep) if p] if sep else [str(label)]


def check_combo_labels(labels, sep, control, known_parts=None, max_parts=None, where="perturbation labels",
                       fix=None):
    """Every combination label well formed, or UserError naming it: no empty part ('+A', 'A+', 'A++B'),
    no part with spaces around it ('A + B'), no part twice ('A+A'), not the control as a part
    ('control+A'). With `known_parts` (the singles a run knows): every part among them; with `max_parts`:
    at most that many parts (a run trained on singles and doubles has never seen a triple). The control
    label itself is skipped. -> [parts of each label]."""
    fix = fix or ("name each combination by its perturbations joined by "
                  f"'{sep}', each once, no spaces (rename the labels in the data and prepare it again)")
    known = None if known_parts is None else set(known_parts)
    out = []
    for lab in labels:
        if not isinstance(lab, str):
            raise UserError(f"{where}: label {lab!r} is a {type(lab).__name__}, not a string; {fix}")
        if lab == control or not sep:
            out.append([lab])
            continue
        ps = lab.split(sep)
        if any(p == "" for p in ps):
            raise UserError(f"{where}: label '{lab}' has an empty part (it starts with, ends with or doubles "
                            f"the separator '{sep}'); {fix}")
        sp = next((p for p in ps if p != p.strip()), None)
        if sp is not None:
            raise UserError(f"{where}: label '{lab}' has the part {sp!r} with spaces around it (write "
                            f"'{sep.join(p.strip() for p in ps)}'); {fix}")
        if control in ps:
            raise UserError(f"{where}: label '{lab}' has the control '{control}' as a part (a combination lists "
                            f"only its perturbations: '{sep.join(p for p in ps if p != control)}'); {fix}")
        dup = next((p for i, p in enumerate(ps) if p in ps[:i]), None)
        if dup is not None:
            raise UserError(f"{where}: label '{lab}' names the part '{dup}' twice; {fix}")
        if known is not None:
            unknown = [p for p in ps if p not in known]
            if unknown:
                kp = [p for p in known_parts if p != control]
                raise UserError(f"{where}: combination '{lab}' has the single(s) {unknown} that the run never saw "
                                f"(it knows {len(kp)}: {kp[:20]}{' ...' if len(kp) > 20 else ''})")
        if max_parts is not None and len(ps) > max_parts:
            raise UserError(f"{where}: combination '{lab}' has {len(ps)} parts, more than any label the run "
                            f"trained on (at most {max_parts}): the model never saw a combination that large")
        out.append(ps)
    return out


def multi_hot(split, vocab):
    """float32 (len(split), len(vocab)): row i counts the parts split[i] lists (e_A + e_B for 'A+B'), the
    code a one-hot run reads for a combination (combo_table; predict.py simulate's new combinations)."""
    col = {p: i for i, p in enumerate(vocab)}
    T = torch.zeros(len(split), len(vocab))
    for i, ps in enumerate(split):
        for p in ps:
            T[i, col[p]] += 1.0
    return T


def combo_table(names, control, sep="+", reduce="sum", features=None, missing="error",
                where="perturbation labels"):
    """Encode every label from its parts: -> (float32 (len(names), P) table, parts vocabulary).

    One-hot runs (features None): multi-hot over the single perturbations that occur in any label (the
    control its own part), so 'A+B' is e_A + e_B and a double whose singles were seen has a code the
    model can read even if the double never trained. With `features` (a features file path or dict):
    each label is the `reduce` (sum | mean) of its parts' vectors. A part without a vector is an error
    naming it and its label (missing="zero": zero vectors, warned). Malformed labels ('A+A', '+A',
    'control+A', 'A + B') are refused by check_combo_labels, its message starting with `where`."""
    if reduce not in ("sum", "mean"):
        raise UserError(f"combo_reduce '{reduce}' not one of sum, mean")
    if not isinstance(sep, str) or not sep:
        raise UserError(f"--combos={sep!r}: give the separator of combination labels (e.g. +)")
    split = check_combo_labels(names, sep, control, where=where)
    vocab = sorted({p for ps in split for p in ps} - {control})
    vocab = [control] + vocab
    if features is None:
        T = multi_hot(split, vocab)
    else:
        need = [p for p in vocab if p != control]
        d, path = read_vectors(features)
        lacking = [p for p in need if p not in d]
        if lacking and missing != "zero":
            label = next((n for n, ps in zip(names, split) if set(ps) & set(lacking)), "?")
            raise MissingFeatures(f"{path}: {len(lacking)}/{len(need)} parts have no feature vector: "
                                  f"{lacking[:20]}{' ...' if len(lacking) > 20 else ''}; e.g. part '{lacking[0]}' "
                                  f"of label '{label}' (combinations are encoded from their parts' vectors; "
                                  "--missing_pert_features=zero gives them zero vectors)")
        F_ = load_pert_features(d, need, missing=missing)
        row = {p: F_[i] for i, p in enumerate(need)}
        row[control] = torch.zeros(F_.shape[1])  # the control: no perturbation, the zero vector
        T = torch.stack([torch.stack([row[p] for p in ps]).sum(0) for ps in split])
    if reduce == "mean":
        T = T / torch.tensor([len(ps) for ps in split], dtype=torch.float32)[:, None]
    return T.float(), vocab
