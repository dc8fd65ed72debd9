"""Ragged paged-attention problems and a float32 torch reference for the GPU prefill kernels:
shared by tests/gpu/test_flash_wgmma_gpu.py and tools/gpu_sweeps/attention_wgmma.py.

The problem is what chunked prefill over a paged cache looks like: sequences of uneven lengths
with cached prefixes, pages in shuffled order, and NaN in every cache slot past a sequence's
length (a kernel that multiplies them, even by a probability of 0, answers NaN).
"""
from __future__ import annotations

import torch


def torch_reference(q, offs, clen, lut, blocks, mask, window, scale):
    """float32 attention of each sequence over its pages ([T, NH*D]); masks as the kernels
    name them, `window` for the windowed and chunked ones."""
    T, NH, D = q.shape
    _, _, _, P, NKV, _ = blocks.shape
    out = torch.empty(T, NH * D, device=q.device, dtype=torch.float32)
    for b in range(offs.numel() - 1):
        s0, s1, c = int(offs[b]), int(offs[b + 1]), int(clen[b])
        n = c + s1 - s0
        pos = torch.arange(n, device=q.device)
        pages = lut[b, pos // P].long()
        k = blocks[pages, 0, 0, pos % P].float()   # [n, NKV, D]
        v = blocks[pages, 1, 0, pos % P].float()
        qq = q[s0:s1].float()
        qp = c + torch.arange(s1 - s0, device=q.device)
        allow = torch.ones(s1 - s0, n, dtype=torch.bool, device=q.device)
        if mask != "NULL" and mask != "SLIDING_WINDOW_NONCAUSAL":
            allow &= pos[None, :] <= qp[:, None]
        if mask in ("SLIDING_WINDOW_CAUSAL", "SLIDING_WINDOW_NONCAUSAL"):
            allow &= pos[None, :] > qp[:, None] - window
        if mask == "CHUNKED_CAUSAL":
            allow &= pos[None, :] >= (qp[:, None] // window) * window
        rep = NH // NKV
        kx, vx = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = torch.einsum("thd,nhd->htn", qq, kx) * scale
        s = s.masked_fill(~allow[None], float("-inf"))
        o = torch.einsum("htn,nhd->thd", torch.softmax(s, -1), vx)
        out[s0:s1] = o.reshape(s1 - s0, NH * D)
    return out


def ragged_problem(D, dtype, page=128, seed=0, device="cuda"):
    """(q, input_row_offsets, cache_lengths, lookup_table, blocks): 4 sequences of 300, 129, 77
    and 1 new tokens after 0, 200, 513 and 1000 cached ones, NH 8 / NKV 2, one layer."""
    g = torch.Generator(device=device).manual_seed(seed)
    NH, NKV = 8, 2
    lens, cached = [300, 129, 77, 1], [0, 200, 513, 1000]
    per = [-(-(c + n) // page) + 1 for c, n in zip(cached, lens)]
    num_pages = sum(per) + 2
    blocks = torch.full((num_pages, 2, 1, page, NKV, D), float("nan"), device=device,
                        dtype=dtype)
    perm = torch.randperm(num_pages, device=device, generator=g)
    lut = torch.zeros(len(lens), max(per), dtype=torch.int32, device=device)
    i = 0
    for b, (c, n) in enumerate(zip(cached, lens)):
        lut[b, :per[b]] = perm[i:i + per[b]].int()
        i += per[b]
        pos = torch.arange(c + n, device=device)
        pages = lut[b, pos // page].long()
        for kv in range(2):
            blocks[pages, kv, 0, pos % page] = torch.randn(
                c + n, NKV, D, device=device, generator=g).to(dtype)
    offs = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32,
                        device=device)
    q = torch.randn(sum(lens), NH, D, device=device, generator=g).to(dtype)
    clen = torch.tensor(cached, dtype=torch.int32, device=device)
    return q, offs, clen, lut, blocks
