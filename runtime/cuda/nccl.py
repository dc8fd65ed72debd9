"""NCCL over ctypes: one process driving several GPUs of one host (ncclCommInitAll), or one
process per GPU (`RankCommunicator`: ncclCommInitRank from an ncclUniqueId rank 0 makes and
shares through the launcher's store, see `RankCommunicator.bootstrap`).

The library is found without importing torch: `GRAPHIR_LIBNCCL` (a path), then the files of an
installed `nvidia-nccl-*` wheel (what torch's CUDA builds ship), then `ctypes.util.find_library`
and the loader's own search for `libnccl.so.2`. A missing library raises `NcclUnavailableError`
listing every place tried; a failed call raises `NcclError` naming the call and NCCL's message.

One `Communicator` holds a communicator per device. Every collective is issued as one NCCL group
(ncclGroupStart, one call per device on that device's stream, ncclGroupEnd), which is how a
single thread drives several ranks without deadlocking. The calls are asynchronous: each
device's stream orders them after the work that produced the inputs.

NVLink multicast (NVLS) is turned off by default (`NCCL_NVLS_ENABLE=0` unless already set): it
brings nothing at these sizes, and on shared hosts a failure there can take the GPUs out.
"""
from __future__ import annotations

import ctypes
import os
import threading
from ctypes import POINTER, c_char_p, c_int, c_size_t, c_void_p
from typing import Any, Sequence

from . import libsearch

LIBNCCL_ENV = "GRAPHIR_LIBNCCL"

# ncclDataType_t (nccl.h). float8 is carried as bytes: only gathers and broadcasts take it.
DTYPES = {"int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5,
          "float16": 6, "float32": 7, "float64": 8, "bfloat16": 9}
# ncclRedOp_t
REDUCE_OPS = {"sum": 0, "prod": 1, "max": 2, "min": 3, "avg": 4}
# ncclResult_t
RESULTS = {0: "ncclSuccess", 1: "ncclUnhandledCudaError", 2: "ncclSystemError",
           3: "ncclInternalError", 4: "ncclInvalidArgument", 5: "ncclInvalidUsage",
           6: "ncclRemoteError", 7: "ncclInProgress"}
_BYTES = {"int8": 1, "uint8": 1, "int32": 4, "uint32": 4, "int64": 8, "uint64": 8,
          "float16": 2, "float32": 4, "float64": 8, "bfloat16": 2, "float8_e4m3fn": 1,
          "bool": 1}

UNIQUE_ID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES


class UniqueId(ctypes.Structure):
    """ncclUniqueId: the opaque 128 bytes every rank of a communicator is created from."""

    _fields_ = [("internal", ctypes.c_char * UNIQUE_ID_BYTES)]


_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "ncclGetVersion": (c_int, [POINTER(c_int)]),
    "ncclGetErrorString": (c_char_p, [c_int]),
    "ncclCommInitAll": (c_int, [POINTER(c_void_p), c_int, POINTER(c_int)]),
    "ncclGetUniqueId": (c_int, [POINTER(UniqueId)]),
    "ncclCommInitRank": (c_int, [POINTER(c_void_p), c_int, UniqueId, c_int]),
    "ncclCommAbort": (c_int, [c_void_p]),
    "ncclCommGetAsyncError": (c_int, [c_void_p, POINTER(c_int)]),
    "ncclCommDestroy": (c_int, [c_void_p]),
    "ncclGroupStart": (c_int, []),
    "ncclGroupEnd": (c_int, []),
    "ncclAllReduce": (c_int, [c_void_p, c_void_p, c_size_t, c_int, c_int, c_void_p, c_void_p]),
    "ncclAllGather": (c_int, [c_void_p, c_void_p, c_size_t, c_int, c_void_p, c_void_p]),
    "ncclBroadcast": (c_int, [c_void_p, c_void_p, c_size_t, c_int, c_int, c_void_p, c_void_p]),
}
_OPTIONAL = {"ncclGetLastError": (c_char_p, [c_void_p])}  # NCCL >= 2.13


class NcclUnavailableError(RuntimeError):
    """libnccl could not be found or loaded (the message lists the places tried)."""


class NcclError(RuntimeError):
    """An NCCL call failed; `call`, `code` and `name` say which and how."""

    def __init__(self, call: str, code: int, detail: str = ""):
        self.call, self.code, self.name = call, int(code), RESULTS.get(int(code), f"ncclResult {code}")
        super().__init__(f"{call} failed: {self.name} ({self.code})" + (f": {detail}" if detail else ""))


