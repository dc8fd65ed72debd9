"""Ragged prefill attention over the paged KV cache (chunked prefill, cached prefix).

q `[T, NH, D]` (rows packed by input_row_offsets); K/V read from the paged cache, which already
holds the new tokens (written by rope_split_store), for positions 0 .. cache_len + new_len - 1.
Query token i of sequence b sits at position cache_lengths[b] + i. Masks: NULL, CAUSAL,
SLIDING_WINDOW_CAUSAL, SLIDING_WINDOW_NONCAUSAL, CHUNKED_CAUSAL (window W); GQA; online softmax
in fp32 with exp2. Output `[T, NH*D]` in q's dtype. SOFTCAP > 0 (a constexpr; 0.0 compiles to
the uncapped kernel, instruction for instruction) caps the scaled scores to
SOFTCAP * tanh(s / SOFTCAP) before the mask (Gemma 2; paged.capped_scores_log2).

Grid (query blocks, NH, batch), query blocks issued longest-first within each (head, sequence):
causal work grows with the block index, and the CTAs running at once read the K/V of a few
heads, which stay in the L2 (heads on the fastest axis, tried with the removed loop below, was
never timed correct and would spread them over all heads). LPT configs (`..lpt`) renumber the
programs longest-first across sequences instead (groups of heads whose K/V fit in L2 side by
side: paged.tile_order). On Hopper the shipped table mostly names the warp-specialized Gluon
kernel (flash_attention_wgmma.py, configs `..ws`), which takes this module's arguments and
grid; `runnable_config` sends the calls it cannot serve here. Key blocks outside the mask's
[start, end) range are skipped. Two loops per program: the key blocks every query of the tile
may see (no mask arithmetic, the row max taken before scaling), then the edge blocks (the
window's far edge, the diagonal, the partial last block) with the mask, walked as one loop so
their code is emitted once. P V is issued after each block's softmax; Triton pipelines the K/V
loads and the page lookups.

K/V addressing (decided at compile time from PAGE_SIZE and BLOCK_N): when a key block stays in
one page, one lookup-table load per block gives a dense [BLOCK_N, D] tile at row stride NKV*D,
read either by pointer tiles (cp.async) or through a TMA tensor descriptor made on the device
over the whole cache seen as 2-D [num_pages*2*num_layers*PAGE_SIZE, NKV*D]; pages smaller than
BLOCK_N take a per-row page gather. Tile and pipeline choices live in
flash_attention_configs.py as data.

This is the loop measured correct on an H200 (tools/gpu_sweeps/attention.py, run 4: rel err
1e-3, 0.63-0.85x torch SDPA at m128n64w8s3tmar128; flash_attention_configs.py has the
numbers). A later one-loop variant (Q K_j^T, then P_{j-1} V_{j-1} issued before block j's
softmax, P carried across iterations as int16 bits) was removed: it passed the interpreter but
was wrong on the GPU for every shape with more than one key block. Its P V wgmma read P from
registers (the A operand) and stayed in flight across the loop's back edge, and nothing kept
those registers live until the wait in the next iteration: LLVM moved the bf16 conversion of
the carried P to the loop header, and ptxas reused P's registers for the mask's index arithmetic
right after the HGMMA issue (SASS: `HGMMA ... R120, ...` then `IMAD.IADD R120, ...` before the
next `WARPGROUP.DEPBAR`), so the tensor cores multiplied V by whatever those registers held
next (rel err 0.3 to inf). tests/lowering/triton_gpu/test_flash_attention_aot.py checks every
candidate's SASS for that hazard.
"""

from __future__ import annotations

import triton
import triton.language as tl

from graphir.lowering.triton_gpu.kernels.flash_attention_configs import (  # noqa: F401
    CANDIDATES, GLUON_FLAGS, PERSISTENT_FLAGS, WS_CANDIDATES, candidates, check_config,
    config_tag, default_config, is_ws, uses_tma)
from graphir.lowering.triton_gpu.kernels.paged import (capped_scores_log2, check_attention_args,
                                                       check_softcap, full_key_range, key_range,
                                                       mask_allows, mask_id, page_block_row,
                                                       sequence_rows, slot_offsets, tile_order)
