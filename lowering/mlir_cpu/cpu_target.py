"""The CPU a kernel library is compiled for: host detection, the target string, LLVM's
-mcpu/-mattr for it, and the check that refuses a host lacking what an artifact needs.

Target strings (after the backend name):

    cpu                          this host, resolved at compile time (e.g. to the line below)
    cpu:x86-64:avx512            an ISA level of an architecture; `cpu:avx512` names the same
    cpu:x86-64:avx2
    cpu:x86-64:avx512+bf16+amx   a level plus extra features LLVM may use
    cpu:aarch64:neon

A level fixes what LLVM may emit (target-cpu x86-64-v3 for avx2, x86-64-v4 for avx512) and the
register tiles of the kernels (f32 lanes per vector, vector registers); the host must have every
/proc/cpuinfo flag the level implies. Extras widen what LLVM may use; `bf16` also gives bf16 x
bf16 matmuls the AVX512-BF16 kernel (lowerings/bf16_matmul.py), and `amx` with it the AMX tile
kernel (lowerings/amx_matmul.py), so `cpu` adds them when the host has them (HOST_EXTRAS; amx
only when Linux also grants this process the tile state, amx_refusal) and the artifact then
needs them (a host without them is refused by name; name `cpu:x86-64:avx512` to build one that
runs on every AVX-512 CPU). `vnni` only widens LLVM's choices, no kernel asks for it, so `cpu`
leaves it out. Nothing here imports MLIR: the runtime checks a host with it before it dlopens a
library.
"""
from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Isa:
    name: str
    arch: str
    llvm_cpu: str
    llvm_features: tuple[str, ...]   # stated explicitly so the host's never leak in
    flags: tuple[str, ...]           # /proc/cpuinfo flags the level implies (all of them)
    vector_bits: int
    vector_registers: int


# What x86-64-v2/v3/v4 let LLVM assume, as Linux names the flags (abm = LZCNT).
_X86_V2 = ("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3")
_X86_V3 = _X86_V2 + ("abm", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave")
_X86_V4 = _X86_V3 + ("avx512bw", "avx512cd", "avx512dq", "avx512f", "avx512vl")

# Lowest level first: detection picks the last one the host has.
ISAS: dict[str, Isa] = {i.name: i for i in (
    Isa("sse2", "x86-64", "x86-64", ("+sse2",), ("sse", "sse2"), 128, 16),
    Isa("avx2", "x86-64", "x86-64-v3", ("+avx2", "+fma"), _X86_V3, 256, 16),
    Isa("avx512", "x86-64", "x86-64-v4",
        ("+avx512f", "+avx512bw", "+avx512cd", "+avx512dq", "+avx512vl"), _X86_V4, 512, 32),
    Isa("neon", "aarch64", "generic", ("+neon",), ("asimd",), 128, 32),
)}

# extra -> (level it needs, cpuinfo flags, LLVM features)
EXTRAS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "bf16": ("avx512", ("avx512_bf16",), ("+avx512bf16",)),
    "vnni": ("avx512", ("avx512_vnni",), ("+avx512vnni",)),
    "amx": ("avx512", ("amx_bf16", "amx_tile"), ("+amx-bf16", "+amx-tile")),
}

_MACHINES = {"x86_64": "x86-64", "amd64": "x86-64", "aarch64": "aarch64", "arm64": "aarch64"}


@dataclass(frozen=True)
class HostCpu:
    """What this machine's CPU offers: its architecture, model name and feature flags."""
    arch: str
    model: str
    flags: frozenset[str]


def parse_cpuinfo(text: str, machine: str) -> HostCpu:
    """A HostCpu from /proc/cpuinfo text; flags are those every listed processor has."""
    arch = _MACHINES.get(machine.lower(), machine.lower())
    model, flags = "", None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key in ("flags", "features"):
            mine = frozenset(value.split())
            flags = mine if flags is None else flags & mine
        elif key == "model name" and not model:
            model = value.strip()
    return HostCpu(arch, model or machine, flags or frozenset())


@functools.lru_cache(maxsize=1)
def host_cpu() -> HostCpu:
    """This machine's CPU (from /proc/cpuinfo; elsewhere only the architecture is known)."""
    p = Path("/proc/cpuinfo")
    text = p.read_text(errors="replace") if p.is_file() else ""
    return parse_cpuinfo(text, platform.machine())


