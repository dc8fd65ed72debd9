"""The CPU target: /proc/cpuinfo parsing, target strings, the register block it picks, the
codegen attributes it sets, and the load-time refusal of a CPU lacking an artifact's ISA."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from graphir.lowering.driver import Target
from graphir.lowering.mlir_cpu import cpu_target
from graphir.lowering.mlir_cpu.cpu_target import CpuTarget, HostCpu, check_host, host_target, \
    parse_cpuinfo

_V3 = "fpu sse sse2 ssse3 cx16 sse4_1 sse4_2 popcnt lahf_lm abm avx avx2 bmi1 bmi2 f16c fma movbe xsave"
_V4 = _V3 + " avx512f avx512bw avx512cd avx512dq avx512vl avx512_bf16 amx_tile amx_bf16"


def _cpuinfo(*flag_lines: str, model: str = "Test CPU") -> str:
    return "\n\n".join(f"processor\t: {i}\nvendor_id\t: GenuineIntel\nmodel name\t: {model}\n"
                       f"flags\t\t: {flags}\n" for i, flags in enumerate(flag_lines))


def test_parse_cpuinfo_keeps_the_flags_every_processor_has():
    host = parse_cpuinfo(_cpuinfo(_V4, _V3 + " avx512f"), "x86_64")
    assert host.arch == "x86-64" and host.model == "Test CPU"
    assert "avx2" in host.flags and "avx512bw" not in host.flags and "avx512f" in host.flags
    assert host_target(host) == CpuTarget("x86-64", "avx2")
    # AVX512-BF16 and AMX are added (kernels use them); VNNI is not (none does).
    assert (str(host_target(parse_cpuinfo(_cpuinfo(_V4), "x86_64")))
            == "cpu:x86-64:avx512+amx+bf16")
    no_amx = _V4.replace(" amx_tile amx_bf16", "")
    assert str(host_target(parse_cpuinfo(_cpuinfo(no_amx), "x86_64"))) == "cpu:x86-64:avx512+bf16"
    no_bf16 = _V4.replace(" avx512_bf16", "") + " avx512_vnni"
    assert str(host_target(parse_cpuinfo(_cpuinfo(no_bf16), "x86_64"))) == "cpu:x86-64:avx512"
    assert str(host_target(parse_cpuinfo(_cpuinfo("fpu sse sse2"), "x86_64"))) == "cpu:x86-64:sse2"
    # No readable flags: every x86-64 CPU still has SSE2.
    assert str(host_target(parse_cpuinfo("", "x86_64"))) == "cpu:x86-64:sse2"
    arm = parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\n", "aarch64")
    assert str(host_target(arm)) == "cpu:aarch64:neon"
    with pytest.raises(ValueError, match="no CPU target for architecture 'riscv64'"):
        host_target(parse_cpuinfo("", "riscv64"))


@pytest.mark.parametrize("text,canonical", [
    ("cpu:avx2", "cpu:x86-64:avx2"),
    ("cpu:x86-64:avx512", "cpu:x86-64:avx512"),
    ("cpu:x86-64:avx512+bf16+amx", "cpu:x86-64:avx512+amx+bf16"),
    ("cpu:neon", "cpu:aarch64:neon"),
])
def test_target_string_round_trip(text, canonical):
    t = Target.parse(text)
    assert str(t) == canonical and Target.parse(str(t)) == t and t.resolved() == t
    assert str(CpuTarget.parse(t.cpu)) == canonical


@pytest.mark.parametrize("text,message", [
    ("cpu:avx1024", "unknown CPU ISA 'avx1024'"),
    ("cpu:x86-64:neon", "unknown CPU target x86-64:neon"),
    ("cpu:x86-64:avx2+bf16", "CPU feature 'bf16' needs the avx512 level, not avx2"),
    ("cpu:x86-64:avx512+sve", "unknown CPU feature 'sve'"),
    ("cpu:x86-64:", "bad CPU target 'x86-64:'"),
    ("cpu:a:b:c", "bad CPU target 'a:b:c'"),
])
def test_bad_target_strings_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        Target.parse(text)


def test_cpu_resolves_to_this_host():
    t = Target.parse("cpu")
    assert str(t) == "cpu" and str(t.resolved()) == str(host_target())


def test_target_properties_and_check_host():
    avx512 = CpuTarget.parse("x86-64:avx512+bf16")
    assert (avx512.f32_lanes, avx512.vector_registers, avx512.llvm_cpu) == (16, 32, "x86-64-v4")
    assert "+avx512bf16" in avx512.llvm_features and "avx512_bf16" in avx512.required_flags
    v3_host = HostCpu("x86-64", "Old CPU", frozenset(_V3.split()))
    assert avx512.missing_on(v3_host)[:3] == ["avx512_bf16", "avx512bw", "avx512cd"]
    check_host("cpu:x86-64:avx2", v3_host)
    with pytest.raises(ValueError, match=r"built for cpu:x86-64:avx512, but this CPU \(Old CPU\) "
                                         r"lacks avx512bw, avx512cd, avx512dq, avx512f, avx512vl; "
                                         r"this CPU's target is cpu:x86-64:avx2"):
        check_host("cpu:x86-64:avx512", v3_host)
    with pytest.raises(ValueError, match="lacks architecture aarch64"):
        check_host("cpu:aarch64:neon", v3_host)
    with pytest.raises(ValueError, match="records no CPU ISA"):
        check_host("cpu", v3_host)


def test_register_block_follows_the_target():
    from graphir.lowering.mlir_cpu.schedules import MatmulConfig

    blocks = {isa: MatmulConfig.for_target(CpuTarget.parse(isa)) for isa in ("avx512", "avx2", "sse2")}
    assert [(c.mr, c.nr, c.lanes) for c in blocks.values()] == [(8, 32, 16), (6, 16, 8), (6, 8, 4)]
    for c in blocks.values():   # accumulators + B vectors + a broadcast fit the register file
        assert c.mr * c.nr // c.lanes + c.nr // c.lanes + 1 <= (32 if c.lanes == 16 else 16)
    c = blocks["avx512"]
    assert [c.panel_width(n) for n in (6144, 48, 8, 100)] == [32, 16, None, None]


# -- codegen and the load-time check --------------------------------------------------------------
def _compile(target: str, tmp_path):
    pytest.importorskip("mlir.ir")
    from graphir import DType, Graph, TensorType, Weight, ops
    from graphir.lowering.driver import compile_graph

    with Graph("isa", input_types=[TensorType(DType.float32, ["n", 64])]) as g:
        x = g.inputs[0]
        g.output(ops.exp(ops.matmul(x, Weight("w", DType.float32, [64, 64]), transpose_b=True)))
    return g, compile_graph(g, target, out=tmp_path / "isa.gart")


def _need(target: str):
    if CpuTarget.parse(target.split(":", 1)[1]).missing_on(cpu_target.host_cpu()):
        pytest.skip(f"this CPU cannot run {target}")


def _functions_using(asm: str, needle: str) -> set[str]:
    found, name = set(), None
    for line in asm.splitlines():
        if line.endswith(">:"):
            name = line.split("<", 1)[1][:-2]
        elif needle in line:
            found.add(name)
    return found


def test_avx2_library_has_no_avx512_code(tmp_path):
    _need("cpu:x86-64:avx2")
    from graphir.lowering.mlir_cpu.backend import mlir_text

    g, art = _compile("cpu:avx2", tmp_path)
    assert art.target == "cpu:x86-64:avx2"
    rec = art.manifest["cpu"]
    assert rec["llvm_cpu"] == "x86-64-v3" and "avx2" in rec["required_flags"]
    ir_text = mlir_text(g, "llvmir", Target.parse("cpu:avx2"))
    assert ir_text.count('"target-cpu"="x86-64-v3"') >= 1 and "x86-64-v4" not in ir_text
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump not installed")
    asm = subprocess.run([objdump, "-d", str(art.file("cpu/kernels.so"))], capture_output=True,
                         text=True, check=True).stdout
    # The engine's own `_mlir_<name>` wrappers (never called: the runtime enters through
    # `_mlir_ciface_<name>`) keep the host's attributes; everything else must be AVX2.
    ours = {f for f in _functions_using(asm, "zmm") if not f.startswith("_mlir__mlir_")
            and not (f.startswith("_mlir_k") and not f.startswith("_mlir_ciface_"))}
    assert not ours, ours
    assert _functions_using(asm, "ymm")


def test_refuses_a_cpu_lacking_the_artifact_isa(tmp_path, monkeypatch):
    _need("cpu:x86-64:avx2")
    from graphir.lowering.artifact import ArtifactError
    from graphir.runtime.session import InferenceSession

    g, art = _compile("cpu:x86-64:avx2", tmp_path)
    w = {"w": np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)}
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    (y,) = InferenceSession().load(art, weights=w).execute(x)   # this host runs it
    np.testing.assert_allclose(y, np.exp(x.astype(np.float64) @ w["w"].T.astype(np.float64)),
                               rtol=1e-5)
    old = HostCpu("x86-64", "Fake SSE CPU", frozenset("fpu sse sse2 ssse3 sse4_1 sse4_2".split()))
    monkeypatch.setattr(cpu_target, "host_cpu", lambda: old)
    with pytest.raises(ArtifactError) as e:
        InferenceSession().load(str(art.path), weights=w)
    msg = str(e.value)
    assert "isa.gart: built for cpu:x86-64:avx2, but this CPU (Fake SSE CPU) lacks abm, avx, " \
           "avx2, bmi1" in msg and "this CPU's target is cpu:x86-64:sse2" in msg, msg


@pytest.mark.parametrize("target", ["cpu:x86-64:avx2", "cpu:x86-64:sse2"])
def test_bf16_copies_without_native_bf16(tmp_path, target):
    """Without AVX512-BF16, LLVM copies bf16 through f32 and calls __truncsfbf2, which the
    library's own runtime provides: the copy is bit-exact (signed zero, inf, NaN included)."""
    _need(target)
    pytest.importorskip("mlir.ir")
    from graphir import DType, Graph, TensorType, ops
    from graphir.dtype import round_to_bf16
    from graphir.lowering.driver import compile_graph
    from graphir.runtime.session import InferenceSession

    with Graph("bfcopy", input_types=[TensorType(DType.bfloat16, ["n", 4])]) as g:
        x = g.inputs[0]
        g.output(ops.concat([x[1:], x[:1]], axis=0), ops.permute(x, [1, 0]))
    art = compile_graph(g, target, out=tmp_path / "bf.gart")
    x = round_to_bf16(np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32) * 3)
    x[0, :3] = [-0.0, np.inf, np.nan]
    a, b = InferenceSession().load(art).execute(x)
    want_a, want_b = np.concatenate([x[1:], x[:1]]), x.T
    for got, want in ((a, want_a), (b, want_b)):
        assert got.view(np.uint32).tolist() == want.view(np.uint32).tolist()


def test_amx_needs_the_tile_state_from_linux(monkeypatch):
    """`cpu` on this machine adds amx only when Linux grants the tile state, and an amx
    artifact is refused by name where it does not (instead of a SIGILL at the first tile)."""
    from graphir.lowering.mlir_cpu import cpu_target

    host = parse_cpuinfo(_cpuinfo(_V4), "x86_64")
    monkeypatch.setattr(cpu_target, "host_cpu", lambda: host)
    monkeypatch.setattr(cpu_target, "amx_refusal", lambda: "arch_prctl: Operation not permitted")
    assert str(cpu_target.host_target()) == "cpu:x86-64:avx512+bf16"
    with pytest.raises(ValueError, match="tile state .*Operation not permitted.*avx512\\+bf16"):
        cpu_target.check_host("cpu:x86-64:avx512+amx+bf16")
    cpu_target.check_host("cpu:x86-64:avx512+bf16")
    monkeypatch.setattr(cpu_target, "amx_refusal", lambda: None)
    assert str(cpu_target.host_target()) == "cpu:x86-64:avx512+amx+bf16"
    cpu_target.check_host("cpu:x86-64:avx512+amx+bf16")