from graphir.lowering.triton_gpu.kernels.spec import (NUM_SMS, KernelSpec, cdiv,
                                                      torch_global_scratch, triton_dtype)
from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait

# TMA coordinates are 32-bit: the cache seen as 2-D must have fewer rows than this; a TMA config
# falls back to pointer tiles otherwise.
TMA_MAX_ROWS = 2 ** 31 - 1
TMA_MIN_ROW_BYTES = 128
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@triton.jit
def _kv_tile(blocks_ptr, desc, lut_ptr, b, kvh, n0, end, max_pages, layer_idx, num_layers,
             num_pages, KV: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr,
             PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
             MASKED: tl.constexpr):
    """K (KV=0) or V (KV=1) rows n0..n0+BLOCK_N-1 of KV head kvh; rows at or past `end` read as
    zero when MASKED (slots past the cached length may hold anything, NaN included)."""
    r = tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    valid = (n0 + r) < end
    if PAGE_SIZE % BLOCK_N == 0:
        # Lookup-table column clamped (page_block_row); the page id too for pointer tiles. A
        # TMA box needs no page check: the hardware bounds-checks it against the descriptor,
        # whose shape is the cache's real rows, and reads rows outside it as zeros.
        row = page_block_row(lut_ptr, b, n0, max_pages, layer_idx, num_layers, KV, PAGE_SIZE,
                             num_pages, not USE_TMA)
        if USE_TMA:
            t = desc.load([row.to(tl.int32), kvh * D])
            if MASKED and KV == 1:
                # K needs no zeroing: the softmax masks those scores before any use.
                t = tl.where(valid[:, None], t, 0.0)
        else:
            ptrs = blocks_ptr + (row * (NKV * D) + kvh * D) + r[:, None] * (NKV * D) + d[None, :]
            if MASKED:
                t = tl.load(ptrs, mask=valid[:, None], other=0.0)
            else:
                t = tl.load(ptrs)
    else:
        base = slot_offsets(lut_ptr, b, n0 + r, max_pages, layer_idx, num_layers, valid, KV,
                            PAGE_SIZE, NKV, D, num_pages) + kvh * D
        ptrs = blocks_ptr + base[:, None] + d[None, :]
        if MASKED:
            t = tl.load(ptrs, mask=valid[:, None], other=0.0)
        else:
            t = tl.load(ptrs)
    return t