def candidates() -> list[str]:
    """Library paths and names to try, in order (see the module docstring)."""
    return libsearch.candidates(LIBNCCL_ENV, "nvidia-nccl", "libnccl.so",
                                ("nvidia/*/lib/libnccl.so*", "nvidia/*/*/lib/libnccl.so*"),
                                "nccl", ("libnccl.so.2",))


_lock = threading.Lock()
_lib: Any = None
_error: str | None = None


def load() -> Any:
    """The loaded libnccl with prototypes set (cached); raises NcclUnavailableError."""
    global _lib, _error
    with _lock:
        if _lib is not None:
            return _lib
        if _error is not None:
            raise NcclUnavailableError(_error)
        _lib, tried = libsearch.open_first(candidates(), bind)
        if _lib is not None:
            return _lib
        _error = ("cannot load NCCL (libnccl.so.2), needed for collectives (allreduce, "
                  "allgather) over several GPUs; install the nvidia-nccl wheel or set "
                  f"{LIBNCCL_ENV}. Tried: " + "; ".join(tried))
        raise NcclUnavailableError(_error)


def bind(lib: Any) -> Any:
    """Set restype/argtypes of the entry points on a ctypes library (missing ones raise)."""
    return libsearch.bind(lib, _PROTOTYPES, _OPTIONAL)


def is_available() -> bool:
    """True when libnccl loads. Never raises."""
    try:
        load()
        return True
    except NcclUnavailableError:
        return False


def version(lib: Any = None) -> int:
    """NCCL's version code (e.g. 22703 for 2.27.3)."""
    lib = lib or load()
    v = c_int()
    _check(lib, "ncclGetVersion", lib.ncclGetVersion(ctypes.byref(v)))
    return v.value


def nccl_dtype(dtype: Any, *, reduce: bool) -> tuple[int, int]:
    """(ncclDataType_t, element bytes) for a dtype name / graphir DType / numpy dtype.

    Reductions need an arithmetic NCCL type (bf16, f16, f32, ints); data movement takes any
    dtype as bytes."""
    name = dtype if isinstance(dtype, str) else getattr(dtype, "name", None) or str(dtype)
    if name not in _BYTES:
        raise ValueError(f"NCCL: unsupported dtype {dtype!r}; expected one of {sorted(_BYTES)}")
    if name in DTYPES:
        return DTYPES[name], _BYTES[name]
    if reduce:
        raise ValueError(f"NCCL cannot reduce {name} tensors; supported: {sorted(DTYPES)}")
    return DTYPES["uint8"], 1


def _check(lib: Any, call: str, rc: int, comm: Any = None) -> None:
    if rc == 0:
        return
    detail = ""
    try:
        if comm is not None and getattr(lib, "ncclGetLastError", None) is not None:
            detail = (lib.ncclGetLastError(comm) or b"").decode(errors="replace")
        if not detail:
            detail = (lib.ncclGetErrorString(int(rc)) or b"").decode(errors="replace")
    except (AttributeError, TypeError, ctypes.ArgumentError):
        pass
    raise NcclError(call, rc, detail)


def _ptr(p: Any) -> int:
    return int(getattr(p, "ptr", p) or 0)


