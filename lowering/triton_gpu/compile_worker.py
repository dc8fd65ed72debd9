"""A kernel-compile worker: `python -m graphir.lowering.triton_gpu.compile_worker ARCH`.

Reads jobs (tuning_gpu._job tuples) from stdin and writes each one's CompiledCubin, or the error
it raised, to stdout; each message is a 4-byte big-endian length and a pickle. Started as a
plain subprocess, not by multiprocessing, so it never imports the parent's __main__: a user's
script that compiles without an `if __name__ == "__main__":` guard is not run again in it.
Anything printed while compiling goes to stderr, since stdout carries the results.
"""
from __future__ import annotations

import os
import pickle
import struct
import sys


def send(stream, obj) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def recv(stream):
    """The next message, or EOFError when the stream ends."""
    head = stream.read(4)
    if len(head) < 4:
        raise EOFError
    (n,) = struct.unpack(">I", head)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)


def main(argv: list[str]) -> int:
    from graphir.lowering.triton_gpu.tuning_gpu import _compile_job

    arch = int(argv[0])
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)                      # stray prints from compilers go to stderr
    sys.stdout = sys.stderr
    stdin = sys.stdin.buffer
    while True:
        try:
            job = recv(stdin)
        except EOFError:
            return 0
        try:
            res = _compile_job(job, arch)
        except Exception as e:  # noqa: BLE001  (sent back as the job's result)
            res = RuntimeError(f"{type(e).__name__}: {e}")
        send(out, res)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