@triton.jit
def _softmax_step(acc, l_i, m_i, q, k, v, qp, n0, end, window, qk_scale, scale,
                  MASK: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  SOFTCAP: tl.constexpr):
    """One key block of the online softmax (running max m_i in log2 units); SOFTCAP > 0 caps
    the scaled scores (Gemma 2) before the mask."""
    s = tl.dot(q, tl.trans(k))
    if SOFTCAP > 0:
        # Capped in fp32 on the natural scale, then in log2 units: the max-before-scaling
        # shortcut below does not apply (the cap is not linear).
        s = capped_scores_log2(s, scale, SOFTCAP)
        if MASKED:
            kp = n0 + tl.arange(0, BLOCK_N)
            ok = mask_allows(qp, kp, window, MASK) & (kp < end)[None, :]
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
    elif MASKED:
        kp = n0 + tl.arange(0, BLOCK_N)
        ok = mask_allows(qp, kp, window, MASK) & (kp < end)[None, :]
        s = tl.where(ok, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def flash_prefill_kernel(
        q_ptr, offs_ptr, cache_len_ptr, lut_ptr, blocks_ptr, out_ptr, max_pages, layer_idx,
        num_layers, num_pages, window, scale, T,
        NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, PAGE_SIZE: tl.constexpr,
        MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        USE_TMA: tl.constexpr, SOFTCAP: tl.constexpr, LPT: tl.constexpr = 0):
    pdl_wait()
    pid_m, h, b = tile_order(NH, NKV, D, BLOCK_M, LPT)
    prefill_tile(q_ptr, offs_ptr, cache_len_ptr, lut_ptr, blocks_ptr, out_ptr, max_pages,
                 layer_idx, num_layers, num_pages, window, scale, T, pid_m, h, b, NH, NKV, D,
                 PAGE_SIZE, MASK, BLOCK_M, BLOCK_N, USE_TMA, SOFTCAP)


@triton.jit
def prefill_tile(q_ptr, offs_ptr, cache_len_ptr, lut_ptr, blocks_ptr, out_ptr, max_pages,
                 layer_idx, num_layers, num_pages, window, scale, T, pid_m, h, b,
                 NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr,
                 PAGE_SIZE: tl.constexpr, MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, SOFTCAP: tl.constexpr):
    """Query tile pid_m of head h of sequence b: the whole of flash_prefill_kernel's work for
    one program (also the persistent Triton kernel's per-tile body)."""
    # Defence in depth (the runtime checks the metadata on the host first; valid metadata is
    # unchanged): the sequence's rows are clamped into [0, T) and never counted negative, its
    # cached tokens into what its lookup-table row addresses, so bad offsets or lengths move no
    # q / out access outside the buffers and start no 2**31-key loop. Scalars, once a program.
    seq_start, seq_len = sequence_rows(offs_ptr, b, T)
    if pid_m * BLOCK_M < seq_len:
        cache_len = tl.minimum(tl.maximum(tl.load(cache_len_ptr + b), 0), max_pages * PAGE_SIZE)
        kv_len = cache_len + seq_len
        kvh = h // (NH // NKV)
        i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = i < seq_len
        qp = cache_len + i
        d = tl.arange(0, D)
        rows = (seq_start + i).to(tl.int64) * (NH * D) + h * D
        q = tl.load(q_ptr + rows[:, None] + d[None, :], mask=rmask[:, None], other=0.0)
        o_row0 = seq_start + pid_m * BLOCK_M   # the tile's first output row
        o_left = seq_len - pid_m * BLOCK_M     # its rows in the sequence
        q_lo = cache_len + pid_m * BLOCK_M
        q_hi = tl.minimum(kv_len, q_lo + BLOCK_M) - 1
        start, end = key_range(q_lo, q_hi, kv_len, window, MASK)
        start = (start // BLOCK_N) * BLOCK_N
        # Whole key blocks every query of the tile may see: [full_lo, full_hi), empty (both at
        # `start`) when there is none.
        lo, hi = full_key_range(q_lo, q_hi, kv_len, window, MASK)
        full_lo = tl.maximum(tl.cdiv(lo, BLOCK_N) * BLOCK_N, start)
        full_hi = (hi // BLOCK_N) * BLOCK_N
        none_full = full_hi <= full_lo
        full_lo = tl.where(none_full, start, full_lo)
        full_hi = tl.where(none_full, start, full_hi)
        if (PAGE_SIZE % BLOCK_N == 0) and USE_TMA:
            # The descriptor's bounds are the cache's real rows (num_pages is the blocks'
            # first dimension): the hardware zero-fills any box row outside them. Counted in
            # int64 and capped at 2**31 - 1 (TMA coordinates are 32-bit; the host wrapper
            # and aot_specs keep larger caches on pointer tiles), so it never wraps.
            rows = tl.minimum(tl.cast(num_pages, tl.int64) * (2 * PAGE_SIZE) * num_layers,
                              2**31 - 1).to(tl.int32)
            desc = tl.make_tensor_descriptor(
                blocks_ptr, shape=[rows, NKV * D],
                strides=[NKV * D, 1], block_shape=[BLOCK_N, D])
        else:
            desc = blocks_ptr
        qk_scale = scale * 1.4426950408889634  # log2(e): exp2 below
        m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        for n0 in range(full_lo, full_hi, BLOCK_N):
            n0 = tl.multiple_of(n0, BLOCK_N)
            k = _kv_tile(blocks_ptr, desc, lut_ptr, b, kvh, n0, end, max_pages, layer_idx,
                         num_layers, num_pages, 0, NKV, D, PAGE_SIZE, BLOCK_N, USE_TMA, False)
            v = _kv_tile(blocks_ptr, desc, lut_ptr, b, kvh, n0, end, max_pages, layer_idx,
                         num_layers, num_pages, 1, NKV, D, PAGE_SIZE, BLOCK_N, USE_TMA, False)
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qp, n0, end, window, qk_scale,
                                          scale, MASK, BLOCK_N, False, SOFTCAP)
        # Edge blocks: those before the shared range (window edge) and after it (diagonal,
        # partial last block), walked as one loop so their code is emitted once.
        n_head = (full_lo - start) // BLOCK_N
        n_edge = n_head + tl.cdiv(end - full_hi, BLOCK_N)
        for j in range(0, n_edge):
            n0 = tl.where(j < n_head, start + j * BLOCK_N, full_hi + (j - n_head) * BLOCK_N)
            n0 = tl.multiple_of(n0, BLOCK_N)
            k = _kv_tile(blocks_ptr, desc, lut_ptr, b, kvh, n0, end, max_pages, layer_idx,
                         num_layers, num_pages, 0, NKV, D, PAGE_SIZE, BLOCK_N, USE_TMA, True)
            v = _kv_tile(blocks_ptr, desc, lut_ptr, b, kvh, n0, end, max_pages, layer_idx,
                         num_layers, num_pages, 1, NKV, D, PAGE_SIZE, BLOCK_N, USE_TMA, True)
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qp, n0, end, window, qk_scale,
                                          scale, MASK, BLOCK_N, True, SOFTCAP)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        # The output rows' offsets are worked out again here from two scalars rather than kept
        # from the q load: kept across the loops, they are 8 int64 per thread that spill at a
        # 128-register cap.
        r = tl.arange(0, BLOCK_M)
        o_rows = (o_row0 + r).to(tl.int64) * (NH * D) + h * D
        tl.store(out_ptr + o_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(r < o_left)[:, None])


def check_scale(scale: float) -> None:
    """The mask-free blocks take the row max before scaling, which needs scale >= 0."""
    if not scale >= 0:
        raise ValueError(f"flash attention needs a softmax scale >= 0, got {scale}")


def runnable_config(cfg: dict, head_dim: int, page_size: int, mask, dtype: str, tma_ok: bool,
                    softcap: float | None) -> dict:
    """`cfg`, or the built-in Triton default where the warp-specialized kernel cannot serve
    the call: no soft-cap, 16-bit data, pages holding whole key blocks, a cache whose rows
    TMA can address, and not the chunked mask (whose per-element division spills the
    consumers' registers). (A tuner's table names configs per bucket of facts that leave these
    out.)"""
    if is_ws(cfg) and (check_softcap(softcap) or dtype in ("float32", "fp32") or not tma_ok
                       or not uses_tma(cfg, page_size) or mask_id(mask) == 4):
        return default_config(head_dim, page_size, mask, dtype)
    return cfg


def grid_rule(BLOCK_M: int, NH: int):
    """Grid (query blocks, heads, sequences): a head's query blocks run side by side."""
    return lambda batch, max_seq_len: (max(1, cdiv(max_seq_len, BLOCK_M)), NH, batch)


def _constexprs(n_heads, n_kv_heads, head_dim, page_size, mask, cfg, tma_ok: bool,
                softcap: float | None = None) -> dict:
    return dict(NH=n_heads, NKV=n_kv_heads, D=head_dim, PAGE_SIZE=page_size, MASK=mask_id(mask),
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                USE_TMA=int(tma_ok and uses_tma(cfg, page_size)), SOFTCAP=check_softcap(softcap),
                LPT=int(cfg.get("LPT", 0)), **({"DYN": 1} if cfg.get("DYN") else {}))


def launch_options(cfg: dict) -> dict:
    """num_warps / num_stages (and maxnreg when the config caps registers) of a launch."""
    out = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if cfg.get("maxnreg"):
        out["maxnreg"] = cfg["maxnreg"]
    return out


def flash_attention(q, input_row_offsets, cache_lengths, lookup_table, blocks, layer_idx: int,
                    mask="CAUSAL", window: int = 0, scale: float | None = None,
                    max_seq_len: int | None = None, block_m: int | None = None,
                    block_n: int | None = None, config: dict | None = None,
                    softcap: float | None = None, num_programs: int | None = None):
    """Ragged attention on torch tensors; q [T, NH, D] -> [T, NH*D].

    `config` is one of `CANDIDATES` (default: `default_config`); block_m / block_n override its
    tiles. `softcap` caps the scaled scores to softcap * tanh(s / softcap) (Gemma 2). A TMA
    config sets `triton.set_allocator` on the GPU (the descriptor is made on the device in
    Triton's global scratch). A persistent config launches at most `num_programs` programs
    (default NUM_SMS, as the plan does).
    """
    T, NH, D = q.shape
    num_layers, page_size, NKV, m = check_attention_args("flash_attention", q, blocks, mask, window)
    dtype = str(q.dtype).replace("torch.", "")
    cfg = dict(config or default_config(D, page_size, m, dtype))
    cfg.update({k: v for k, v in (("BLOCK_M", block_m), ("BLOCK_N", block_n)) if v})
    check_config(cfg, D)
    scale = float(D ** -0.5 if scale is None else scale)
    check_scale(scale)
    tma_ok = blocks.numel() // (NKV * D) <= TMA_MAX_ROWS
    cfg = runnable_config(cfg, D, page_size, m, dtype, tma_ok, softcap)
    if is_ws(cfg) and not q.is_cuda:  # Gluon has no interpreter: its twin runs there
        cfg = twin_config(cfg)
    if is_ws(cfg):
        from graphir.lowering.triton_gpu.kernels.flash_attention_wgmma import (
            flash_prefill_ws_kernel)
        kernel, tma = flash_prefill_ws_kernel, True
        cx, options = ws_constexprs(NH, NKV, D, page_size, m, cfg), {"num_warps": 4}
    else:
        kernel, tma = flash_prefill_kernel, uses_tma(cfg, page_size) and tma_ok
        cx = _constexprs(NH, NKV, D, page_size, m, cfg, tma_ok, softcap)
        options = launch_options(cfg)
    if cfg.get("PERSISTENT"):
        from graphir.lowering.triton_gpu.kernels import flash_attention_persistent as fp
        kernel, cx = fp.persistent_kernel(kernel, cx)
    return launch(kernel, q, input_row_offsets, cache_lengths, lookup_table, blocks, layer_idx,
                  window, scale, max_seq_len, cfg["BLOCK_M"], cx, tma,
                  programs=(num_programs or NUM_SMS) if cfg.get("PERSISTENT") else None,
                  **options)


def launch(kernel, q, input_row_offsets, cache_lengths, lookup_table, blocks, layer_idx: int,
           window: int, scale: float, max_seq_len: int | None, block_m: int, constexprs: dict,
           tma: bool, programs: int | None = None, **options):
    """Launch a prefill kernel with this module's arguments (flash_prefill_kernel or the Gluon
    kernels of flash_attention_wgmma.py) on torch tensors; returns out [T, NH*D]. `tma` sets
    `triton.set_allocator` on the GPU (a device-made descriptor lives in Triton's global
    scratch); without max_seq_len the longest sequence is read back from the device. With
    `programs`, a persistent kernel (flash_attention_persistent.py) on at most that many."""
    import torch

    T, NH, D = q.shape
    if q.is_cuda and tma:
        torch_global_scratch(q.device)
    batch = input_row_offsets.shape[0] - 1
    if max_seq_len is None:  # a host sync; callers that know it pass it
        offs = input_row_offsets.to(torch.int64)
        max_seq_len = int((offs[1:] - offs[:-1]).max()) if batch else 0
    out = q.new_empty((T, NH * D))
    if T == 0 or batch == 0:
        return out
    as_i32 = lambda x: x.contiguous().view(torch.int32) if x.dtype == torch.uint32 else x
    extra = ()
    grid = grid_rule(block_m, NH)(batch, max_seq_len)
    if programs is not None:
        from graphir.lowering.triton_gpu.kernels import flash_attention_persistent as fp
        grid = fp.grid_rule(block_m, NH, programs)(batch, max_seq_len)
        extra = (grid_rule(block_m, NH)(batch, max_seq_len)[0], batch,   # n_m, n_b, sched_ptr
                 zeroed_counter(q.device) if constexprs.get("DYN") else None)
    kernel[grid](
        q.contiguous(), as_i32(input_row_offsets), as_i32(cache_lengths), as_i32(lookup_table),
        blocks, out, lookup_table.shape[1], layer_idx, blocks.shape[2], blocks.shape[0],
        max(window, 1), scale, T, *extra, **constexprs, **options)
    return out


SIGNATURE_PARAMS = ("q_ptr", "offs_ptr", "cache_len_ptr", "lut_ptr", "blocks_ptr", "out_ptr",
                    "max_pages", "layer_idx", "num_layers", "num_pages", "window", "scale", "T")


def aot_specs(n_heads: int, n_kv_heads: int, head_dim: int, page_size: int,
              dtype: str = "bfloat16", mask="CAUSAL", config: dict | None = None,
              softcap: float | None = None) -> list[KernelSpec]:
    """One specialization per (model shape, mask, config, softcap); window and scale stay
    runtime values. A softcap kernel takes the config of its uncapped twin (the tuner's facts do
    not name the cap) and carries "_softcap" in its name, the cap itself in its constexprs.

    Example:
        >>> (s,) = aot_specs(32, 8, 128, 128, mask="CAUSAL")
        >>> s.grid_for(batch=2, max_seq_len=300)
        (3, 32, 2)
    """
    t = triton_dtype(dtype)
    base = default_config(head_dim, page_size, mask, dtype)
    cfg = {k: v for k, v in (config or base).items() if k != "name"}
    check_config(cfg, head_dim)
    sig = dict(zip(SIGNATURE_PARAMS, [f"*{t}", "*i32", "*i32", "*i32", f"*{t}", f"*{t}", "i32",
                                      "i32", "i32", "i32", "i32", "fp32", "i32"]))
    # The cache's row count is a runtime value; rows of >= 128 bytes keep it below 2**31 for
    # any cache under 256 GiB, smaller rows fall back to pointer tiles.
    row_bytes = n_kv_heads * head_dim * DTYPE_BYTES[t]
    cfg = runnable_config(cfg, head_dim, page_size, mask, dtype,
                          row_bytes >= TMA_MIN_ROW_BYTES, softcap)
    if is_ws(cfg):
        return [_persistent(cfg, _ws_spec(n_heads, n_kv_heads, head_dim, page_size, dtype,
                                          mask, cfg, sig))]
    cx = _constexprs(n_heads, n_kv_heads, head_dim, page_size, mask, cfg,
                     row_bytes >= TMA_MIN_ROW_BYTES, softcap)
    sig.update({n: "constexpr" for n in cx})
    # The built-in default keeps the plain name; other configs carry their tag.
    tag = "" if config_tag(cfg) == config_tag(base) else \
        "_" + config_tag(dict(cfg, USE_TMA=cx["USE_TMA"]))
    cap = "_softcap" if cx["SOFTCAP"] else ""
    return [_persistent(cfg, KernelSpec(
        name=f"flash_attention_{t}_mask{mask_id(mask)}{tag}{cap}", fn=flash_prefill_kernel,
        signature=sig, constexprs=cx, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        grid=grid_rule(cfg["BLOCK_M"], n_heads), grid_args=("batch", "max_seq_len"),
        divisible_by_16=("q_ptr", "blocks_ptr", "out_ptr"),
        notes="window must be >= 1 (pass 1 for masks without a window); num_pages is the "
              "blocks' first dimension, T the rows of q"
              + ("; makes a TMA descriptor in global scratch" if cx["USE_TMA"] else ""),
        extra={"config": cfg}, maxnreg=cfg.get("maxnreg")))]


def _persistent(cfg: dict, spec: KernelSpec) -> KernelSpec:
    """`spec`, or its persistent form for a PERSISTENT config (flash_attention_persistent.py)."""
    if not cfg.get("PERSISTENT"):
        return spec
    from graphir.lowering.triton_gpu.kernels.flash_attention_persistent import as_persistent
    return as_persistent(spec)


def plan_launch(spec: KernelSpec, batch: str, seqmax: str) -> tuple[list, list]:
    """(grid, trailing arguments) of a prefill spec's launch as plan expressions over the
    sequences and the longest sequence's new tokens: (query blocks, heads, sequences) and none
    for the one-tile kernels (grid_rule); one program per SM (at most) and (n_m, n_b) for the
    persistent ones."""
    n_m, tiles = _plan_tiles(spec, batch, seqmax)
    if "n_m" not in spec.signature:
        return [n_m, spec.constexprs["NH"], batch], []
    return [f"min({tiles}, {NUM_SMS})", 1, 1], [n_m, batch]


def tile_bound(spec: KernelSpec, batch: str, seqmax: str) -> str | None:
    """The plan condition under which a persistent spec's int32 tile numbers (query blocks x
    heads x sequences) do not wrap; None for the one-tile kernels (no such count)."""
    if "n_m" not in spec.signature:
        return None
    return f"{_plan_tiles(spec, batch, seqmax)[1]} < {2 ** 31}"


def _plan_tiles(spec: KernelSpec, batch: str, seqmax: str) -> tuple[str, str]:
    """(query blocks of the longest sequence, tiles) as plan expressions."""
    n_m = f"max(1, cdiv({seqmax}, {spec.constexprs['BLOCK_M']}))"
    return n_m, f"{n_m} * {spec.constexprs['NH']} * ({batch})"


def one_tile_config(cfg: dict) -> dict:
    """A persistent config's one-tile form (the same tiles, one program a tile; the forms only
    the persistent kernels have dropped)."""
    return {k: v for k, v in cfg.items() if k not in ("PERSISTENT", *PERSISTENT_FLAGS, "name")}


_COUNTERS: dict = {}


def zeroed_counter(device):
    """The DYN kernels' tile counter on `device` for launches on torch tensors: int32 x 2,
    zeroed once; each launch leaves it zero (flash_attention_persistent.py), and the launches
    on one device run in stream order (tests and sweeps)."""
    import torch

    key = str(device)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def _ws_spec(n_heads, n_kv_heads, head_dim, page_size, dtype, mask, cfg, sig) -> KernelSpec:
    """The warp-specialized Gluon kernel's spec; `extra["twin"]` is the Triton kernel at the
    same tiles (same arguments), which Triton's interpreter runs in its place (Gluon has no
    interpreter)."""
    from graphir.lowering.triton_gpu.kernels.flash_attention_wgmma import (
        flash_prefill_ws_kernel)

    t = triton_dtype(dtype)
    cx = ws_constexprs(n_heads, n_kv_heads, head_dim, page_size, mask, cfg)
    (twin,) = aot_specs(n_heads, n_kv_heads, head_dim, page_size, dtype, mask, twin_config(cfg))
    return KernelSpec(
        name=f"flash_attention_{t}_mask{mask_id(mask)}_{config_tag(cfg)}", fn=flash_prefill_ws_kernel,
        signature={**sig, **{n: "constexpr" for n in cx}}, constexprs=cx, num_warps=4,
        num_stages=1, grid=grid_rule(cfg["BLOCK_M"], n_heads),
        grid_args=("batch", "max_seq_len"), divisible_by_16=("q_ptr", "blocks_ptr", "out_ptr"),
        notes="window must be >= 1 (pass 1 for masks without a window); num_pages is the "
              "blocks' first dimension, T the rows of q; makes a TMA descriptor in global "
              "scratch; launches 12 warps (two consumer warpgroups and a loader warp)",
        extra={"config": cfg, "twin": twin})


def twin_config(cfg: dict) -> dict:
    """The Triton kernel's config at a WS config's tiles and tile order (what Triton's
    interpreter runs in the Gluon kernel's place)."""
    twin = {k: v for k, v in cfg.items() if k not in (*GLUON_FLAGS, "name")}
    return {**twin, "num_warps": 8, "num_stages": 2}


def ws_constexprs(n_heads, n_kv_heads, head_dim, page_size, mask, cfg) -> dict:
    """The warp-specialized Gluon kernel's constexprs for a WS config."""
    from graphir.lowering.triton_gpu.kernels.flash_attention_wgmma import CONSUMER_REGS

    return dict(NH=n_heads, NKV=n_kv_heads, D=head_dim, PAGE_SIZE=page_size, MASK=mask_id(mask),
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], STAGES=cfg["num_stages"],
                CONSUMER_REGS=CONSUMER_REGS, PINGPONG=int(cfg.get("PINGPONG", 0)),
                LPT=int(cfg.get("LPT", 0)), **{k: 1 for k in PERSISTENT_FLAGS if cfg.get(k)})
