"""One process per device, launched like a deployment: torchrun's environment, the launcher's
store, collectives between processes, and clear errors when a process dies.

A launcher (`torchrun --nproc_per_node N script.py`, or one torchrun per host with `--nnodes`)
starts one process per device and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT. `DistributedConfig.from_env()` reads them; `init()` joins the job: it opens the
launcher's TCPStore (the agent's store under torchrun, else one hosted by rank 0) and a gloo
process group over it. Each process then loads its rank's part of a multi-device graph (see
runtime/distributed_split.py and distributed_artifact.py): its steps, its shard of the weights,
its shard of the paged KV cache. On the CPU the collectives go through gloo; on GPUs through an
NCCL communicator whose ncclUniqueId rank 0 creates and shares through the store
(runtime/cuda/nccl.py, runtime/distributed_cuda.py).

Failures: every store wait and gloo collective gives up after `timeout_s` (default 60 s,
GRAPHIR_DIST_TIMEOUT), and a peer that died is seen at the next collective (its sockets close).
Either raises DistributedError naming the rank and the step, and the context refuses later
calls. With NCCL a heartbeat watchdog (runtime/distributed_watchdog.py) aborts the communicators
when a peer stops beating, so no rank waits on a GPU collective forever.

Example (run as `torchrun --nproc_per_node 2 serve.py`):
    >>> from graphir.runtime import InferenceSession
    >>> from graphir.runtime.distributed import DistributedConfig
    >>> session = InferenceSession(distributed=DistributedConfig.from_env())   # doctest: +SKIP
    >>> model = session.load("tp.gdist", weights="model.safetensors")        # doctest: +SKIP
    >>> outs = model.execute(*model.select_inputs(all_inputs))              # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Callable, Mapping

import numpy as np

ENV_TIMEOUT = "GRAPHIR_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
ROW_WIDTH = 16   # int64 entries of every agreement exchange (gather_rows)


def _tag(kind: str) -> int:
    return int.from_bytes(hashlib.sha256(kind.encode()).digest()[:8], "little", signed=True)


class DistributedError(RuntimeError):
    """A collective or the store failed: a peer died, hung past the timeout, or refused a call."""


def _int_env(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"DistributedConfig.from_env: {name} is not set; start the processes "
                             f"with a launcher (torchrun --nproc_per_node N script.py) or set "
                             f"RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"DistributedConfig.from_env: {name}={raw!r} is not an integer") from None


@dataclass(frozen=True)
class DistributedConfig:
    """Where this process sits in the job and how long it waits for the others.

    Args:
        rank, world_size: this process's rank and the number of processes (one per device).
        local_rank: the rank on this host; picks the GPU (CUDA ordinal) on GPU runs.
        master_addr, master_port: the store (torchrun's MASTER_ADDR / MASTER_PORT).
        timeout_s: how long a store wait or a collective waits for a peer before failing.
        check_calls: before each call with collectives, the ranks agree (one small gloo
            all-gather) that every rank accepted its inputs and that the collectives' sizes
            match; a rank that refused its inputs then fails every rank at once, naming itself,
            instead of leaving the others in a collective until the timeout.
        heartbeat_s: the watchdog's beat period (None: on for NCCL, off for gloo, which sees
            dead peers itself); a peer silent for timeout_s fails the job.
    """

    rank: int
    world_size: int
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    timeout_s: float = DEFAULT_TIMEOUT_S
    check_calls: bool = True
    heartbeat_s: float | None = None

    def __post_init__(self):
        for name in ("rank", "world_size", "local_rank", "master_port"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"DistributedConfig: {name} must be an int, got {v!r}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"DistributedConfig: rank {self.rank} is not in [0, world_size "
                             f"{self.world_size})")
        if self.local_rank < 0 or not 0 < self.master_port < 65536:
            raise ValueError(f"DistributedConfig: bad local_rank {self.local_rank} or "
                             f"master_port {self.master_port}")
        if not self.timeout_s > 0:
            raise ValueError(f"DistributedConfig: timeout_s must be > 0, got {self.timeout_s!r}")
        if self.heartbeat_s is not None and not 0 < self.heartbeat_s < self.timeout_s:
            raise ValueError(f"DistributedConfig: heartbeat_s must be in (0, timeout_s "
                             f"{self.timeout_s}), got {self.heartbeat_s!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "DistributedConfig":
        """The config of a process a launcher started (torchrun's variables; the timeout from
        GRAPHIR_DIST_TIMEOUT, seconds); keyword arguments override."""
        env = os.environ if environ is None else environ
        raw = env.get(ENV_TIMEOUT)
        try:
            timeout = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ValueError(f"DistributedConfig.from_env: {ENV_TIMEOUT}={raw!r} is not a "
                             f"number of seconds") from None
        cfg = cls(rank=_int_env(env, "RANK"), world_size=_int_env(env, "WORLD_SIZE"),
                  local_rank=_int_env(env, "LOCAL_RANK", 0),
                  master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
                  master_port=_int_env(env, "MASTER_PORT", 29500), timeout_s=timeout)
        return replace(cfg, **overrides) if overrides else cfg


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


class RankContext:
    """This process's membership in the job: the store, the gloo group, numpy collectives.

    Made by `init()`; `close()` leaves the job. After a failed collective the context is
    broken: later collectives raise at once (the peers' state is unknown)."""

    def __init__(self, config: DistributedConfig):
        import torch.distributed as dist

        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        # CPU ranks of one host share its cores: each kernel pool takes its share (its workers
        # spin between jobs, so oversubscribed pools starve the other ranks).
        local = _int_env(os.environ, "LOCAL_WORLD_SIZE", 1)
        os.environ.setdefault("GRAPHIR_NUM_THREADS",
                              str(max(1, len(os.sched_getaffinity(0)) // max(local, 1))))
        self.config = config
        self.rank, self.world_size = config.rank, config.world_size
        self.timeout = timedelta(seconds=config.timeout_s)
        self.failed: str | None = None
        self.calls = 0
        self._aborts: list[Callable[[], None]] = []
        self._watchdog = None
        self._dist = dist
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        try:
            url = (f"tcp://{config.master_addr}:{config.master_port}?rank={config.rank}"
                   f"&world_size={config.world_size}")
            if dist.is_initialized():  # the application joined already: share its store
                base = dist.distributed_c10d._get_default_store()
            else:
                base, _, _ = next(dist.rendezvous(url, timeout=self.timeout))
            self.store = dist.PrefixStore(f"graphir/attempt_{attempt}", base)
            self.store.set_timeout(self.timeout)
            if dist.is_initialized():  # the application has its own default group: add ours
                self.group = dist.new_group(backend="gloo", timeout=self.timeout)
                self._owns_default = False
            else:
                dist.init_process_group("gloo", store=dist.PrefixStore("pg", self.store),
                                        rank=config.rank, world_size=config.world_size,
                                        timeout=self.timeout)
                self.group, self._owns_default = None, True
        except (RuntimeError, ValueError, OSError) as e:  # DistStoreError/DistNetworkError too
            raise DistributedError(
                f"graphir.distributed: rank {config.rank} of {config.world_size} could not join "
                f"the job at {config.master_addr}:{config.master_port} within "
                f"{config.timeout_s:g} s ({_first_line(e)})") from e

    # -- failures ---------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self.failed is not None:
            raise DistributedError(f"graphir.distributed: rank {self.rank} cannot continue: an "
                                   f"earlier failure broke the job ({self.failed})")

    def fail(self, message: str) -> None:
        """Mark the job broken (first message wins) and abort what registered an abort."""
        if self.failed is None:
            self.failed = message
            print(f"[graphir rank {self.rank}] {message}", file=sys.stderr, flush=True)
        for abort in list(self._aborts):
            try:
                abort()
            except Exception as e:  # noqa: BLE001  (an abort that fails must not hide the cause)
                print(f"[graphir rank {self.rank}] abort failed: {_first_line(e)}",
                      file=sys.stderr, flush=True)

    def on_abort(self, fn: Callable[[], None]) -> None:
        """Call `fn` (e.g. ncclCommAbort) when the job is found broken."""
        self._aborts.append(fn)

    def _run(self, what: str, fn):
        self._check_usable()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001  (gloo raises RuntimeError / DistBackendError)
            msg = (f"graphir.distributed: {what} failed on rank {self.rank} of "
                   f"{self.world_size}: a peer process died or did not answer within "
                   f"{self.config.timeout_s:g} s ({_first_line(e)})")
            self.fail(msg)
            raise DistributedError(msg) from e

    # -- numpy collectives (CPU rank graphs) -----------------------------------------------
    def all_reduce(self, x: np.ndarray, what: str = "allreduce") -> np.ndarray:
        """The sum over ranks of `x` (floats summed in float64, ints in int64)."""
        import torch

        wire = np.ascontiguousarray(x, np.float64 if x.dtype.kind == "f" else np.int64).copy()
        t = torch.from_numpy(wire)
        self._run(what, lambda: self._dist.all_reduce(t, group=self.group))
        return wire.astype(x.dtype, copy=False) if x.dtype.kind != "f" else wire

    def all_gather(self, x: np.ndarray, axis: int = 0, what: str = "allgather") -> np.ndarray:
        """The ranks' `x` (equal shapes) concatenated along `axis` in rank order."""
        import torch

        wire = np.ascontiguousarray(x, np.float64 if x.dtype.kind == "f" else np.int64)
        t = torch.from_numpy(wire)
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        self._run(what, lambda: self._dist.all_gather(parts, t, group=self.group))
        out = np.concatenate([p.numpy() for p in parts], axis=axis % max(x.ndim, 1))
        return out if x.dtype.kind == "f" else out.astype(x.dtype)

    def gather_rows(self, row, what: str, tag: str = "barrier") -> np.ndarray:
        """[world_size, len(row)] int64: every rank's `row` (at most ROW_WIDTH - 1 entries).

        Every such exchange has one width and carries `tag` (what kind of step the rank is at):
        ranks at different steps get a DistributedError naming both, where gloo, given
        exchanges of different sizes, would abort the process."""
        row = np.asarray(row, np.int64).reshape(-1)
        if row.size >= ROW_WIDTH:
            raise ValueError(f"gather_rows: at most {ROW_WIDTH - 1} entries, got {row.size}")
        full = np.zeros(ROW_WIDTH, np.int64)
        full[0], full[1:1 + row.size] = _tag(tag), row
        rows = self.all_gather(full[None, :], 0, what)
        odd = [r for r in range(self.world_size) if rows[r, 0] != full[0]]
        if odd:
            raise DistributedError(f"graphir.distributed: rank {self.rank} is at {what!r} "
                                   f"({tag}) but rank(s) {odd} are at another step; every rank "
                                   f"must make the same calls in the same order")
        return rows[:, 1:1 + row.size]

    def barrier(self, what: str = "barrier") -> None:
        self.gather_rows([], what, "barrier")

    # -- the store ------------------------------------------------------------------------
    def publish(self, key: str, data: bytes | str) -> None:
        self._run(f"store set {key!r}", lambda: self.store.set(key, data))

    def fetch(self, key: str) -> bytes:
        """The value some rank published under `key` (waits up to the timeout)."""
        return self._run(f"store get {key!r}", lambda: self.store.get(key))

    def share(self, key: str, make: Callable[[], bytes], root: int = 0) -> bytes:
        """`make()` on rank `root`, published through the store; every rank gets the bytes."""
        if self.rank == root:
            data = make()
            self.publish(key, data)
            return data
        return self.fetch(key)

    def subgroup(self, size: int) -> "RankContext | None":
        """Ranks [0, size) as a job of their own (a TP degree below the world size, say).
        Every rank must call it, in the same order; ranks outside get None."""
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= self.world_size:
            raise ValueError(f"subgroup: size must be an int in [1, {self.world_size}], "
                             f"got {size!r}")
        if size == self.world_size:
            return self
        group = self._run(f"new_group of ranks 0..{size - 1}", lambda: self._dist.new_group(
            ranks=list(range(size)), backend="gloo", timeout=self.timeout))
        if self.rank >= size:
            return None
        sub = object.__new__(RankContext)
        sub.__dict__.update(self.__dict__)   # shares the aborts registered so far
        sub.config = replace(self.config, world_size=size)
        sub.world_size, sub.group, sub._owns_default, sub._watchdog = size, group, False, None
        sub.store = self._dist.PrefixStore(f"sub{size}", self.store)
        return sub

    # -- lifetime -------------------------------------------------------------------------
    def start_watchdog(self, period_s: float | None = None) -> None:
        """Heartbeats through the store; a peer silent for timeout_s fails the job."""
        from .distributed_watchdog import Watchdog

        if self._watchdog is None:
            period = period_s or self.config.heartbeat_s or min(5.0, self.config.timeout_s / 6)
            self._watchdog = Watchdog(self, self.store.clone(), period)
            self._watchdog.start()

    def close(self) -> None:
        """Leave the job (peers' watchdogs then stop expecting this rank's beats)."""
        global _current
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        if self._owns_default and self._dist.is_initialized():
            self._dist.destroy_process_group()
            self._owns_default = False
        if _current is self:
            _current = None

    def __repr__(self) -> str:
        return f"RankContext(rank={self.rank}, world_size={self.world_size})"


_current: RankContext | None = None


def init(config: DistributedConfig | None = None) -> RankContext:
    """Join the job (once per process; later calls return the same context).

    Example:
        >>> ctx = init(DistributedConfig.from_env(timeout_s=30))   # doctest: +SKIP
    """
    global _current
    config = config or DistributedConfig.from_env()
    if _current is not None:
        if (_current.rank, _current.world_size) != (config.rank, config.world_size):
            raise ValueError(f"graphir.distributed.init: this process already joined as rank "
                             f"{_current.rank} of {_current.world_size}")
        return _current
    _current = RankContext(config)
    return _current


def current() -> RankContext | None:
    """The context init() made in this process, if any."""
    return _current