class Communicator:
    """Communicators for `devices` (CUDA ordinals, distinct) driven from this one thread.

    Each collective takes one entry per rank, in the order of `devices`.

    Example:
        >>> comm = Communicator([0, 1])                                        # doctest: +SKIP
        >>> comm.all_reduce([(a0, a0, s0), (a1, a1, s1)], n, "bfloat16")       # doctest: +SKIP
    """

    def __init__(self, devices: Sequence[int], lib: Any = None):
        devices = [int(d) for d in devices]
        if not devices:
            raise ValueError("Communicator needs at least one device")
        if len(set(devices)) != len(devices) or min(devices) < 0:
            raise ValueError(f"Communicator devices must be distinct CUDA ordinals, got {devices}")
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        self.lib = lib if lib is not None else load()
        self.devices = devices
        n = len(devices)
        comms = (c_void_p * n)()
        _check(self.lib, "ncclCommInitAll",
               self.lib.ncclCommInitAll(comms, n, (c_int * n)(*devices)))
        self._comms = [c_void_p(c) for c in comms]

    @property
    def size(self) -> int:
        return len(self.devices)

    def _parts(self, parts: Sequence, what: str) -> list:
        if self._comms is None:
            raise ValueError(f"{what}: the communicator was destroyed")
        if len(parts) != self.size:
            raise ValueError(f"{what}: expected one (send, recv, stream) entry per device "
                             f"({self.size}: {self.devices}), got {len(parts)}")
        return [(_ptr(s), _ptr(r), _stream(st)) for s, r, st in parts]

    def _group(self, what: str, calls: list) -> None:
        lib = self.lib
        _check(lib, "ncclGroupStart", lib.ncclGroupStart())
        err = None
        for name, args, comm in calls:
            rc = getattr(lib, name)(*args)
            if rc != 0 and err is None:
                err = (name, rc, comm)
        # The group is closed even after a failed call so later NCCL use is not wedged.
        rc_end = lib.ncclGroupEnd()
        if err is not None:
            _check(lib, f"{err[0]} ({what})", err[1], err[2])
        _check(lib, f"ncclGroupEnd ({what})", rc_end)

    def all_reduce(self, parts: Sequence, count: int, dtype: Any, op: str = "sum") -> None:
        """recv_i = op over ranks of send (`count` elements each); parts: (send, recv, stream)."""
        if op not in REDUCE_OPS:
            raise ValueError(f"all_reduce: unknown op {op!r}; expected one of {sorted(REDUCE_OPS)}")
        count = _count(count, "all_reduce")
        dt, _ = nccl_dtype(dtype, reduce=True)
        ps = self._parts(parts, "all_reduce")
        self._group("all_reduce", [("ncclAllReduce", (c_void_p(s), c_void_p(r), count, dt,
                                                      REDUCE_OPS[op], c, c_void_p(st)), c)
                                   for (s, r, st), c in zip(ps, self._comms)])

    def all_gather(self, parts: Sequence, count: int, dtype: Any) -> None:
        """recv_i = the ranks' sends (`count` elements each) concatenated in rank order."""
        count = _count(count, "all_gather")
        dt, size = nccl_dtype(dtype, reduce=False)
        ps = self._parts(parts, "all_gather")
        n = count * (_BYTES[_name(dtype)] // size)
        self._group("all_gather", [("ncclAllGather", (c_void_p(s), c_void_p(r), n, dt, c,
                                                      c_void_p(st)), c)
                                   for (s, r, st), c in zip(ps, self._comms)])

    def gather_varying(self, parts: Sequence, counts: Sequence[int], dtype: Any) -> None:
        """Like all_gather with per-rank element counts: one broadcast per root, grouped."""
        if len(counts) != self.size:
            raise ValueError(f"gather_varying: expected {self.size} counts, got {len(counts)}")
        counts = [_count(c, "gather_varying") for c in counts]
        dt, size = nccl_dtype(dtype, reduce=False)
        scale = _BYTES[_name(dtype)] // size
        ps = self._parts(parts, "gather_varying")
        calls, off = [], 0
        for root, cnt in enumerate(counts):
            if cnt:
                for rank, ((s, r, st), c) in enumerate(zip(ps, self._comms)):
                    dst = r + off * _BYTES[_name(dtype)]
                    # Only the root's send buffer is read; the others receive in place.
                    src = s if rank == root else dst
                    calls.append(("ncclBroadcast", (c_void_p(src), c_void_p(dst), cnt * scale,
                                                    dt, root, c, c_void_p(st)), c))
            off += cnt
        if calls:
            self._group("gather_varying", calls)

    def destroy(self) -> None:
        """Free the communicators (after the streams finished their collectives)."""
        if self._comms is not None:
            for c in self._comms:
                self.lib.ncclCommDestroy(c)
            self._comms = None

    def __repr__(self) -> str:
        return f"Communicator(devices={self.devices})"


def _name(dtype: Any) -> str:
    return dtype if isinstance(dtype, str) else getattr(dtype, "name", None) or str(dtype)


def _count(n: Any, what: str) -> int:
    if isinstance(n, bool) or int(n) != n or int(n) < 0:
        raise ValueError(f"{what}: element count must be a non-negative int, got {n!r}")
    return int(n)


def _stream(s: Any) -> int:
    h = getattr(s, "handle", s)
    return int(h or 0)


# ---- one process per GPU --------------------------------------------------------------------
def unique_id(lib: Any = None) -> bytes:
    """A fresh ncclUniqueId (rank 0 makes it; every rank of the communicator needs it)."""
    lib = lib if lib is not None else load()
    uid = UniqueId()
    _check(lib, "ncclGetUniqueId", lib.ncclGetUniqueId(ctypes.byref(uid)))
    return bytes(uid)  # all 128 bytes (`uid.internal` would stop at the first NUL)


class RankCommunicator:
    """This process's rank of an NCCL communicator over `nranks` processes (one GPU each).

    Collectives take device pointers and the CUDA stream to order them on; like every NCCL
    call they are asynchronous. Make one with `bootstrap` (the unique id through a store).

    Example:
        >>> comm = RankCommunicator.bootstrap(store, nranks=2, rank=r, device=r)  # doctest: +SKIP
        >>> comm.all_reduce(src_ptr, dst_ptr, n, "bfloat16", stream)              # doctest: +SKIP
    """

    def __init__(self, uid: bytes, nranks: int, rank: int, *, device: int | None = None,
                 lib: Any = None):
        if not isinstance(uid, (bytes, bytearray)) or len(uid) != UNIQUE_ID_BYTES:
            raise ValueError(f"RankCommunicator: the unique id must be {UNIQUE_ID_BYTES} bytes "
                             f"(ncclGetUniqueId's), got {len(uid) if hasattr(uid, '__len__') else uid!r}")
        if isinstance(nranks, bool) or int(nranks) < 1 or not 0 <= int(rank) < int(nranks):
            raise ValueError(f"RankCommunicator: rank {rank!r} is not in [0, nranks {nranks!r})")
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        self.lib = lib if lib is not None else load()
        self.nranks, self.rank, self.device = int(nranks), int(rank), device
        if device is not None:  # NCCL takes the GPU of the calling thread's current context
            from graphir.runtime.cuda import driver

            driver.ensure_context(int(device))
        comm = c_void_p()
        _check(self.lib, "ncclCommInitRank",
               self.lib.ncclCommInitRank(ctypes.byref(comm), self.nranks,
                                         UniqueId.from_buffer_copy(bytes(uid)), self.rank))
        self._comm: c_void_p | None = comm

    @classmethod
    def bootstrap(cls, store: Any, nranks: int, rank: int, *, device: int | None = None,
                  key: str = "graphir/nccl/0", lib: Any = None) -> "RankCommunicator":
        """Rank 0 makes the unique id and sets it under `key` in `store` (torch.distributed's
        TCPStore, or anything with set(key, bytes) / get(key) -> bytes, get waiting for the
        key); the other ranks read it; all call ncclCommInitRank."""
        lib = lib if lib is not None else load()
        if rank == 0:
            uid = unique_id(lib)
            store.set(key, uid)
        else:
            uid = bytes(store.get(key))
        return cls(uid, nranks, rank, device=device, lib=lib)

    def _live(self, what: str) -> c_void_p:
        if self._comm is None:
            raise ValueError(f"{what}: the communicator was destroyed or aborted")
        return self._comm

    def all_reduce(self, send: Any, recv: Any, count: int, dtype: Any, stream: Any,
                   op: str = "sum") -> None:
        """recv = op over the ranks of send (`count` elements)."""
        if op not in REDUCE_OPS:
            raise ValueError(f"all_reduce: unknown op {op!r}; expected one of {sorted(REDUCE_OPS)}")
        dt, _ = nccl_dtype(dtype, reduce=True)
        comm = self._live("all_reduce")
        _check(self.lib, "ncclAllReduce",
               self.lib.ncclAllReduce(c_void_p(_ptr(send)), c_void_p(_ptr(recv)),
                                      _count(count, "all_reduce"), dt, REDUCE_OPS[op], comm,
                                      c_void_p(_stream(stream))), comm)

    def all_gather(self, send: Any, recv: Any, count: int, dtype: Any, stream: Any) -> None:
        """recv = the ranks' sends (`count` elements each) in rank order."""
        dt, size = nccl_dtype(dtype, reduce=False)
        n = _count(count, "all_gather") * (_BYTES[_name(dtype)] // size)
        comm = self._live("all_gather")
        _check(self.lib, "ncclAllGather",
               self.lib.ncclAllGather(c_void_p(_ptr(send)), c_void_p(_ptr(recv)), n, dt, comm,
                                      c_void_p(_stream(stream))), comm)

    def async_error(self) -> int:
        """ncclCommGetAsyncError's code (0: none; 7: still in progress)."""
        code = c_int(0)
        _check(self.lib, "ncclCommGetAsyncError",
               self.lib.ncclCommGetAsyncError(self._live("async_error"), ctypes.byref(code)))
        return code.value

    def abort(self) -> None:
        """Abort (a peer died): pending collectives return and the communicator is freed."""
        comm, self._comm = self._comm, None
        if comm is not None:
            self.lib.ncclCommAbort(comm)

    def destroy(self) -> None:
        comm, self._comm = self._comm, None
        if comm is not None:
            self.lib.ncclCommDestroy(comm)

    def __repr__(self) -> str:
        return f"RankCommunicator(rank={self.rank}, nranks={self.nranks}, device={self.device})"