@dataclass(frozen=True)
class CpuTarget:
    """An ISA level of an architecture plus extras; `str()` is the full target string."""
    arch: str
    isa: str
    extras: tuple[str, ...] = ()

    def __post_init__(self):
        level = ISAS.get(self.isa)
        if level is None or level.arch != self.arch:
            known = ", ".join(f"{i.arch}:{i.name}" for i in ISAS.values())
            raise ValueError(f"unknown CPU target {self.arch}:{self.isa}; expected one of {known}")
        for x in self.extras:
            if x not in EXTRAS:
                raise ValueError(f"unknown CPU feature {x!r} in target {self}; "
                                 f"expected one of {sorted(EXTRAS)}")
            if EXTRAS[x][0] != self.isa:
                raise ValueError(f"CPU feature {x!r} needs the {EXTRAS[x][0]} level, not {self.isa}")
        if list(self.extras) != sorted(set(self.extras)):
            object.__setattr__(self, "extras", tuple(sorted(set(self.extras))))

    @staticmethod
    def parse(spec: str) -> "CpuTarget":
        """From what follows `cpu:`: `avx2`, `x86-64:avx512`, `x86-64:avx512+bf16`."""
        parts = spec.split(":")
        if len(parts) > 2 or not all(parts):
            raise ValueError(f"bad CPU target {spec!r}; expected e.g. 'x86-64:avx512' or 'avx2'")
        isa, *extras = parts[-1].split("+")
        if len(parts) == 1:
            if isa not in ISAS:
                raise ValueError(f"unknown CPU ISA {isa!r}; expected one of {sorted(ISAS)}")
            return CpuTarget(ISAS[isa].arch, isa, tuple(extras))
        return CpuTarget(parts[0], isa, tuple(extras))

    @property
    def spec(self) -> str:
        return f"{self.arch}:{'+'.join((self.isa,) + self.extras)}"

    def __str__(self) -> str:
        return f"cpu:{self.spec}"

    @property
    def level(self) -> Isa:
        return ISAS[self.isa]

    @property
    def f32_lanes(self) -> int:
        return self.level.vector_bits // 32

    @property
    def vector_registers(self) -> int:
        return self.level.vector_registers

    @property
    def llvm_cpu(self) -> str:
        return self.level.llvm_cpu

    @property
    def llvm_features(self) -> list[str]:
        return list(self.level.llvm_features) + [f for x in self.extras for f in EXTRAS[x][2]]

    @property
    def required_flags(self) -> list[str]:
        return sorted(set(self.level.flags).union(*(EXTRAS[x][1] for x in self.extras)))

    def missing_on(self, host: HostCpu) -> list[str]:
        """What `host` lacks to run code built for this target ([] when it can)."""
        if host.arch != self.arch:
            return [f"architecture {self.arch} (this is {host.arch})"]
        return [f for f in self.required_flags if f not in host.flags]

    def record(self) -> dict:
        """The manifest's account of the target: what LLVM was told and what a host needs."""
        return {"target": str(self), "llvm_cpu": self.llvm_cpu,
                "llvm_features": self.llvm_features, "vector_bits": self.level.vector_bits,
                "required_flags": self.required_flags}


# Extras `cpu` adds when the host has them: the ones a kernel uses.
HOST_EXTRAS = ("amx", "bf16")


@functools.lru_cache(maxsize=1)
def amx_refusal() -> str | None:
    """Ask Linux for the AMX tile state for this process (arch_prctl ARCH_REQ_XCOMP_PERM with
    XFEATURE_XTILEDATA; without it the first tile instruction is SIGILL): None once granted,
    else why not. The grant is process-wide and idempotent; every compiled library also asks
    when it is loaded (parallel_runtime.c), so a thread that never came through here can use
    tiles too."""
    if platform.system() != "Linux" or _MACHINES.get(platform.machine().lower()) != "x86-64":
        return f"not x86-64 Linux ({platform.system()} {platform.machine()})"
    import ctypes
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18
    if libc.syscall(sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) != 0:
        return f"arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA): {os.strerror(ctypes.get_errno())}"
    return None


def host_target(host: HostCpu | None = None) -> CpuTarget:
    """The highest level this host runs, with the HOST_EXTRAS it has (module docstring); for
    this machine (no `host` given) amx only if Linux grants the tile state."""
    ours = host is None
    host = host or host_cpu()
    levels = [i for i in ISAS.values() if i.arch == host.arch and set(i.flags) <= host.flags]
    if not levels:
        if host.arch == "x86-64":   # every x86-64 CPU has SSE2, even if no flags were readable
            return CpuTarget("x86-64", "sse2")
        raise ValueError(f"no CPU target for architecture {host.arch!r} ({host.model}); "
                         f"graphir knows {sorted({i.arch for i in ISAS.values()})}")
    level = levels[-1].name
    extras = [x for x in HOST_EXTRAS if EXTRAS[x][0] == level and set(EXTRAS[x][1]) <= host.flags]
    if "amx" in extras and ("bf16" not in extras or ours and amx_refusal()):
        extras.remove("amx")   # W is packed for the AMX kernel only on the bf16 path
    return CpuTarget(host.arch, level, tuple(extras))


def check_host(target: str, host: HostCpu | None = None) -> None:
    """Raise ValueError naming what is missing when `host` cannot run code built for `target`
    (a full target string such as `cpu:x86-64:avx512`)."""
    backend, sep, spec = target.partition(":")
    if backend != "cpu" or not sep:
        raise ValueError(f"target {target!r} records no CPU ISA (expected e.g. "
                         f"'cpu:x86-64:avx2'); recompile it")
    want = CpuTarget.parse(spec)
    ours = host is None
    host = host or host_cpu()
    missing = want.missing_on(host)
    if missing:
        try:
            mine = f"; this CPU's target is {host_target(host)}"
        except ValueError:
            mine = ""
        raise ValueError(f"built for {want}, but this CPU ({host.model}) lacks "
                         f"{', '.join(missing)}{mine}: recompile for it (target 'cpu')")
    if "amx" in want.extras and ours and amx_refusal():
        raise ValueError(f"built for {want}, whose matmuls use AMX tiles, but Linux does not "
                         f"grant this process the tile state ({amx_refusal()}): recompile "
                         f"without amx (e.g. target 'cpu:{want.arch}:{want.isa}+bf16')")
