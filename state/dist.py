"""
Distributed helpers: one code path for a single process, one GPU, or many under `torchrun`.

- `compute_init()` reads the torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE), picks NCCL on CUDA
  and gloo on CPU, seeds per rank, and returns (ddp, rank, local_rank, world, device).
- `wrap(raw, ...)`: the training model and optimizer (FSDP2, DDP or plain, compiled on request);
  `shard(model, blocks)` wraps a model with FSDP2 (`fully_shard` on each block, then the root), bf16
  params and fp32 gradient reduction on GPU. FSDP averages gradients over ranks; the training loop
  divides each micro-loss by the global number of sets and multiplies by the world size, so the
  gradient is the global mean (1 process x 4 micro-steps equals 2 processes x 2 micro-steps).
  (`set_gradient_divide_factor(1.0)` would avoid the multiply, but it reduces with PREMUL_SUM, which
  gloo lacks, and CPU tests run on gloo.)
- `save_sharded` / `load_sharded`: torch.distributed.checkpoint (DCP) of model + optimizer, which
  reloads at another world size; `full_state_dict` gathers an fp32 consolidated copy on rank 0 (a
  collective: every rank must call it). A checkpoint's layout and commit are state/ckpt.py's.
"""

import os
import random
import sys
import warnings

import numpy as np
import torch
import torch.distributed as dist


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def compute_init(seed=42, device=None):
    """-> (ddp, rank, local_rank, world, device). Without torchrun variables: single process."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device)
    if ddp and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    # one seed per rank for anything random on device (dropout); data order is seeded by the sampler
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    return ddp, rank, local_rank, world, device


def rng_state(device=None):
    """This process's RNG states in types that `torch.load(weights_only=True)` accepts (tensors, ints,
    tuples): state files are never unpickled with arbitrary classes."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                      int(has_gauss), float(gauss)),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None}


