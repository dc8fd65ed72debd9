"""CUDA lowering of flash_attention_ragged: the split-K paged decode kernels when every sequence
has at most a few new tokens (decode, speculative decode), the ragged flash kernel otherwise
(decided per call from the offsets). A softcap (Gemma 2's logit soft-capping) is a constexpr of
both kernels: each capped kernel runs the config the tuner chose for its uncapped twin (the
tuner's facts leave the cap out; the cap costs a few fp32 ops per score, the tiles stay the same).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from graphir.lowering.registry import register_lowering
from graphir.lowering.triton_gpu import tuning
from graphir.lowering.triton_gpu.kernels import flash_attention as fa
from graphir.lowering.triton_gpu.kernels import flash_attention_tuning as fat
from graphir.lowering.triton_gpu.kernels import paged_decode as pd
from graphir.lowering.triton_gpu.kernels import paged_decode_config as pdc
from graphir.lowering.triton_gpu.kernels import paged_decode_tuning as pdt

from .base import StepBuilder, e
from .common import MM_DTYPES, cache_dims, pow2_head_dim

DECODE_KV_BUCKET = pdt.KV_BUCKET  # decode launches change every 256 tokens: graphs replay between
MAX_DECODE_KERNELS = 6   # decode kernels (cubins) of one attention step, every query tile
_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class AttentionCall:
    """What both attention paths need: the node's operands as plan arguments and its sizes."""

    nh: int
    nkv: int
    d: int
    page: int
    dtype: str
    mask: str
    T: str          # expression: total new tokens
    batch: str      # expression: sequences in the batch
    seqmax: str     # runtime fact: the most new tokens of any sequence
    kvmax: str      # runtime fact: the longest cache + new tokens
    common: list    # q, offsets, cache lengths, lookup table, blocks
    tail: list      # max_pages, layer, num_layers, window, scale
    out: object
    num_pages: str = "1"  # expression: pages in the cache (the decode kernel's TMA bound)
    softcap: float | None = None  # Gemma 2's logit cap of the scaled scores, None: off


@register_lowering("flash_attention_ragged", "cuda")
def _flash_attention(sb: StepBuilder, node) -> None:
    q, blocks, offs, clen, lut = node.operands[:5]
    a = node.attrs
    nh, nkv, d = a["n_heads"], a["n_kv_heads"], a["head_dim"]
    pow2_head_dim(d, node.op, 16)
    page, _, _ = cache_dims(blocks, node.op)
    dt = q.type.dtype
    if dt not in MM_DTYPES or blocks.type.dtype != dt:
        raise ValueError(f"gir.flash_attention_ragged on cuda needs q and blocks of one float "
                         f"dtype, got {dt.short} and {blocks.type.dtype.short}")
    window = int(a.get("window") or 1)
    call = AttentionCall(
        nh=nh, nkv=nkv, d=d, page=page, dtype=MM_DTYPES[dt], mask=a["mask"].upper(),
        T=e(q.type.shape[0]), batch=e(offs.type.shape[0] - 1),
        seqmax=sb.seq_max(sb.vid(offs)),
        kvmax=sb.kv_max(sb.vid(offs), sb.vid(clen), bucket=DECODE_KV_BUCKET),
        common=[sb.ptr(q), sb.ptr(offs), sb.ptr(clen), sb.ptr(lut), sb.ptr(blocks)],
        tail=[e(lut.type.shape[1]), a["layer"], e(blocks.type.shape[2]), window,
              float(a["scale"])],
        out=node.results[0], num_pages=e(blocks.type.shape[0]), softcap=a.get("softcap"))
    lower_decode(sb, call)  # its variants come first: few new tokens per sequence
    lower_prefill(sb, call)  # its own variants, the last one unconditional


