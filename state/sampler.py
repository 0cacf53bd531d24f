"""
Samplers: what training reads from a prepared folder (state/data.py), and how.

The protocol every sampler keeps (SetSampler: cell sets with matched controls for ST; CellSampler: single
cells for SE; anything else train.py or embed.py should read through StepSampler):
- `batch(epoch, step, out=None)` is a pure function of (seed, epoch, step): no epoch plan, no state, so a
  batch is the same whichever process builds it, whenever. Nothing per cell or per set is stored: the
  orders are seeded permutations (state.data.permute) over O(groups) tables.
- `steps_per_epoch`, `seed`, `S` (cells per set; 1 for single cells) and `B` (sets per micro-batch).
- `buffers()` -> dict of numpy arrays that `batch(..., out=buffers)` fills in place, and
  `from_buffers(buf)` -> the batch (dict of tensors) viewing them: how loader processes hand batches over
  through shared memory without pickling them.
What a batch holds: SetSampler's class docstring (ctrl, tgt, pert, context, lens, batch, tgt_idx,
ctrl_idx, valid[, tgt_genes]); CellSampler's (x, folder, row).

Determinism and resume: StepSampler cuts ONE global sequence of micro-batches (micro-batch c is
batch(c // steps_per_epoch, c % steps_per_epoch)) into optimizer steps and ranks, so its whole state is
one cursor; a run resumes exactly from state_dict() at any number of processes or loader workers (same
seed, S, B and steps_per_epoch: load_state_dict refuses a change). SetSampler.next()/state_dict() give the
same for single-process use. draw_controls is the one way predictions draw control cells.
"""

import mmap
import multiprocessing as mp
import os
import signal
import time

import numpy as np
import torch

from state.data import Rows, hkey, permute
from state.errors import UserError


def draw_controls(pool, n, rng):
    """n control rows from `pool`, spread as evenly as possible: whole random permutations of the pool,
    then a random subset without replacement for the rest, shuffled (each control is used floor(n/k) or
    ceil(n/k) times). Draws with replacement add sampling noise to a predicted pseudobulk, and a weak
    effect (a few hundredths of a log unit) drowns in it; every predictor (ST and baselines) uses this."""
    pool = np.asarray(pool)
    reps, rest = divmod(int(n), len(pool))
    parts = [rng.permutation(pool) for _ in range(reps)] + [rng.choice(pool, rest, replace=False)]
    return rng.permutation(np.concatenate(parts))


# -----------------------------------------------------------------------------
# cell sets with matched controls (SPEC 5)

