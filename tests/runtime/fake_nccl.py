"""One recording fake of libnccl for the CPU tests of the NCCL wrapper, the rank bootstrap and
the torchrun job: it answers the calls the wrapper makes (unique id, communicator init, error
strings) and records every call as (name, its arguments as given)."""
from __future__ import annotations

import ctypes

UID = bytes(range(1, 40)) + b"\0\0" + bytes(range(41, 128))   # NULs inside: all 128 travel


class FakeNccl:
    """`fail` names a call that returns ncclInvalidArgument (4); `uid` is what
    ncclGetUniqueId hands out. A communicator's handle is 0x100 + rank (ncclCommInitRank) or
    0x1000 + device (ncclCommInitAll)."""

    def __init__(self, fail: str | None = None, uid: bytes = UID):
        self.calls: list = []
        self.fail, self.uid, self.init = fail, uid, None

    def __getattr__(self, name):
        if not name.startswith("nccl"):
            raise AttributeError(name)

        def fn(*args):
            self.calls.append((name, args))
            if name == "ncclGetUniqueId":
                ctypes.memmove(ctypes.addressof(args[0]._obj), self.uid, len(self.uid))
            if name == "ncclCommInitRank":
                args[0]._obj.value = 0x100 + int(args[3])
                self.init = (bytes(args[2]), int(args[1]), int(args[3]))
            if name == "ncclCommInitAll":
                comms, n, devs = args
                for i in range(n):
                    comms[i] = 0x1000 + devs[i]
            if name == "ncclGetErrorString":
                return b"invalid argument (fake)"
            return 4 if name == self.fail else 0
        return fn

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def plain(self) -> list[tuple]:
        """The calls with plain values: ctypes arguments by value; ncclCommInitRank as
        (unique id bytes, nranks, rank)."""
        out = []
        for name, args in self.calls:
            if name == "ncclCommInitRank":
                args = (bytes(args[2]), args[1], args[3])
            out.append((name, [getattr(a, "value", a) for a in args]))
        return out
