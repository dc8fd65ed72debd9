"""Shared pieces of the nn tests: building a layer graph over the paged cache and stepping it
through runtime.kv_cache with the reference interpreter."""
from __future__ import annotations

import numpy as np

from graphir import DeviceRef, DType, Graph, TensorType
from graphir.nn import AttentionWithRope, KVCacheParams, PagedCacheValues, RotaryEmbedding
from graphir.runtime.interpreter import run
from graphir.runtime.kv_cache import PagedKVCacheManager

HIDDEN, NH, NKV, D = 64, 4, 2, 16
PAGE, LAYERS, LAYER = 4, 2, 1  # the layer writes cache layer 1 of 2: layer 0 must stay untouched


def layer_graph(attn, rope, kv_params: KVCacheParams, *, name="layer", layer=LAYER,
                device=DeviceRef.CPU()) -> Graph:
    """Inputs: x, input_row_offsets, blocks, cache_lengths, lookup_table, max_lengths."""
    types = [TensorType(DType.float32, ["total_seq_len", attn.hidden_size], device),
             TensorType(DType.uint32, ["batch + 1"], device)] + kv_params.input_types(device)
    with Graph(name, input_types=types) as g:
        x, offs, blocks, clen, lut, maxl = g.inputs
        g.output(attn(layer, x, PagedCacheValues(blocks, clen, lut, maxl), rope.freqs_cis, offs))
    return g



def manager(n_kv_heads: int = NKV, pages: int = 24, head_dim: int = D) -> PagedKVCacheManager:
    m = PagedKVCacheManager(num_layers=LAYERS, n_kv_heads=n_kv_heads, head_dim=head_dim,
                            page_size=PAGE, total_num_pages=pages)
    # Fresh random contents everywhere: a kernel reading a slot it should not would show.
    m.blocks[...] = np.random.default_rng(99).standard_normal(m.blocks_shape).astype(np.float32)
    return m


def step(graph, m: PagedKVCacheManager, seq_ids, counts, x: np.ndarray, weights) -> np.ndarray:
    """Run one step of `graph` for sequences `seq_ids` with `counts` new rows in x."""
    st = m.prepare_step(seq_ids, counts)
    (y,) = run(graph, x, st.input_row_offsets, m.blocks, st.cache_lengths, st.lookup_table,
               st.max_lengths, weights=weights)
    m.commit_step(st)
    return y


# A ragged batch of 3 prefilled, 4 decode steps, then a second prefill chunk for sequence 1
# batched with a decode of sequence 2 (rows in a different order than claimed).
PREFILL = [5, 9, 3]
SCHEDULE = [([0, 1, 2], PREFILL)] + [([0, 1, 2], [1, 1, 1])] * 4 + [([2, 1], [1, 6])]


def interpreted(graph, m: PagedKVCacheManager, weights):
    """A `run_step` for check_schedule_against_hf: `graph` through the reference interpreter."""
    def run_step(st, x):
        (y,) = run(graph, x, st.input_row_offsets, m.blocks, st.cache_lengths, st.lookup_table,
                   st.max_lengths, weights=weights)
        return y
    return run_step


def check_schedule_against_hf(hf, run_step, m: PagedKVCacheManager, *, layer: int = LAYER,
                              scaled_atol: bool = False) -> None:
    """Run SCHEDULE (fresh token ids, seed 1) through `hf` and through `run_step(st, x)` (the
    layer's output for prepared step st), comparing every step's output; the cache layer the
    graph does not write stays untouched. `scaled_atol`: HF accumulating in float32, its
    rounding error grows with the output's magnitude (quantized weights)."""
    other = m.blocks[:, :, 1 - layer].copy()
    rng = np.random.default_rng(1)
    for seq_ids, counts in SCHEDULE:
        xs, ys = zip(*(hf.run(s, rng.integers(0, 97, size=n)) for s, n in zip(seq_ids, counts)))
        st = m.prepare_step(seq_ids, counts)
        got = run_step(st, np.concatenate(xs))
        m.commit_step(st)
        want = np.concatenate(ys)
        scale = np.abs(want).max()
        assert scale > 0.1  # the comparison is not between near-zero tensors
        np.testing.assert_allclose(got, want, rtol=1e-5,
                                   atol=1e-5 * (max(1.0, scale) if scaled_atol else 1.0))
    np.testing.assert_array_equal(m.blocks[:, :, 1 - layer], other)


