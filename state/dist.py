"""
Distributed helpers: one code path for a single process, one GPU, or many under `torchrun`.

- `compute_init()` reads the torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE), picks NCCL on CUDA
  and gloo on CPU, seeds per rank, and returns (ddp, rank, local_rank, world, device).
- `shard(model, blocks)` wraps a model with FSDP2 (`fully_shard` on each block, then the root), bf16
  params and fp32 gradient reduction on GPU. FSDP averages gradients over ranks; the training loop
  divides each micro-loss by the global number of sets and multiplies by the world size, so the
  gradient is the global mean (1 process x 4 micro-steps equals 2 processes x 2 micro-steps).
  (`set_gradient_divide_factor(1.0)` would avoid the multiply, but it reduces with PREMUL_SUM, which
  gloo lacks, and CPU tests run on gloo.)
- `save_sharded` / `load_sharded`: torch.distributed.checkpoint (DCP) of model + optimizer, which
  reloads at another world size; `full_state_dict` gathers an fp32 consolidated copy on rank 0 (a
  collective: every rank must call it).
"""

import os
import random
import sys
import time
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


def load_state(path):
    """A state.pt (optimizer, sampler, RNG) loaded with weights_only=True: a file that needs any other
    class to unpickle is refused, naming the file (it cannot run code here)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends
        from state.errors import die
        die(f"{path}: not a plain state file (tensors, numbers, strings only); refusing to "
                         f"unpickle it ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")


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


def stage_checkpoint(out, step, model, opt, device):
    """The collective part of one checkpoint (state/ckpt.py), on every rank: rank 0 opens the staging
    folder, all ranks write `dcp/` (model + optimizer, sharded; reloads at any world size), rank 0
    gathers the consolidated fp32 weights, and every rank's RNG state is gathered. -> (staging folder,
    CPU state dict ({} off rank 0), [RNG state of each rank]). Rank 0 then writes its files into the
    folder and calls ckpt.commit (train.py, embed.py)."""
    from state import ckpt
    master = not dist.is_initialized() or dist.get_rank() == 0
    if master:
        ckpt.begin(out, step)
    if dist.is_initialized():
        dist.barrier()
    d = ckpt.staging(out, step)
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        save_sharded(model, opt, os.path.join(d, "dcp"))
    except (CheckpointException, OSError) as e:  # a full disk: the committed checkpoint stays as it was
        if master:
            ckpt.abandon(out, step)
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
        ckpt._done()
    sd = {k: v.detach().cpu().contiguous() for k, v in full_state_dict(model).items()}
    rngs = [rng_state(device)]
    if dist.is_initialized():
        mine, rngs = rngs[0], [None] * dist.get_world_size()
        dist.all_gather_object(rngs, mine)
    return d, sd, rngs


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
        raise


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


def _loader_worker(s, ring, tasks, done, parent):
    """A loader process: builds micro-batch c into ring slot `slot` (shared memory: nothing is pickled
    but the job and its receipt). Exits on None or when the parent is gone."""
    torch.set_num_threads(1)
    while True:
        if not tasks._reader.poll(1.0):  # SimpleQueue: no feeder thread; poll to notice a dead parent
            if os.getppid() != parent:
                return
            continue
        job = tasks.get()
        if job is None:
            return
        c, slot = job
        try:
            t0 = time.perf_counter()
            s.batch(*divmod(c, s.steps_per_epoch), out=ring[slot])  # every tensor lands in the slot
            done.put((c, None, time.perf_counter() - t0))
        except BaseException as e:  # noqa: BLE001 (reported in the parent, which raises it)
            done.put((c, f"{type(e).__name__}: {e}", 0.0))


def _shared(arrays):
    """The same arrays in anonymous shared memory (inherited by forked loader processes)."""
    import mmap
    out = {}
    for k, a in arrays.items():
        buf = mmap.mmap(-1, max(a.nbytes, 1))
        out[k] = np.frombuffer(buf, a.dtype, a.size).reshape(a.shape)
    return out


class StepSampler:
    """This rank's micro-batches of each optimizer step, cut from ONE global sequence of B-set
    micro-batches that does not depend on the world size: a `SetSampler` or `CellSampler` (same seed on
    every rank; anything with batch(epoch, step, out), buffers(), from_buffers(), steps_per_epoch) read
    at micro-batch index c, epoch c // spe. Optimizer step g uses micro-batches [g*W*k, (g+1)*W*k); rank
    r takes the contiguous block [r*k, (r+1)*k) of it. So ranks never overlap within an epoch, every
    rank runs the same number of steps, and 1 process x 4 micro-steps sees the same sets as 2 processes
    x 2 micro-steps. The state is one global cursor (micro-batches consumed by all ranks), so a run
    resumes at another world size (same B; same W*k for the same trajectory).

    workers > 0: that many forked loader processes build the next `prefetch` steps' micro-batches while
    the current step runs, into a ring of accum x (prefetch + 2) buffer sets in shared memory (processes,
    not threads: the index maths holds the GIL, which capped 2 threads at 1.48x of 1). A micro-batch is a
    pure function of its index, so the batches and their order do not depend on the number of workers.
    A batch from next() is a view of its ring slot: valid until prefetch + 1 more calls (train.py uses
    it for one step). pin=True copies it into pinned memory (CUDA) for non-blocking host-to-device
    transfers. `wait` accumulates the seconds next() spent waiting for data, `built` the seconds spent
    building the `n_built` micro-batches (summed over the loader processes): capacity() is what the
    loader could deliver."""

    def __init__(self, sampler, rank=0, world=1, accum=1, workers=0, prefetch=2, pin=False):
        self.s, self.rank, self.world, self.accum = sampler, rank, world, accum
        self.workers, self.prefetch, self.pin = int(workers), max(1, int(prefetch)), pin
        self.cursor, self.wait, self.built, self.n_built = 0, 0.0, 0.0, 0
        self._procs, self._pending, self._ready = [], set(), set()
        if self.workers:
            import multiprocessing as mp
            ctx = mp.get_context("fork")
            self._R = self.accum * (self.prefetch + 2)
            self._ring = [_shared(self.s.buffers()) for _ in range(self._R)]
            self._tasks, self._done = ctx.SimpleQueue(), ctx.SimpleQueue()
            self._procs = [ctx.Process(target=_loader_worker, daemon=True, name=f"loader{i}",
                                       args=(self.s, self._ring, self._tasks, self._done, os.getpid()))
                           for i in range(self.workers)]
            for q in self._procs:
                q.start()

    def micro(self, c):
        """Micro-batch c, built in this process."""
        t0 = time.perf_counter()
        b = self.s.batch(*divmod(c, self.s.steps_per_epoch))
        self.built, self.n_built = self.built + time.perf_counter() - t0, self.n_built + 1
        return {k: v.pin_memory() for k, v in b.items()} if self.pin else b

    def _ids(self, cursor):
        base = cursor + self.rank * self.accum
        return range(base, base + self.accum)

    def _slot(self, cur, j):
        return ((cur // (self.world * self.accum)) * self.accum + j) % self._R

    def _submit(self, cur):
        if cur not in self._pending:
            self._pending.add(cur)
            for j, c in enumerate(self._ids(cur)):
                self._tasks.put((c, self._slot(cur, j)))

    def _take(self, cur):
        """Wait for step `cur`'s micro-batches from the loader processes; -> list of batches."""
        want = list(self._ids(cur))
        while any(c not in self._ready for c in want):
            while not self._done._reader.poll(0.5):  # a loader killed (OOM killer, kill -9) never answers
                self._check_alive()
            c, err, dt = self._done.get()
            if err is not None:
                raise RuntimeError(f"loader process failed on micro-batch {c}: {err}")
            self._ready.add(c)
            self.built, self.n_built = self.built + dt, self.n_built + 1
        self._pending.discard(cur)
        bs = []
        for j, c in enumerate(want):
            self._ready.discard(c)
            b = self.s.from_buffers(self._ring[self._slot(cur, j)])  # tensors viewing the shared slot
            bs.append({k: v.pin_memory() for k, v in b.items()} if self.pin else b)
        return bs

    def _check_alive(self):
        import signal
        from state.errors import UserError
        for q in self._procs:
            if q.exitcode is not None:
                how = (f"killed by signal {-q.exitcode} ({signal.Signals(-q.exitcode).name}"
                       f"{', e.g. by the out-of-memory killer' if -q.exitcode == signal.SIGKILL else ''})"
                       if q.exitcode < 0 else f"exited with status {q.exitcode}")
                self.close()
                raise UserError(f"loader process {q.name} (pid {q.pid}) died: {how}; the last checkpoint is "
                                "intact: run again with --resume (with fewer --workers, or more memory)")

    def next(self):
        """-> list of `accum` batches (this rank's share of the next optimizer step)."""
        t0 = time.perf_counter()
        if not self._procs:
            bs = [self.micro(c) for c in self._ids(self.cursor)]
        else:
            self._submit(self.cursor)
            bs = self._take(self.cursor)
        self.wait += time.perf_counter() - t0
        self.cursor += self.world * self.accum
        for i in range(self.prefetch if self._procs else 0):  # keep `prefetch` steps queued
            self._submit(self.cursor + i * self.world * self.accum)
        return bs

    def capacity(self, since=(0.0, 0)):
        """Micro-batches per second the loader can build (all its processes together), over the builds
        after `since` = an earlier (built, n_built); 0 before any."""
        dt, n = self.built - since[0], self.n_built - since[1]
        return n * max(1, self.workers) / dt if dt > 0 else 0.0

    @property
    def epoch(self):
        return self.cursor / self.s.steps_per_epoch

    def state_dict(self):
        return dict(cursor=self.cursor, seed=self.s.seed, set_size=self.s.S, batch_size=self.s.B,
                    steps_per_epoch=self.s.steps_per_epoch, world=self.world, accum=self.accum)

    def load_state_dict(self, sd):
        for k in ("seed", "set_size", "batch_size", "steps_per_epoch"):
            if sd[k] != self.state_dict()[k]:
                raise ValueError(f"sampler state has {k}={sd[k]} but this run has {self.state_dict()[k]}")
        for cur in sorted(self._pending):  # batches queued for the old cursor: wait them out (slots get reused)
            self._take(cur)
        self.cursor = int(sd["cursor"])

    def close(self):
        for q in self._procs:
            if q.exitcode is None:
                self._tasks.put(None)
        for q in self._procs:
            q.join(timeout=5)
            if q.is_alive():
                q.terminate()
        self._procs = []
