"""Defence in depth on the GPU kernels (Triton interpreter, see conftest.py): the runtime checks
ragged/paged metadata on the host first, but were that bypassed, the prefill flash kernel, the
fused rope_split_store, the unfused rope / kv_cache_store kernels and the MLA cache store and
attention kernels still keep every metadata-derived address inside its buffer. Out-of-range
page ids (2**31 - 1, num_pages, -1 as int32), positions past the lookup table and the RoPE
table, cache lengths past the lookup table and offsets past the rows neither raise nor write
outside: each paged cache (and RoPE table) is a view inside a larger tensor whose guard rows
are NaN, which must come back bit-identical, and the outputs stay finite (a NaN guard row read
into them would show). Valid metadata in the same layout gives the references' results (the
kernels' own tests, test_flash_attention.py, test_kernels_interp.py and test_mla_kernels.py,
cover the valid cases in full).

An address outside the buffers can crash the interpreter (a segfault), so the tests run once in
a child pytest process and each test here reports its own outcome there: a crash fails the test
it happened in (and those after it) cleanly."""

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from graphir.lowering.triton_gpu.kernels import flash_attention as fa
from graphir.lowering.triton_gpu.kernels import mla as mk
from graphir.lowering.triton_gpu.kernels import mla_launch as ml
from graphir.lowering.triton_gpu.kernels import mla_prefill as mp
from graphir.lowering.triton_gpu.kernels import paged_decode as pd
from graphir.lowering.triton_gpu.kernels import paged_decode_config as pdc
from graphir.lowering.triton_gpu.kernels import rope_split_store as rss
from graphir.lowering.triton_gpu.lowerings import rope_store as rs
from graphir.ops import mla_math as mm
from tests.lowering.triton_gpu.test_flash_attention import attention_ref, paged_problem
from tests.nn.harness import LAYER, mla_op_inputs

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim")

BIG = 2 ** 31 - 1
ROOT = Path(__file__).resolve().parents[3]
CHILD = os.environ.get("GRAPHIR_BOUNDS_CHILD") == "1"
_CHILD_LOG: list[str] = []