def lower_decode(sb: StepBuilder, c: AttentionCall) -> None:
    """Every sequence has at most q_tiles(...)[-1] new tokens: decode kernels per query tile (the
    smallest tile that holds seqmax tokens wins) and, within a tile, per bucket of (batch x KV
    heads, bucketed context) the config the tuner chose (kernels/paged_decode_tuning.py; tuned
    on this GPU with tune=True, else the shipped table, else the built-in default), at most
    MAX_DECODE_KERNELS kernels in all. Each runs split-K partials plus a reduce (or, for a
    MERGE config, whose last program per group merges them), or alone, writing the output,
    when the split rule keeps one partition. Every condition reads the
    batch and the bucketed facts only, so one CUDA graph per key still replays."""
    sb.let("kv_len", f"cdiv(max({c.kvmax}, 1), {DECODE_KV_BUCKET}) * {DECODE_KV_BUCKET}")
    args = c.tail[:3] + [c.num_pages] + c.tail[3:]
    units = f"({c.batch}) * {c.nkv}"
    tiles = pdc.q_tiles(c.nh, c.nkv)
    split_of: dict[tuple, str] = {}
    for n, q in enumerate(tiles):
        facts = pdt.make_facts(_SHORT[c.dtype], c.nh, c.nkv, c.d, c.page, q, c.mask, c.tail[3])
        choices = tuning.select("decode", facts, f"{sb.op} -> %{sb.outputs[0]} (q<={q})")
        # The one-token tile gets what the taller (speculative) tiles leave: one kernel each.
        pdt.limit_kernels(choices, MAX_DECODE_KERNELS - (len(tiles) - 1) if n == 0 else 1, facts)
        for cond, ch in pdt.plan_variants(choices, units, "kv_len"):
            conf = ch.config
            main, reduce = pd.aot_specs(c.nh, c.nkv, c.d, c.page, c.dtype, c.mask, q_per_seq=q,
                                        config=conf, softcap=c.softcap)
            key = pdc.split_key(conf)
            if key not in split_of:
                # paged_decode_config.split(batch, nkv, kv_len, conf), written as data.
                split_of[key] = p = f"pd{len(split_of)}_"
                for name, expr in pdc.split_lets(c.batch, c.nkv, "kv_len", conf, prefix=p):
                    sb.let(name, expr)
            p = split_of[key]
            parts, size = f"{p}num_parts", f"{p}part_size"
            grid = [f"{c.batch} * {c.nkv // conf['HEADS']} * {parts}"]
            km = sb.kernel(main)
            base = f"{c.seqmax} <= {q}" + (f" and {cond}" if cond else "")
            with sb.when(f"{base} and {parts} == 1"):
                sb.launch(km, grid, c.common + [sb.ptr(c.out), ["n"], ["n"], ["n"]] + args
                          + [size, parts])
            with sb.when(base):
                o_part = sb.scratch("o_part", "float32", f"{c.T} * {c.nh} * {parts} * {c.d}")
                ml_part = sb.scratch("ml_part", "float32", f"{c.T} * {c.nh} * {parts} * 2")
                # A MERGE config's group tickets (the last program of a group merges): zero
                # when allocated, left zero by every launch.
                count = (sb.scratch("part_count", "int32", f"({c.batch}) * {c.nkv}")
                         if conf["MERGE"] else ["n"])
                sb.launch(km, grid, c.common + [sb.ptr(c.out), o_part, ml_part, count] + args
                          + [size, parts])
                if not conf["MERGE"]:
                    sb.launch(sb.kernel(reduce), [f"{c.T} * {c.nh}"],
                              [o_part, ml_part, sb.ptr(c.out), parts])


def lower_prefill(sb: StepBuilder, c: AttentionCall, config: dict | None = None) -> None:
    """Ragged prefill (and chunked prefill over a cached prefix): the flash kernel, one plan
    variant per tuner bucket of batch x query tiles (kernels/flash_attention_tuning.py; tuned
    on this GPU with tune=True, else the shipped table, else the built-in default), the last
    one unconditional; `config` forces one config for every call."""
    fa.check_scale(c.tail[-1])
    args = c.common + [sb.ptr(c.out)] + c.tail[:3] + [c.num_pages] + c.tail[3:] + [c.T]
    if config is not None:
        variants = [(None, config)]
    else:
        facts = fat.make_facts(_SHORT[c.dtype], c.nh, c.nkv, c.d, c.page, c.mask, c.tail[3])
        choices = tuning.select("prefill", facts, f"{sb.op} -> %{sb.outputs[0]} (prefill)")
        if fa.check_softcap(c.softcap):
            # The warp-specialized kernel has no soft-cap: its bucket's fallback runs instead
            # (the fastest Triton config measured there).
            choices = [replace(ch, config=ch.fallback) if ch.fallback else ch for ch in choices]
        variants = [(cond, ch.config)
                    for cond, ch in fat.plan_variants(choices, c.batch, c.seqmax)]
    while variants:
        cond, conf = variants.pop(0)
        (spec,) = fa.aot_specs(c.nh, c.nkv, c.d, c.page, c.dtype, c.mask, config=conf,
                               softcap=c.softcap)
        # Query blocks x heads x sequences, or one program per SM for a persistent config,
        # which also takes the query blocks of the longest sequence and the sequences.
        grid, tail = fa.plan_launch(spec, c.batch, c.seqmax)
        bound = fa.tile_bound(spec, c.batch, c.seqmax)
        if bound and cond is None:
            # A call of 2**31 tiles or more (tens of thousands of sequences) runs the one-tile
            # form of the same config: the persistent kernels number the tiles in int32.
            cond = bound
            variants.append((None, fa.one_tile_config(conf)))
        with sb.when(cond):
            if spec.signature.get("sched_ptr") == "*i32":
                # A DYN config's tile counter: zero when allocated, left zero by each launch.
                tail = tail + [sb.scratch("tile_counter", "int32", 2)]
            sb.launch(sb.kernel(spec), grid, args + tail)
