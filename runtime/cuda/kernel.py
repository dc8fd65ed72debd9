"""`Kernel`: a loaded function plus its `LaunchSpec`, launched like Triton's own launcher."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from graphir.runtime.cuda import driver
from graphir.runtime.cuda.memory import DeviceBuffer
from graphir.runtime.cuda.module import (DEFAULT_SHARED_LIMIT, Function, LaunchSpec, Module,
                                         PackedParams, PdlLaunch, _grid3, launch)


class Kernel:
    """A launchable kernel: `Kernel.from_cubin(cubin, metadata).launch(grid, *args, stream=s)`.

    Arguments are the kernel's non-constexpr parameters in order (pointers as DeviceBuffer,
    int address, torch tensor or None); the Triton scratch pointers are appended here.

    Example:
        >>> k = Kernel.from_cubin(cubin, artifact_kernel_metadata)        # doctest: +SKIP
        >>> k.launch((triton.cdiv(n, 1024),), x, y, out, n, stream=s)     # doctest: +SKIP
    """

    def __init__(self, function: Function, spec: LaunchSpec):
        self.function, self.spec = function, spec
        max_threads = function.max_threads_per_block
        if spec.block[0] > max_threads:
            raise ValueError(f"{spec.name}: {spec.num_warps} warps = {spec.block[0]} threads "
                             f"exceed the function's limit of {max_threads}")
        if spec.shared > DEFAULT_SHARED_LIMIT:
            function.set_max_dynamic_shared(spec.shared)
        # Scratch buffers only grow; retired ones stay alive because captured graphs may use them.
        self._scratch: dict[str, DeviceBuffer] = {}
        self._retired: list[DeviceBuffer] = []
        names = list(spec.param_names or [f"#{i}" for i in range(len(spec.params))])
        if spec.triton_scratch:
            names += ["global_scratch", "profile_scratch"]
        self._names = [f"{n} of {spec.name}" for n in names]
        # Programmatic dependent launch only for grids of at most one program per SM: a larger
        # grid launched early lands its programs on SMs its predecessor still holds, unevenly
        # (the B64 decode step's paged decode, 256 programs: 240 -> 281 us when launched
        # during rope_split_store; tools/gpu_sweeps/pdl_layer.py), and its launch gap is a
        # small part of its time anyway. 0: never. A kernel that reads before its wait
        # (spec.early_reads: the one-row qkv GEMV behind the step's upload) is launched early
        # whatever its grid where allowed, since streaming its reads early is its point.
        self.pdl_max_programs = 0 if not spec.pdl else (1 << 62) if spec.early_reads else \
            driver.device_attribute(driver.ATTR_MULTIPROCESSOR_COUNT, function.module.device)

    @classmethod
    def from_cubin(cls, cubin: bytes, metadata: Mapping[str, Any] | LaunchSpec,
                   device: int = 0) -> "Kernel":
        """Load `cubin` and bind the function named in `metadata`."""
        spec = metadata if isinstance(metadata, LaunchSpec) else LaunchSpec.from_metadata(metadata)
        module = Module(cubin, device)
        return cls(module.get_function(spec.name), spec)

    @classmethod
    def from_triton(cls, compiled: Any, param_types: Sequence[str] | None = None,
                    device: int = 0) -> "Kernel":
        """From a `triton.compile(...)` result (its `kernel` bytes are the cubin)."""
        spec = LaunchSpec.from_triton(compiled, param_types)
        return cls.from_cubin(bytes(compiled.kernel), spec, device)

    @property
    def name(self) -> str:
        return self.spec.name

    def _scratch_ptr(self, which: str, size: int, align: int, grid_blocks: int) -> int:
        if size <= 0:
            return 0
        need = grid_blocks * self.spec.num_ctas * size + max(align, 1)
        buf = self._scratch.get(which)
        if buf is None or buf.nbytes < need:
            if buf is not None:
                # At least doubling: a prefill growing token by token retires O(log) buffers,
                # which stay alive for the prepared launches and graphs holding their address.
                need = max(need, 2 * buf.nbytes)
                self._retired.append(buf)
            buf = DeviceBuffer.empty(need, "uint8", self.function.module.device)
            self._scratch[which] = buf
        a = max(align, 1)
        return (buf.ptr + a - 1) // a * a

    def pack(self, grid: Sequence[int] | int, args: Sequence[Any]) -> PackedParams:
        """Pack user args plus scratch pointers for `grid` (allocating scratch if needed)."""
        spec = self.spec
        if len(args) != len(spec.params):
            names = f" {list(spec.param_names)}" if spec.param_names else ""
            raise ValueError(f"{spec.name} takes {len(spec.params)} arguments{names} "
                             f"({list(spec.params)}), got {len(args)}")
        full = list(args)
        if spec.global_scratch_size or spec.profile_scratch_size:
            g = _grid3(grid)
            blocks = g[0] * g[1] * g[2]
            full += [self._scratch_ptr("global", spec.global_scratch_size,
                                       spec.global_scratch_align, blocks),
                     self._scratch_ptr("profile", spec.profile_scratch_size,
                                       spec.profile_scratch_align, blocks)]
        elif spec.triton_scratch:
            full += [None, None]
        return PackedParams(spec.all_params, full, self._names)

    def prepare(self, grid: Sequence[int] | int, args: Sequence[Any]) -> "PreparedLaunch":
        """Pack `args` for `grid` once; the result launches them many times (on any stream)
        with no per-launch packing, allocation or checks, so it can run inside a capture."""
        return PreparedLaunch(self, _grid3(grid), self.pack(grid, args))

    def launch(self, grid: Sequence[int] | int, *args: Any, stream: Any = None) -> None:
        """Launch on `stream` (default: the legacy default stream); asynchronous. A kernel
        with early reads is launched the ordinary way here: nothing vouches for its inputs."""
        driver.ensure_context(self.function.module.device)
        g = _grid3(grid)
        launch(self.function, g, self.spec.block, self.pack(g, args), self.spec.shared,
               stream, self.launches_early(g))

    def launches_early(self, grid: tuple[int, int, int], early: bool = False) -> bool:
        """Whether a launch of `grid` (3-D, non-empty) may use programmatic dependent launch;
        for a kernel with early reads only when `early` (its caller vouches for them)."""
        return grid[0] * grid[1] * grid[2] <= self.pdl_max_programs \
            and (early or not self.spec.early_reads)

    def __repr__(self) -> str:
        s = self.spec
        return (f"Kernel({s.name!r}, params={list(s.params)}, num_warps={s.num_warps}, "
                f"shared={s.shared})")


class PreparedLaunch:
    """One kernel launch with its parameters packed: `p(stream_handle)` enqueues it;
    `p(stream_handle, early=True)` lets a kernel with early reads start before its
    predecessor ends (the caller vouches that nothing ahead of it writes them)."""

    __slots__ = ("kernel", "grid", "params", "_args", "_ptr", "_fn", "_pdl", "_early")

    def __init__(self, kernel: Kernel, grid: tuple[int, int, int], params: PackedParams):
        self.kernel, self.grid, self.params = kernel, grid, params
        spec = kernel.spec
        empty = grid[0] * grid[1] * grid[2] == 0
        self._fn = None if empty else driver.function("cuLaunchKernel")
        self._args = (kernel.function.handle, *grid, *spec.block, int(spec.shared))
        self._ptr = params.pointer  # the packed values live as long as `params`
        self._pdl = (PdlLaunch(kernel.function.handle, grid, spec.block, int(spec.shared))
                     if not empty and kernel.launches_early(grid, True) else None)
        self._early = bool(spec.early_reads)  # PDL only when the call vouches

    def __call__(self, stream: int = 0, early: bool = False) -> None:
        if self._fn is None:
            return  # an empty grid launches nothing
        if self._pdl is not None and (early or not self._early):
            self._pdl(stream, self._ptr, self.kernel.name)
            return
        rc = self._fn(*self._args, stream, self._ptr, None)
        if rc:
            driver.check("cuLaunchKernel", rc, f"{self.kernel.name} grid={self.grid}")