def set_rng_state(r, device=None):
    torch.set_rng_state(r["torch"])
    name, keys, pos, has_gauss, gauss = r["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    py = r["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if device is not None and device.type == "cuda" and r.get("cuda") is not None:
        torch.cuda.set_rng_state(r["cuda"], device)


def compute_cleanup():
    if dist.is_initialized():
        dist.barrier()  # nobody tears down (closing its gloo/NCCL connections) while a peer still runs
        dist.destroy_process_group()


def cpu_has_bf16():
    """True when this CPU computes bf16 natively (avx512_bf16 or AMX), from /proc/cpuinfo; None when
    unknown (not Linux)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return None
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def quiet_exit(code=0):
    """End a finished script without interpreter teardown: torch's optimizer imports torch._dynamo,
    which imports Triton whenever it is installed, and Triton's nanobind extension then prints dozens
    of "leaked function" lines at teardown (noise, not a leak of ours). Everything is flushed first;
    the scripts close their own files before this. Also avoids a rare gloo abort at exit under torchrun."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def all_reduce_sum(t):
    """Sum a tensor over ranks in place (no-op single-process); stays on device, no host sync."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shard(model, blocks, bf16=None):
    """FSDP2: fully_shard each block, then the root. bf16 params + fp32 reduce on GPU by default."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if bf16 is None:
        bf16 = next(model.parameters()).device.type == "cuda"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for b in blocks:
        fully_shard(b, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def wrap(raw, ddp, parallel, compile, local_rank, make_opt):
    """The model a training step calls, and its optimizer (make_opt(module)): under torchrun FSDP2 (the
    blocks compiled first, torchtitan's order; then fully_shard each block and the root; the optimizer on
    the sharded params, so its state is sharded too) or DDP; else the raw model, compiled on request."""
    if ddp and parallel == "fsdp":
        if compile:
            for blk in raw.blocks:
                blk.compile()
        return shard(raw, raw.blocks), make_opt(raw)
    opt = make_opt(raw)
    model = torch.compile(raw) if compile else raw
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        cuda = next(raw.parameters()).device.type == "cuda"
        model = DDP(model, device_ids=[local_rank] if cuda else None)
    return model, opt


def set_sync(model, sync):
    """Gradient sync only on the last micro-step of an accumulation (FSDP2 and DDP alike)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    elif hasattr(model, "require_backward_grad_sync"):
        model.require_backward_grad_sync = sync


def full_state_dict(model):
    """Consolidated fp32 CPU state dict on rank 0 ({} elsewhere). Collective: call on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model, opt, path):
    """DCP checkpoint of model + optimizer: one file per rank plus .metadata; reloads at any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    with warnings.catch_warnings():  # single process: DCP warns that it assumes one process, which is right
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


# What DCP's `.metadata` pickle may name: its own metadata classes, tensor sizes, dtypes and layouts,
# paths. DCP loads `.metadata` with plain pickle and its non-tensor items with torch.load(weights_only=
# False); a run folder is something a user can hand us, so both go through these guards instead.
_DCP_MD = "torch.distributed.checkpoint.metadata"
_DCP_OK = {(_DCP_MD, n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                  "ChunkStorageMetadata", "TensorProperties", "StorageMeta", "MetadataIndex",
                                  "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


def _safe_dcp():
    """A DCP FileSystemReader whose `.metadata` is read by a restricted unpickler (DCP's classes, torch
    dtypes, plain containers; anything else refused by name), and a load planner whose non-tensor items
    load with weights_only=True."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import StorageMeta

    from state.unpickle import restricted
    Unpickler = restricted(dict.fromkeys(_DCP_OK))  # DCP's classes, torch dtypes, plain containers

    class Reader(FileSystemReader):
        def read_metadata(self, *a, **k):
            path = self._get_metadata_path(k.get("rank"))
            with open(path, "rb") as f:
                try:
                    md = Unpickler(f).load()
                except Exception as e:
                    from state.errors import UserError
                    raise UserError(f"{path}: not a plain checkpoint index ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:200] if str(e) else ''}); refusing to unpickle "
                                    "it: resume from a checkpoint this project wrote") from None
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            try:
                obj = torch.load(value, weights_only=True)
            except Exception as e:
                from state.errors import UserError
                raise UserError(f"{self._path}: item '{read_item.dest_index.fqn}' is not plain data "
                                f"({type(e).__name__}); refusing to unpickle it") from None
            fqn = read_item.dest_index.fqn  # as DefaultLoadPlanner.load_bytes, on the plain object
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return Reader, Planner


def load_dcp(sd, path):
    """dcp.load of `sd` from `path` without unpickling anything but plain data (see _safe_dcp)."""
    import torch.distributed.checkpoint as dcp
    Reader, Planner = _safe_dcp()
    planner = Planner()
    planner._path = path
    from torch.distributed.checkpoint.api import CheckpointException
    from state.errors import UserError
    Reader(path).read_metadata()  # refused here, by name, before DCP wraps the error per rank
    try:
        with warnings.catch_warnings():  # single process: the same warning as in save_sharded
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            dcp.load(sd, storage_reader=Reader(path), planner=planner)
    except CheckpointException as e:
        for f in getattr(e, "failures", {}).values():
            inner = f[0] if isinstance(f, tuple) else f  # (exception, traceback) per rank
            if isinstance(inner, UserError):
                raise inner from None
        inner = next(iter(getattr(e, "failures", {}).values()), None)
        inner = inner[0] if isinstance(inner, tuple) else inner
        if isinstance(inner, OSError) and inner.errno is not None:
            raise inner from None  # a full disk, no permission: said as the OS's refusal of that path
        # a file of it truncated or damaged (EOFError, a short read), or of another model: the user's folder
        raise UserError(f"{path}: the sharded checkpoint cannot be read ({type(inner).__name__}: "
                        f"{(str(inner).splitlines() or [''])[0][:160]}); the run folder is damaged or copied in "
                        "part: copy it again, or start a new run") from None


def load_sharded(model, opt, path):
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    load_dcp(sd, path)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


# dense bf16 peak FLOP/s per device, matched by a substring of torch.cuda.get_device_name (vendor sheets)
PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "T4": 65e12}


def mfu(flops, seconds, device, world=1):
    """Model FLOP utilisation (0..1) of `flops` done by all `world` devices in `seconds`, or None for a
    device without a known peak (CPUs; print none rather than a guess)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK.items() if k in name), None)
    return flops / seconds / (peak * world) if peak else None