def isolated(fn):
    """Run the test's body in the child process; here, assert that it passed there."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if CHILD:
            return fn(*args, **kwargs)
        if not _CHILD_LOG:
            env = dict(os.environ, GRAPHIR_BOUNDS_CHILD="1")
            proc = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                                   str(Path(__file__).relative_to(ROOT))], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=1200)
            _CHILD_LOG.append(proc.stdout + proc.stderr)
        name = fn.__name__ + (f"[{'-'.join(str(v) for v in kwargs.values())}]" if kwargs else "")
        assert re.search(re.escape("::" + name) + r" PASSED", _CHILD_LOG[0]), \
            f"{name} failed or crashed in the child process:\n{_CHILD_LOG[0][-6000:]}"
    return wrapper


class Guarded:
    """A tensor of `shape` living inside a NaN-filled one, `pad` elements before and after."""

    def __init__(self, data: torch.Tensor, pad: int, fill=float("nan")):
        self.pad, n = pad, data.numel()
        self.full = torch.full((pad + n + pad,), fill, dtype=data.dtype)
        self.view = self.full[pad:pad + n].view(data.shape)
        self.view.copy_(data)
        self.bits = self._guards()

    def _guards(self):
        f = self.full.view(torch.int16 if self.full.element_size() == 2 else torch.int32)
        return torch.cat([f[:self.pad], f[-self.pad:]]).clone()

    def check(self):
        assert torch.equal(self._guards(), self.bits), "a guard row was written"


def i32(a):
    if isinstance(a, torch.Tensor):  # already int32, perhaps a guarded view: kept in place
        assert a.dtype == torch.int32
        return a
    return torch.tensor(np.asarray(a, dtype=np.int64).astype(np.int32), dtype=torch.int32)


def poisoned_lut(pb) -> tuple[Guarded, Guarded]:
    """(blocks, lookup table) of a paged_problem, guarded; the table's guard entries name a
    spare page (no sequence's, not 0 nor the last page, where clamps land) whose rows are NaN,
    so a read past the table shows as NaN. Pages are relabelled (in pb) to free one if needed."""
    lut, blocks = pb["lut"], pb["blocks"]
    num_pages = blocks.shape[0]
    free = set(range(num_pages - 1)) - set(lut.ravel().tolist())
    spare = min(free)
    if spare == 0:  # swap pages 0 and 1 (ids and contents): 1 becomes the spare
        lut[...] = np.where(lut == 1, 0, lut)
        blocks[[0, 1]] = blocks[[1, 0]].clone()
        spare = 1
    g = Guarded(blocks, pad=3 * blocks[0].numel())
    g.view[spare] = float("nan")
    return g, Guarded(torch.from_numpy(lut).to(torch.int32), pad=64, fill=spare)


def bad_luts(lut, num_pages):
    """The table with its entries replaced by each out-of-range id in turn (cyclically)."""
    bad = np.array([BIG, num_pages, -1, -7], np.int64)
    out = np.asarray(lut, np.int64).copy()
    out.flat[:] = bad[np.arange(out.size) % len(bad)]
    return out


# ------------------------------------------------------------------- prefill flash kernel
MODES = {"gather": (8, 0), "dense": (32, 0), "tma": (32, 1)}


def _flash(q, blocks, lut, clen, offs, mask, max_seq_len, tma, out=None):
    """The kernel launched as fa.flash_attention launches it, into `out` (zeros by default)."""
    T, NH, D = q.shape
    num_pages, _, num_layers, page, NKV, _ = blocks.shape
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "USE_TMA": tma, "num_warps": 4, "num_stages": 2}
    out = torch.zeros((T, NH * D), dtype=q.dtype) if out is None else out
    fa.flash_prefill_kernel[fa.grid_rule(16, NH)(len(offs) - 1, max_seq_len)](
        q, i32(offs), i32(clen), i32(lut), blocks, out, lut.shape[1], 1, num_layers, num_pages,
        1, D ** -0.5, T, **fa._constexprs(NH, NKV, D, page, fa.mask_id(mask), cfg, True),
        **fa.launch_options(cfg))
    return out


@pytest.mark.parametrize("mode", list(MODES))
@isolated
def test_flash_prefill_bounds(mode):
    page, tma = MODES[mode]
    rng = np.random.default_rng(5)
    new_lens, cache_lens, NH, NKV, D = [19, 0, 6], [5, 9, 0], 2, 1, 16
    dtype = torch.bfloat16 if tma else torch.float32
    pb = paged_problem(rng, new_lens, cache_lens, NKV, D, page, 2, dtype)
    T, num_pages = pb["T"], pb["blocks"].shape[0]
    blocks, lut_g = poisoned_lut(pb)
    q = Guarded(torch.from_numpy(rng.standard_normal((T, NH, D))).to(dtype), pad=2 * NH * D)
    out = Guarded(torch.zeros((T, NH * D), dtype=dtype), pad=3 * NH * D)
    # Valid metadata, cache inside the guards: the reference's numbers.
    got = _flash(q.view, blocks.view, lut_g.view, cache_lens, pb["offs"], "CAUSAL", 19, tma)
    want = attention_ref(q.view.double().numpy(), pb["blocks"].double().numpy(), pb["lut"],
                         pb["offs"], cache_lens, 1, "CAUSAL", 0, D ** -0.5)
    tol = 2e-2 if tma else 1e-5
    np.testing.assert_allclose(got.double().numpy(), want, rtol=tol, atol=tol)
    max_pages = pb["lut"].shape[1]
    cases = {
        "page ids": (bad_luts(pb["lut"], num_pages), cache_lens, pb["offs"]),
        # The last sequence's keys run past its lookup-table row (into the guard entries).
        "cache lengths": (lut_g.view, [BIG, max_pages * page + 3, max_pages * page - 2],
                          pb["offs"]),
        "negative cache lengths": (lut_g.view, [-5, 9, BIG], pb["offs"]),
        "offsets": (lut_g.view, cache_lens, [0, T + 40, -3, BIG]),
        "everything": (bad_luts(pb["lut"], num_pages), [BIG, -1, BIG], [5, 2, T + 9, T]),
    }
    for what, (lut, clen, offs) in cases.items():
        for mask in ("CAUSAL", "NULL"):
            out.view.zero_()
            _flash(q.view, blocks.view, lut, clen, offs, mask, 19, tma, out.view)
            assert torch.isfinite(out.view.float()).all(), (what, mask)
            for g in (blocks, q, out):
                g.check()


# --------------------------------------------------------------------------- paged decode
# page size, config (BLOCK_N, PAGED_TILES, TMA, warps, stages, split, min_part, order, heads,
# merge): row gather, page tiles, TMA, and page tiles whose partitions the kernel merges itself
DECODE_MODES = {"gather": (8, (16, 0, 0, 4, 3, 2)), "tiles": (32, (16, 1, 0, 4, 3, 2)),
                "tma": (32, (16, 1, 1, 4, 3, 2)),
                "merge": (32, (16, 1, 0, 4, 3, 2, 256, 0, 1, 1))}


@pytest.mark.parametrize("mode", list(DECODE_MODES))
@isolated
def test_paged_decode_bounds(mode):
    """Page ids were clamped before; the cache lengths now are too (lookup-table columns)."""
    page, conf = DECODE_MODES[mode]
    rng = np.random.default_rng(9)
    dtype = torch.bfloat16 if mode == "tma" else torch.float32
    new_lens, cache_lens, NH, NKV, D = [1, 0, 2], [13, 40, 3], 4, 2, 16
    pb = paged_problem(rng, new_lens, cache_lens, NKV, D, page, 2, dtype)
    T, num_pages = pb["T"], pb["blocks"].shape[0]
    blocks, lut_g = poisoned_lut(pb)
    q = torch.from_numpy(rng.standard_normal((T, NH, D))).to(dtype)
    kw = dict(q_per_seq=2, config=pdc.make_config(*conf), max_kv_len=256, num_parts=2)
    got = pd.paged_decode(q, i32(pb["offs"]), i32(cache_lens), lut_g.view, blocks.view, 1, **kw)
    want = attention_ref(q.double().numpy(), pb["blocks"].double().numpy(), pb["lut"],
                         pb["offs"], cache_lens, 1, "CAUSAL", 0, D ** -0.5)
    tol = 2e-2 if mode == "tma" else 1e-5
    np.testing.assert_allclose(got.double().numpy(), want, rtol=tol, atol=tol)
    max_pages = pb["lut"].shape[1]
    for lut, clen in ((bad_luts(pb["lut"], num_pages), cache_lens),
                      (None, [BIG, -4, 10 ** 6]),
                      (None, [3, 5, max_pages * page + 5]),
                      (bad_luts(pb["lut"], num_pages), [BIG - 1, -BIG, BIG])):
        lut = lut_g.view if lut is None else i32(lut)
        got = pd.paged_decode(q, i32(pb["offs"]), i32(clen), lut, blocks.view, 1, **kw)
        assert torch.isfinite(got.float()).all()
        blocks.check()


# ------------------------------------------------------------------ rope + split + store
def _rope_problem(rng, page=4):
    NH, NKV, D, L = 4, 2, 16, 2
    pb = paged_problem(rng, [3, 5], [2, 6], NKV, D, page, L, torch.float32)
    qkv = torch.from_numpy(rng.standard_normal((pb["T"], (NH + 2 * NKV) * D))).float()
    fr = rng.standard_normal((16, D)).astype(np.float32)
    return pb, qkv, fr, NH


# (1, True): the decode_heads form, a program per head chunk, which a few tokens launch
@pytest.mark.parametrize("block_t,split", [(1, False), (2, False), (1, True)])
@isolated
def test_rope_split_store_bounds(block_t, split):
    rng = np.random.default_rng(7)
    pb, qkv, fr, NH = _rope_problem(rng)
    T, num_pages = pb["T"], pb["blocks"].shape[0]
    freqs = Guarded(torch.from_numpy(fr), pad=5 * fr.shape[1])
    blocks = Guarded(pb["blocks"], pad=2 * pb["blocks"][0].numel())
    ref_blocks = pb["blocks"].clone()
    kw = dict(block_t=block_t, split_heads=split, head_block=2 if split else None)
    want = rss.rope_split_store(qkv, i32(pb["offs"]), i32([2, 6]), i32(pb["lut"]),
                                torch.from_numpy(fr), ref_blocks, 1, NH, **kw)
    got = rss.rope_split_store(qkv, i32(pb["offs"]), i32([2, 6]), i32(pb["lut"]), freqs.view,
                               blocks.view, 1, NH, **kw)
    assert torch.equal(got, want) and torch.equal(blocks.view, ref_blocks)
    for lut, clen in ((bad_luts(pb["lut"], num_pages), [2, 6]),      # page ids
                      (pb["lut"], [BIG - 2, 100]),                     # past the tables
                      (pb["lut"], [-20, -1]),                          # negative positions
                      (bad_luts(pb["lut"], num_pages), [BIG, -BIG])):
        got = rss.rope_split_store(qkv, i32(pb["offs"]), i32(clen), i32(lut), freqs.view,
                                   blocks.view, 1, NH, **kw)
        assert torch.isfinite(got).all()
        assert torch.isfinite(blocks.view).all()
        blocks.check()
        freqs.check()


@isolated
def test_unfused_rope_and_kv_store_bounds():
    rng = np.random.default_rng(8)
    pb, qkv, fr, NH = _rope_problem(rng)
    T, num_pages = pb["T"], pb["blocks"].shape[0]
    NKV, D, page, L = 2, 16, 4, 2
    freqs = Guarded(torch.from_numpy(fr), pad=5 * D)
    blocks = Guarded(pb["blocks"], pad=2 * pb["blocks"][0].numel())
    x = qkv[:, :NKV * D].contiguous()
    for lut, clen in ((pb["lut"], [2, 6]), (bad_luts(pb["lut"], num_pages), [BIG, -BIG]),
                      (pb["lut"], [BIG - 2, -3])):
        out = torch.empty_like(x)
        rs.rope_kernel[(T,)](x, freqs.view, i32(pb["offs"]), i32(clen), out, T, 2, fr.shape[0],
                             H=NKV, D=D, HB=NKV, INTERLEAVED=True)
        assert torch.isfinite(out).all()
        rs.kv_store_kernel[(T,)](x, i32(pb["offs"]), i32(clen), i32(lut), blocks.view, T, 2,
                                 pb["lut"].shape[1], 1, L, num_pages, KV=1, NKV=NKV, D=D,
                                 PAGE_SIZE=page, HB=NKV)
        assert torch.isfinite(blocks.view).all()
        blocks.check()
        freqs.check()


# ------------------------------------------------------------------------------- MLA
NH, NOPE, ROPE, V, R = 3, 8, 6, 5, 16


def _mla(kinds=1, seed=0):
    rng = np.random.default_rng(seed)
    (q, kv, normw, fr, offs, clen, lut, blocks, w_k, w_uk,
     w_uv) = mla_op_inputs(rng, kinds, nh=NH, nope=NOPE, rope=ROPE, v=V, r=R, kv_b_scale=0.3)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    return dict(q=t(q), kv=t(kv), normw=t(normw), fr=fr, offs=offs, clen=clen, lut=lut,
                blocks=t(blocks), w_k=t(w_k), w_uk=t(w_uk), w_uv=t(w_uv))


@isolated
def test_mla_cache_store_bounds():
    m = _mla()
    num_pages = m["blocks"].shape[0]
    blocks = Guarded(m["blocks"], pad=2 * m["blocks"][0].numel())
    freqs = Guarded(torch.from_numpy(m["fr"]), pad=3 * m["fr"].shape[1])
    want = mm.mla_cache_store(m["blocks"].numpy(), m["kv"].numpy(), m["normw"].numpy(), m["fr"],
                              m["offs"], m["clen"], m["lut"], layer_idx=LAYER, kv_lora_rank=R,
                              interleaved=True, eps=1e-6)
    kw = dict(kv_lora_rank=R, layer=LAYER, interleaved=True)
    ml.cache_store(m["kv"], m["normw"], freqs.view, i32(m["offs"]), i32(m["clen"]),
                   i32(m["lut"]), blocks.view, **kw)
    np.testing.assert_allclose(blocks.view.numpy(), want, rtol=1e-5, atol=1e-5)
    for lut, clen in ((bad_luts(m["lut"], num_pages), m["clen"]),
                      (m["lut"], [BIG - 3, 40, -9]),
                      (bad_luts(m["lut"], num_pages), [BIG, -BIG, 100])):
        ml.cache_store(m["kv"], m["normw"], freqs.view, i32(m["offs"]), i32(clen), i32(lut),
                       blocks.view, **kw)
        assert torch.isfinite(blocks.view).all()
        blocks.check()
        freqs.check()


def _attention(m, blocks, lut, clen, path):
    return ml.attention(m["q"], blocks, i32(m["offs"]), i32(clen), i32(lut),
                        m["w_uk"] if path == "absorbed" else m["w_k"], m["w_uv"], n_heads=NH,
                        qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V,
                        kv_lora_rank=R, layer=LAYER, scale=0.21, path=path)


@pytest.mark.parametrize("kinds", [1, 2])
@isolated
def test_mla_attention_bounds(kinds):
    m = _mla(kinds, seed=3)
    num_pages = m["blocks"].shape[0]
    blocks = Guarded(m["blocks"], pad=2 * m["blocks"][0].numel())
    kw = dict(layer_idx=LAYER, input_row_offsets=m["offs"], cache_lengths=m["clen"],
              lookup_table=m["lut"], qk_rope_head_dim=ROPE, scale=0.21)
    q3 = m["q"].numpy().reshape(-1, NH, NOPE + ROPE)
    want = mm.mla_decode(q3, m["blocks"].numpy(), m["w_uk"].numpy(), m["w_uv"].numpy(),
                         **kw).reshape(q3.shape[0], -1)
    for path in ("absorbed", "decompressed"):
        got = _attention(m, blocks.view, m["lut"], m["clen"], path)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)
        got = _attention(m, blocks.view, bad_luts(m["lut"], num_pages), m["clen"], path)
        assert torch.isfinite(got).all(), path
        blocks.check()
    # Cache lengths past the lookup table (the absorbed kernel's loop is clamped to it).
    got = _attention(m, blocks.view, m["lut"], [BIG - 4, 0, BIG], "absorbed")
    assert torch.isfinite(got).all()
    blocks.check()


@isolated
def test_mla_decompressed_scratch_bounds():
    """Cache lengths past what the host sized the scratch for (kv_cap): the decompression
    writes, and the attention reads, only the sequence's kv_cap scratch rows."""
    m = _mla(1, seed=4)
    num_pages = m["blocks"].shape[0]
    blocks = Guarded(m["blocks"], pad=2 * m["blocks"][0].numel())
    decomp, attn = mp.specs("float32", "float32", NH, NOPE, ROPE, V, R, 1, 4)
    batch, T, kv_cap = 3, m["q"].shape[0], 9
    kv = Guarded(torch.zeros((batch * kv_cap * NH, NOPE + V)), pad=(NOPE + V) * NH * 8)
    out = Guarded(torch.zeros((T, NH * V)), pad=NH * V * 4)
    geo = (m["lut"].shape[1], LAYER, m["blocks"].shape[2], num_pages)
    for lut, clen in ((m["lut"], [BIG, 3, 100]), (bad_luts(m["lut"], num_pages), [-1, BIG, 7])):
        args = (i32(m["offs"]), i32(clen), i32(lut), blocks.view)
        ml._run(decomp, decomp.grid_for(batch=batch, kv_cap=kv_cap), m["w_k"], m["w_uv"], *args,
                kv.view, kv_cap, *geo)
        ml._run(attn, attn.grid_for(batch=batch, seqmax=5), m["q"], *args, kv.view, out.view,
                kv_cap, *geo, 0.21)
        assert torch.isfinite(out.view).all()
        for g in (blocks, kv, out):
            g.check()
    assert mk.cache_store_spec("float32", "float32", R, ROPE, 1, 4, True).signature[
        "rope_rows"] == "i32"
