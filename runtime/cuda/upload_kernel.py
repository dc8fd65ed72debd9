"""The staged upload by the artifact's upload kernel, where a slot graph captures it.

lowering/triton_gpu/kernels/upload.py has the kernel and what it saves against the copy node
(device time between queued steps). This side decides per capture whether it can run: the
artifact has it (artifacts built before it did not), GRAPHIR_UPLOAD_KERNEL is not "0" (the
copy node, for A/B measurements), the slot has a device address, both addresses are 4-byte
aligned, and the bytes fit the slot and the destination (so the kernel cannot read or write
outside them). Otherwise the caller queues the copy as before.
"""
from __future__ import annotations

import os

UPLOAD_KEY = "upload_staged"
# The kernel's parameters (before Triton's two scratch pointers): the contract the launcher
# and the artifact check (runtime/cuda/launch_check.py) hold it to.
PARAMS = (("src", "*i8"), ("dst", "*i8"), ("nbytes", "i32"))


def enabled() -> bool:
    """GRAPHIR_UPLOAD_KERNEL=0 keeps the copy node (read at each capture)."""
    return os.environ.get("GRAPHIR_UPLOAD_KERNEL", "1") != "0"


def programs(nbytes: int, words: int) -> int:
    """The kernel's grid: one program a block of `words` 4-byte words, at least one (program
    0 also copies the bytes past the last whole word)."""
    return max(1, -(-(nbytes // 4) // words))


class StagedUpload:
    """`upload(src, src_nbytes, dst, dst_nbytes, nbytes, stream)` launches the kernel and
    returns True, or returns False where it cannot run (see the module docstring).
    `kernels` is the device's kernel table (`UPLOAD_KEY in kernels` says the artifact has
    one, `kernels.metadata(key)` is its manifest entry); `src` a device address of the
    pinned slot."""

    __slots__ = ("_kernels", "_kernel", "_words", "launches")

    def __init__(self, kernels):
        self._kernels, self._kernel, self._words = kernels, None, 0
        self.launches = 0  # captured uploads (once per slot graph, not per call)

    def available(self) -> bool:
        return enabled() and UPLOAD_KEY in self._kernels

    def load(self) -> None:
        """Load the kernel where it may run: before a capture begins, since loading a module
        is not work a stream capture may see."""
        if self._kernel is None and self.available():
            self._words = int(self._kernels.metadata(UPLOAD_KEY)["constexprs"]["WORDS"])
            self._kernel = self._kernels[UPLOAD_KEY]

    def __call__(self, src: int, src_nbytes: int, dst: int, dst_nbytes: int, nbytes: int,
                 stream: int) -> bool:
        if not nbytes or not src or not self.available() or (src | dst) & 3:
            return False
        if nbytes > src_nbytes or nbytes > dst_nbytes or nbytes >= 2 ** 31:
            raise ValueError(f"staged upload of {nbytes} bytes from a {src_nbytes}-byte slot "
                             f"to a {dst_nbytes}-byte area")
        self.load()
        self._kernel.launch((programs(nbytes, self._words),), src, dst, nbytes, stream=stream)
        self.launches += 1
        return True
