"""Benchmark: DeepSeek's latent attention layer (LatentAttentionWithRope, f32) compiled for the
CPU vs the same layer in torch CPU eager, in one run.

Run: .venv/bin/python tools/bench_cpu_mla.py [--batch 8] [--context 1024] [--prefill 512]

The layer is DeepSeek-V2-Lite shaped by default (hidden 2048, 16 heads, no q LoRA, kv_lora_rank
512, qk nope/rope head dims 128/64, v head dim 128; --hidden/--heads/--q-lora for others),
interleaved RoPE, 128-token pages, graph_mode "auto" (a step of one new token per sequence takes
the absorbed form, a prefill the decompressed one). The torch peer is the strongest plain eager
form of each path on a contiguous latent cache `[batch, max_len, 576]` (no page gather): decode
absorbed (q_nope through w_uk by one bmm, scores against the 512 latent columns plus the rope
part, softmax, latent output through w_uv), prefill decompressed (K and V projected from the
latent rows by one matmul each, SDPA with the causal mask). Both start from the same cache
contents and weights; each round times every contender once (so load from other processes hits
them alike). Prints best / median ms, the ratio graphir / torch of the best times, and the max
relative difference of the outputs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PAGE, NOPE, ROPE, V, R, THETA, MAX_SEQ = 128, 128, 64, 128, 512, 10000.0, 16384


def _layer(hidden: int, heads: int, q_lora: int | None):
    from graphir import DeviceRef, DType, Graph, TensorType
    from graphir.nn import KVCacheParams, LatentAttentionWithRope, PagedCacheValues, RotaryEmbedding

    dev = DeviceRef.CPU()
    rope = RotaryEmbedding(ROPE * heads, heads, THETA, MAX_SEQ, head_dim=ROPE, interleaved=True,
                           device=dev)
    kvp = KVCacheParams(dtype=DType.float32, n_kv_heads=1, head_dim=R + ROPE, num_layers=1,
                        page_size=PAGE, devices=(dev,))
    attn = LatentAttentionWithRope(
        rope=rope, num_attention_heads=heads, num_key_value_heads=heads, hidden_size=hidden,
        kv_params=kvp, dtype=DType.float32, devices=[dev], q_lora_rank=q_lora, kv_lora_rank=R,
        qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V)
    types = [TensorType(DType.float32, ["total_seq_len", hidden], dev),
             TensorType(DType.uint32, ["batch + 1"], dev)] + kvp.input_types(dev)
    with Graph("mla", input_types=types) as g:
        x, offs, blocks, clen, lut, maxl = g.inputs
        g.output(attn(0, x, PagedCacheValues(blocks, clen, lut, maxl), rope.freqs_cis, offs))
    return attn, g


def _weights(attn, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in attn.raw_state_dict().items():
        shape = tuple(int(d) for d in v.shape)
        w = rng.standard_normal(shape) / np.sqrt(shape[-1]) if len(shape) > 1 else \
            1.0 + 0.1 * rng.standard_normal(shape)
        out[k] = w.astype(np.float32)
    return out


class TorchMLA:
    """The same layer in torch eager over a contiguous latent cache [batch, max_len, R + ROPE];
    every sequence of a call brings the same number of new tokens at the same cache length."""

    def __init__(self, w: dict, freqs: np.ndarray, heads: int, q_lora: int | None, scale: float):
        import torch

        self.torch, self.nh, self.scale = torch, heads, scale
        t = {k: torch.from_numpy(v) for k, v in w.items()}
        self.q_lora = q_lora
        if q_lora is None:
            self.wqkv = torch.cat([t["q_proj.weight"], t["kv_a_proj_with_mqa.weight"]])
        else:
            self.wqkv = torch.cat([t["q_a_proj.weight"], t["kv_a_proj_with_mqa.weight"]])
            self.q_norm, self.wq_b = t["q_a_layernorm.weight"], t["q_b_proj.weight"]
        self.kv_norm = t["kv_a_layernorm.weight"]
        kvb = t["kv_b_proj.weight"].view(heads, NOPE + V, R)
        self.w_uk = kvb[:, :NOPE].contiguous()                  # [NH, nope, R]
        self.w_uv = kvb[:, NOPE:].transpose(1, 2).contiguous()   # [NH, R, V]
        self.w_k = kvb[:, :NOPE].reshape(heads * NOPE, R).contiguous()
        self.w_v = kvb[:, NOPE:].reshape(heads * V, R).contiguous()
        self.wo = t["o_proj.weight"]
        f = torch.from_numpy(freqs)
        self.cos, self.sin = f[:, 0::2], f[:, 1::2]

    def _rope(self, x, pos):   # interleaved pairs (x[2i], x[2i+1]); x [..., tokens, heads, 64]
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]
        a, b = x[..., 0::2], x[..., 1::2]
        return self.torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)

    def _rms(self, x, w):
        return x * self.torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def __call__(self, x, cache, cached: int, batch: int):
        torch, nh = self.torch, self.nh
        n = x.shape[0] // batch
        f = torch.nn.functional.linear(x, self.wqkv)
        q, kv = f.split([f.shape[1] - R - ROPE, R + ROPE], dim=1)
        if self.q_lora is not None:
            q = torch.nn.functional.linear(self._rms(q, self.q_norm), self.wq_b)
        pos = cached + torch.arange(n).repeat(batch)
        q = q.view(batch * n, nh, NOPE + ROPE)
        q_nope, q_pe = q[..., :NOPE], self._rope(q[..., NOPE:], pos)
        cache[:, cached:cached + n, :R] = self._rms(kv[:, :R], self.kv_norm).view(batch, n, R)
        cache[:, cached:cached + n, R:] = self._rope(kv[:, None, R:], pos).view(batch, n, ROPE)
        total = cached + n
        c, pe = cache[:, :total, :R], cache[:, :total, R:]
        if n == 1:     # absorbed
            q_lat = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # [B, NH, R]
            s = torch.baddbmm(torch.bmm(q_pe.view(batch, nh, ROPE), pe.transpose(1, 2)),
                              q_lat, c.transpose(1, 2)) * self.scale
            o_lat = torch.bmm(torch.softmax(s, dim=-1), c)                        # [B, NH, R]
            o = torch.bmm(o_lat.transpose(0, 1), self.w_uv).transpose(0, 1)      # [B, NH, V]
        else:          # decompressed
            k_nope = torch.nn.functional.linear(c, self.w_k).view(batch, total, nh, NOPE)
            v = torch.nn.functional.linear(c, self.w_v).view(batch, total, nh, V)
            k = torch.cat([k_nope, pe[:, :, None, :].expand(batch, total, nh, ROPE)], dim=-1)
            qq = torch.cat([q_nope, q_pe], dim=-1).view(batch, n, nh, NOPE + ROPE)
            mask = torch.arange(total)[None, :] <= (cached + torch.arange(n))[:, None]
            o = torch.nn.functional.scaled_dot_product_attention(
                qq.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                scale=self.scale).transpose(1, 2)
        return torch.nn.functional.linear(o.reshape(batch * n, nh * V), self.wo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--q-lora", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", default="cpu", help="cpu (this host) or e.g. cpu:x86-64:avx2")
    ap.add_argument("--compile", default="max-autotune",
                    help="torch.compile mode of the torch layer as a second peer, or none")
    args = ap.parse_args()
    os.environ.setdefault("GRAPHIR_NUM_THREADS", str(args.threads))
    load_before = os.getloadavg()[0]

    import torch

    from graphir.lowering.driver import compile_graph
    from graphir.lowering.mlir_cpu.cpu_target import host_cpu
    from graphir.ops.rope_math import rope_freqs_cis
    from graphir.runtime.session import InferenceSession
    from graphir.tools.bench_mlir_matmul import interleaved_times

    torch.set_num_threads(args.threads)
    attn, g = _layer(args.hidden, args.heads, args.q_lora)
    w = _weights(attn, seed=0)
    with tempfile.TemporaryDirectory(prefix="graphir-bench-mla-") as tmp:
        os.environ["GRAPHIR_CACHE_DIR"] = tmp
        art = compile_graph(g, args.target)
        model = InferenceSession().load(art, weights=w)
    ref = TorchMLA(w, rope_freqs_cis(ROPE, MAX_SEQ, THETA), args.heads, args.q_lora, attn.scale)

    rng = np.random.default_rng(1)
    rows = []
    for name, batch, n, cached in (("decode", args.batch, 1, args.context),
                                   ("prefill", 1, args.prefill, 0)):
        total = cached + n
        per_seq = -(-total // PAGE)
        n_pages = batch * per_seq + 1
        blocks = rng.standard_normal((n_pages, 2, 1, PAGE, 1, R + ROPE)).astype(np.float32)
        lut = np.arange(batch * per_seq, dtype=np.uint32).reshape(batch, per_seq)
        # The torch cache holds what the pages hold, in order.
        dense = blocks[:, 0, 0, :, 0][lut.reshape(-1)].reshape(batch, per_seq * PAGE, R + ROPE)
        offs = (np.arange(batch + 1) * n).astype(np.uint32)
        clen = np.full(batch, cached, np.uint32)
        maxl = np.array([[n, total]], np.uint32)
        x = rng.standard_normal((batch * n, args.hidden)).astype(np.float32)
        tx, tc = torch.from_numpy(x), torch.from_numpy(dense.copy())
        ours = blocks.copy()
        with torch.no_grad():
            want = ref(tx, tc, cached, batch).numpy()
            reps = args.reps if name == "prefill" else 4 * args.reps
            fns = [lambda: model.execute(x, offs, ours, clen, lut, maxl),
                   lambda: ref(tx, tc, cached, batch)]
            c_err = None
            if args.compile != "none":   # the same torch layer, one graph for these shapes
                torch._dynamo.reset()
                compiled = torch.compile(lambda a, c, k=cached, b=batch: ref(a, c, k, b),
                                         mode=args.compile, fullgraph=True, dynamic=False)
                got_c = compiled(tx, tc).numpy()
                c_err = float(np.abs(got_c - want).max() / np.abs(want).max())
                fns.append(lambda: compiled(tx, tc))
            t_ours, t_torch, *t_comp = interleaved_times(fns, reps)
        (got,) = model.execute(x, offs, blocks.copy(), clen, lut, maxl)
        err = float(np.abs(got - want).max() / np.abs(want).max())
        rows.append((f"{name}, batch {batch} x {n} new at context {cached}", t_ours, t_torch, err,
                     (t_comp[0], c_err) if t_comp else None))

    print(f"{art.target} ({host_cpu().model}), {args.threads} threads; load average "
          f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"LatentAttentionWithRope hidden {args.hidden}, {args.heads} heads, q_lora "
          f"{args.q_lora}, kv_lora {R}, nope/rope/v {NOPE}/{ROPE}/{V}, f32")
    print("case | graphir ms best / median | torch ms best / median | graphir / torch (best) | "
          "max rel diff" + (f" | torch.compile({args.compile}) ms best / median | graphir / "
                            "compiled | its rel diff" if args.compile != "none" else ""))
    for name, to, tt, err, comp in rows:
        tail = (f" | {min(comp[0]) * 1e3:.2f} / {np.median(comp[0]) * 1e3:.2f} | "
                f"{min(to) / min(comp[0]):.2f} | {comp[1]:.1e}") if comp else ""
        print(f"{name} | {min(to) * 1e3:.2f} / {np.median(to) * 1e3:.2f} | "
              f"{min(tt) * 1e3:.2f} / {np.median(tt) * 1e3:.2f} | {min(to) / min(tt):.2f} | "
              f"{err:.1e}{tail}")


if __name__ == "__main__":
    main()