class SetSampler:
    """Sets of `set_size` cells of one (context, pert[, batch]) group, each paired with control cells drawn
    with replacement from the same context (and batch under mapping="batch", falling back to the context).
    `rows`: a Rows (a split part) or an index array.

    The batch at (epoch, step) is computed on demand from O(groups) tables: set ids are a seeded
    permutation (permute) of [0, n_sets) per epoch, a set is S consecutive positions of its group under a
    seeded per-(epoch, group) permutation, and positions map to rows through the segments. Nothing per
    cell or per set is stored. train=True: the last set of a group is padded by resampling the group, the
    order reshuffles every epoch. train=False: unpadded sets (lens < set_size, zero rows beyond) in group
    order; the last step's wrap-around sets have valid=False.
    Batches are dicts of tensors: ctrl, tgt (B,S,G) float32; pert, context, lens (B,) int64; batch (B,S);
    tgt_idx, ctrl_idx (B,S) row indices (-1 = padding); valid (B,) bool; tgt_genes (B,S,G_out) float32 when
    the data has gene-space targets (prepare --genes-key)."""

    def __init__(self, data, rows, set_size, batch_size, seed=0, train=True, control_sets=True, mapping="random"):
        if mapping not in ("random", "batch"):
            raise UserError(f"mapping '{mapping}' not one of random, batch")
        self.data, self.S, self.B = data, int(set_size), int(batch_size)
        self.seed, self.train, self.control_sets, self.mapping = seed, train, control_sets, mapping
        rows = rows if isinstance(rows, Rows) else Rows.of(rows)
        if len(rows) == 0:
            raise UserError("SetSampler: no rows (empty split?)")
        self.segs, gi = rows.cut(data)
        gt = data.group_table
        c, p, b = gt[gi, 0], gt[gi, 1], gt[gi, 2]  # codes per segment
        self.seg_batch = b
        m = self.segs.hi - self.segs.lo
        self.cum = np.concatenate([[0], np.cumsum(m)])  # segment s holds positions [cum[s], cum[s+1])
        ctl = p == data.control_code
        # control pools: runs of control segments of one context (and batch under batch mapping)
        pools, self.pool_of = [], {}
        for k in np.unique(c[ctl]):
            s = np.flatnonzero(ctl & (c == k))
            self.pool_of[(int(k), -1)] = len(pools); pools.append((s[0], s[-1] + 1))
            if mapping == "batch":
                for j in np.unique(b[s]):
                    t = s[b[s] == j]
                    self.pool_of[(int(k), int(j))] = len(pools); pools.append((t[0], t[-1] + 1))
        self.pools = np.array(pools, np.int64).reshape(-1, 2)  # (n_pools, 2) segment ranges
        # target groups: runs of segments with one (context, pert[, batch]) (segments are in row order)
        key = (c * len(data.pert_names) + p) * (len(data.batch_names) if mapping == "batch" else 1) \
            + (b if mapping == "batch" else 0)
        brk = np.concatenate([[0], np.flatnonzero(np.diff(key)) + 1, [len(key)]])
        gs = []  # (first segment, end segment, context, pert, pool)
        for x, y in zip(brk[:-1], brk[1:]):
            k, pp, bb = int(c[x]), int(p[x]), int(b[x])
            if pp == data.control_code and not control_sets:
                continue
            pool = self.pool_of.get((k, bb if mapping == "batch" else -1), self.pool_of.get((k, -1)))
            if pool is None:
                raise UserError(f"context '{data.context_names[k]}' has no control cells "
                                 f"('{data.control}') among the sampler's rows, so perturbation "
                                 f"'{data.pert_names[pp]}' cannot be paired with controls")
            gs.append((x, y, k, pp, pool))
        if not gs:
            raise UserError("SetSampler: no target groups (only controls and control_sets=False?)")
        self.g = np.array(gs, np.int64)  # (n_groups, 5)
        self.g_n = self.cum[self.g[:, 1]] - self.cum[self.g[:, 0]]  # cells per group
        k_sets = -(-self.g_n // self.S)
        self.set_base = np.concatenate([[0], np.cumsum(k_sets)])  # group g holds sets [base[g], base[g+1])
        self.n_sets = int(self.set_base[-1])
        self.steps_per_epoch = -(-self.n_sets // self.B)
        self.epoch, self.step = 0, 0

    def __len__(self):
        return self.steps_per_epoch

    def _rows_at(self, pos):
        """Global positions (any shape) -> row indices."""
        s = np.searchsorted(self.cum, pos, "right") - 1
        return self.segs.at(s, pos - self.cum[s]), s

    def indices(self, epoch, step):
        """Row indices of the batch at (epoch, step), without reading X: target rows t and control rows
        ci (B,S) (-1 = padding), lens (B,), group ids g (B,), valid (B,), target segments ts (B,S).
        A pure function of (seed, epoch, step)."""
        S, B = self.S, self.B
        j = step * B + np.arange(B)
        valid = j < self.n_sets
        j = j % self.n_sets  # the last step wraps around
        sid = permute(j, self.n_sets, hkey(self.seed, epoch, -1)) if self.train else j
        g = np.searchsorted(self.set_base, sid, "right") - 1  # (B,)
        n = self.g_n[g]
        i = (sid - self.set_base[g])[:, None] * S + np.arange(S)  # (B,S) positions in the group
        lens = np.minimum(S, n - i[:, 0]) if not self.train else np.full(B, S)
        inside = i < n[:, None]
        rng = np.random.default_rng([self.seed, epoch, step, 1])
        if self.train:
            # this epoch's order of the group's cells; the last set is padded by resampling the group
            pos = np.where(inside, permute(np.minimum(i, n[:, None] - 1), n[:, None],
                                           hkey(self.seed, epoch, g)[:, None]),
                           (rng.random((B, S)) * n[:, None]).astype(np.int64))
        else:
            pos = np.where(inside, i, 0)
        t, ts = self._rows_at(self.cum[self.g[g, 0]][:, None] + pos)
        pool = self.pools[self.g[g, 4]]  # (B, 2) segment range of each set's control pool
        a, z = self.cum[pool[:, 0]], self.cum[pool[:, 1]]
        ci, _ = self._rows_at(a[:, None] + (rng.random((B, S)) * (z - a)[:, None]).astype(np.int64))
        if not self.train:
            t, ci = np.where(inside, t, -1), np.where(inside, ci, -1)
        # order within a set is arbitrary: sorted rows read the memmap forwards (-1 padding stays last)
        big = np.iinfo(np.int64).max
        o = np.argsort(np.where(t < 0, big, t), axis=1, kind="stable")
        t, ts = np.take_along_axis(t, o, 1), np.take_along_axis(ts, o, 1)
        ci = np.sort(np.where(ci < 0, big, ci), axis=1)
        ci[ci == big] = -1
        return t, ci, lens, g, valid, ts

    def buffers(self):
        """Arrays that batch(out=...) fills in place (a loader reuses them instead of allocating): x, g
        for the expression rows, and one per small tensor of a batch."""
        B, S = self.B, self.S
        b = dict(x=np.empty((2 * B * S, self.data.n_genes), np.float32),
                 **{k: np.empty((B, S), np.int64) for k in ("batch", "tgt_idx", "ctrl_idx")},
                 **{k: np.empty(B, np.int64) for k in ("pert", "context", "lens")}, valid=np.empty(B, bool))
        if self.data.G is not None:
            b["g"] = np.empty((B * S, self.data.n_genes_out), np.float32)
        return b

    def from_buffers(self, buf):
        """The batch that batch(out=buf) wrote, as tensors viewing `buf` (a loader's shared ring)."""
        B, S = buf["tgt_idx"].shape
        x = torch.from_numpy(buf["x"]).view(2, B, S, -1)  # (2, B, S, G): targets, controls
        b = dict(ctrl=x[1], tgt=x[0], **{k: torch.from_numpy(v) for k, v in buf.items() if k not in ("x", "g")})
        if "g" in buf:
            b["tgt_genes"] = torch.from_numpy(buf["g"]).view(B, S, -1)
        return b

    def batch(self, epoch, step, out=None):
        """The batch (dict of tensors, see the class docstring) at (epoch, step); with out=buffers() its
        expression tensors are views of those arrays."""
        t, ci, lens, g, v, ts = self.indices(epoch, step)
        B, S = t.shape
        pad = t < 0
        out = out or {}
        # one read for targets and controls; padding reads the set's first row and is zeroed below
        x = self.data._read(np.concatenate([np.where(pad, t[:, :1], t).ravel(), np.where(pad, ci[:, :1], ci).ravel()]),
                            out=out.get("x"))
        x = torch.from_numpy(x).view(2, B, S, -1)
        if pad.any():
            x[:, torch.from_numpy(pad)] = 0
        extra = {}
        if self.data.G is not None:  # gene-space targets of the same target cells (gene decoder)
            tg = torch.from_numpy(self.data._read(np.where(pad, t[:, :1], t).ravel(), genes=True,
                                                  out=out.get("g"))).view(B, S, -1)
            if pad.any():
                tg[torch.from_numpy(pad)] = 0
            extra["tgt_genes"] = tg
        small = dict(pert=self.g[g, 3], context=self.g[g, 2], batch=np.where(pad, 0, self.seg_batch[ts]),
                     lens=lens.astype(np.int64), valid=v, tgt_idx=t, ctrl_idx=ci)
        for k, a in small.items():
            if k in out:
                np.copyto(out[k], a)
        return dict(ctrl=x[1], tgt=x[0], **extra,
                    **{k: torch.from_numpy(out[k] if k in out else np.ascontiguousarray(a)) for k, a in small.items()})

    def next(self):
        """Next training batch; rolls over to the next epoch (reshuffled with seed+epoch) forever."""
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        b = self.batch(self.epoch, self.step)
        self.step += 1
        return b

    __next__ = next

    def __iter__(self):
        """train: the rest of the current epoch (advancing the state); eval: one full fixed pass."""
        if not self.train:
            for s in range(self.steps_per_epoch):
                yield self.batch(0, s)
            return
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        while self.step < self.steps_per_epoch:
            yield self.next()

    def state_dict(self):
        return dict(epoch=self.epoch, step=self.step, seed=self.seed, set_size=self.S, batch_size=self.B,
                    steps_per_epoch=self.steps_per_epoch)

    def load_state_dict(self, sd):
        for k in ("seed", "set_size", "batch_size", "steps_per_epoch"):
            if sd[k] != self.state_dict()[k]:
                raise UserError(f"sampler state has {k}={sd[k]} but this sampler has {self.state_dict()[k]}")
        self.epoch, self.step = int(sd["epoch"]), int(sd["step"])


class CellSampler:
    """Single cells (not sets) from one or more prepared folders, for SE pre-training. Each folder keeps
    its first `val` cells of a seeded permutation out (val_rows); an epoch is a seeded permutation
    (permute) of all the other cells of all folders, cut into batches of B (a last partial batch is
    dropped). Folders may measure different genes: `to_vocab[f]` maps folder f's rows (n, G_f) into one
    (n, V) vocabulary. batch(epoch, step) -> x (B, V) float32, folder (B,), row (B,) the row in its
    folder. Nothing per cell is stored; used through StepSampler like SetSampler (S = 1: a
    "set" is one cell), so the same global cursor, world-size independence and loader processes apply."""

    def __init__(self, datas, to_vocab, V, batch_size, seed=0, val=256):
        self.datas, self.to_vocab, self.V, self.B, self.S, self.seed = datas, to_vocab, int(V), int(batch_size), 1, seed
        self.n = np.array([d.n_cells for d in datas], np.int64)
        self.nv = np.minimum(int(val), self.n // 10)  # held-out cells per folder
        self.key = hkey(seed, np.arange(len(datas)), 99)  # each folder's fixed permutation
        self.cum = np.concatenate([[0], np.cumsum(self.n - self.nv)])  # training positions per folder
        if self.cum[-1] < self.B:
            raise UserError(f"only {int(self.cum[-1])} training cells for a batch of {self.B}")
        self.steps_per_epoch = int(self.cum[-1] // self.B)

    def val_rows(self, f):
        """Folder f's held-out rows (sorted)."""
        return np.sort(permute(np.arange(self.nv[f]), self.n[f], self.key[f]))

    def indices(self, epoch, step):
        """(folder (B,), row (B,)) of the batch at (epoch, step): a pure function of (seed, epoch, step)."""
        g = permute(step * self.B + np.arange(self.B), self.cum[-1], hkey(self.seed, epoch, -1))
        f = np.searchsorted(self.cum, g, "right") - 1
        return f, permute(self.nv[f] + g - self.cum[f], self.n[f], self.key[f])

    def buffers(self):
        return dict(x=np.empty((self.B, self.V), np.float32), folder=np.empty(self.B, np.int64),
                    row=np.empty(self.B, np.int64))

    def from_buffers(self, buf):
        return {k: torch.from_numpy(v) for k, v in buf.items()}

    def batch(self, epoch, step, out=None):
        f, r = self.indices(epoch, step)
        out = out or self.buffers()
        for k in np.unique(f):
            m = f == k
            out["x"][m] = self.to_vocab[k](self.datas[k].rows(r[m]))
        out["folder"][:], out["row"][:] = f, r
        return self.from_buffers(out)


# -----------------------------------------------------------------------------
# this rank's micro-batches of each optimizer step, built by loader processes

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