def scheduled_manager(n_kv_heads: int, head_dim: int) -> PagedKVCacheManager:
    """A manager (24 pages) with SCHEDULE's first sequences claimed."""
    m = manager(n_kv_heads, head_dim=head_dim)
    for _ in SCHEDULE[0][0]:
        m.claim()
    return m


def attention(**opts):
    """(rope, kv_params, layer) of the test size; `il` picks interleaved RoPE, `cls` the class."""
    rope = RotaryEmbedding(HIDDEN, NH, 10000.0, 64, head_dim=D, interleaved=opts.pop("il", True))
    kvp = KVCacheParams(dtype=DType.float32, n_kv_heads=NKV, head_dim=D, num_layers=LAYERS,
                        page_size=PAGE)
    cls = opts.pop("cls", AttentionWithRope)
    return rope, kvp, cls(rope=rope, num_attention_heads=NH, num_key_value_heads=NKV,
                          hidden_size=HIDDEN, kv_params=kvp, **opts)


class HFAttentionRunner:
    """One Hugging Face model (CPU, float32) whose first layer's attention is hooked: `run`
    returns that attention's input (the normed hidden states) and output. Each sequence keeps
    its own cache in `caches`."""

    def __init__(self, config, seed: int, vector_scale: float):
        import torch  # imported here: only the tests against Hugging Face need it
        from transformers import AutoModel

        torch.manual_seed(seed)
        self.model = AutoModel.from_config(config, attn_implementation="eager").float().eval()
        self.attn = self.model.layers[0].self_attn
        with torch.no_grad():  # random everything, norms near 1 but not 1: a missing norm
            for name, p in self.attn.named_parameters():  # weight or bias would show
                p.copy_(torch.randn_like(p) * (0.15 if p.ndim == 2 else vector_scale)
                        + (1.0 if "norm" in name else 0.0))
        self.captured, self.caches = {}, {}
        self.attn.register_forward_pre_hook(self._pre, with_kwargs=True)
        self.attn.register_forward_hook(self._post, with_kwargs=True)

    def _pre(self, mod, args, kwargs):
        self.captured["x"] = kwargs["hidden_states"][0].detach().clone()

    def _post(self, mod, args, kwargs, out):
        self.captured["y"] = out[0][0].detach().clone()

    def attn_state_dict(self) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy().copy() for k, v in self.attn.state_dict().items()}

    def run(self, seq, ids) -> tuple[np.ndarray, np.ndarray]:
        """(attention input, attention output) of the next tokens `ids` of sequence `seq`."""
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.as_tensor(ids)[None],
                             past_key_values=self.caches.get(seq), use_cache=True)
        self.caches[seq] = out.past_key_values
        return self.captured["x"].numpy(), self.captured["y"].numpy()


def mla_op_inputs(rng, kinds: int, *, nh: int, nope: int, rope: int, v: int, r: int,
                  kv_b_scale: float) -> list[np.ndarray]:
    """Random float32 inputs of the MLA ops over a latent cache of 12 pages (page 12 unused):
    3 sequences with 6, 0 and 2 cached tokens bring 3, 5 and 1 new rows (9 in all).

    Returns [q, kv, norm weight, freqs_cis, input_row_offsets, cache_lengths, lookup_table,
    blocks, w_k, w_uk, w_uv], w_* cut from one random kv_b_proj weight.
    """
    from graphir.ops.rope_math import rope_freqs_cis

    pages, w = 12, r + rope
    blocks = rng.standard_normal((pages + 1, kinds, LAYERS, PAGE, 1, w)).astype(np.float32)
    lut = np.array([[3, 7, 1, 12], [0, 2, 12, 12], [5, 4, 6, 12]], np.uint32)
    clen = np.array([6, 0, 2], np.uint32)
    offs = np.array([0, 3, 8, 9], np.uint32)
    t = 9
    q = rng.standard_normal((t, nh * (nope + rope))).astype(np.float32)
    kv = rng.standard_normal((t, w)).astype(np.float32)
    normw = (rng.standard_normal(r) * 0.3 + 1).astype(np.float32)
    kv_b = (rng.standard_normal((nh, nope + v, r)) * kv_b_scale).astype(np.float32)
    w_k = kv_b[:, :nope].reshape(nh * nope, r).copy()
    w_uk, w_uv = kv_b[:, :nope].copy(), kv_b[:, nope:].transpose(0, 2, 1).copy()
    freqs = rope_freqs_cis(rope, 32, 10000.0).astype(np.float32)
    return [q, kv, normw, freqs, offs, clen, lut, blocks, w_k, w_uk, w_uv]
