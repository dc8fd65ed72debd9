"""A refused checkpoint changes nothing: every load (state dicts of float, GGUF and GPTQ layers,
`load_from_gguf`) either completes or leaves the layer's weights, projections and encodings as
they were, and the layer goes on computing what it computed before."""
import numpy as np
import pytest

from graphir.nn import AttentionWithRope, GGUFQAttentionWithRope
from graphir.nn.module import weight_data
from graphir.ops import QuantizationConfig
from tests.nn.gguf_convert import write_gguf
from tests.nn.gguf_layer import D, HIDDEN, NH, NKV, layers
from tests.nn.test_gptq_attention import PREFIX, build, checkpoint, make_g_idx

PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")


def snapshot(layer) -> dict:
    """Each weight's name -> (its Weight object, its array or None), and each projection's
    object and encoding."""
    weights = {n: (w, weight_data(w)) for n, w in layer.raw_state_dict().items()}
    projs = {p: (getattr(layer, p), getattr(getattr(layer, p), "encoding", None)) for p in PROJS}
    return dict(weights=weights, projs=projs)


def assert_unchanged(layer, before: dict) -> None:
    after = snapshot(layer)
    assert after["projs"].keys() == before["projs"].keys()
    for p, (obj, enc) in before["projs"].items():
        assert after["projs"][p][0] is obj, p           # the very projection, not a rebuilt one
        assert after["projs"][p][1] == enc, p
    assert list(after["weights"]) == list(before["weights"])    # names and order
    for name, (w, a) in before["weights"].items():
        w2, a2 = after["weights"][name]
        assert w2 is w, name
        assert (a2 is None) if a is None else (a2 is a), name


def float_sd(rng) -> dict:
    return {"q_proj.weight": rng.standard_normal((NH * D, HIDDEN)).astype(np.float32),
            "k_proj.weight": rng.standard_normal((NKV * D, HIDDEN)).astype(np.float32),
            "v_proj.weight": rng.standard_normal((NKV * D, HIDDEN)).astype(np.float32),
            "o_proj.weight": rng.standard_normal((HIDDEN, NH * D)).astype(np.float32)}


def test_a_float_state_dict_with_one_bad_array_changes_nothing():
    rng = np.random.default_rng(0)
    *_, attn = layers("Q8_0")
    attn.load_state_dict(float_sd(rng))
    before = snapshot(attn)
    bad = float_sd(rng)
    bad["o_proj.weight"] = bad["o_proj.weight"][:, :-1]          # the last one checked
    with pytest.raises(ValueError, match=r"o_proj.weight.*expected shape"):
        attn.load_state_dict(bad)
    assert_unchanged(attn, before)
    # A layer with nothing loaded yet stays empty.
    *_, fresh = layers("Q8_0")
    with pytest.raises(ValueError, match="expected shape"):
        fresh.load_state_dict(bad)
    assert fresh.state_dict() == {}
    assert isinstance(fresh, AttentionWithRope)


def gguf_file(path, mix: dict, seed: int, nan_in: str | None = None) -> None:
    """A llama .gguf of the test layer's shape in `mix`; `nan_in`: that projection's first
    block scale set to NaN (a corrupt block the loader refuses)."""
    rng = np.random.default_rng(seed)
    sd = {f"{k}": v * 0.1 for k, v in float_sd(rng).items()}
    write_gguf(path, "llama", [sd], mix, n_head=NH, n_kv=NKV, hidden=HIDDEN, head_dim=D,
               theta=10000.0)
    if nan_in:
        import gguf

        names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
                 "o_proj": "attn_output"}
        t = next(t for t in gguf.GGUFReader(str(path)).tensors
                 if t.name == f"blk.0.{names[nan_in]}.weight")
        data = bytearray(path.read_bytes())
        off = int(t.data_offset)
        data[off:off + 2] = np.array([np.nan], np.float16).tobytes()   # Q4_0 / Q5_0 / Q8_0: d first
        path.write_bytes(bytes(data))


def test_a_refused_gguf_file_leaves_the_projections_and_encodings(tmp_path):
    good, bad = tmp_path / "good.gguf", tmp_path / "bad.gguf"
    mix = {"q_proj": "Q4_0", "k_proj": "Q8_0", "v_proj": "Q5_0", "o_proj": "F16"}
    gguf_file(good, mix, seed=1)
    # Another file whose q and o come in other encodings (rebuilt projections) and whose v
    # (read after them) is corrupt.
    gguf_file(bad, dict(mix, q_proj="Q8_0", o_proj="Q4_0"), seed=2, nan_in="v_proj")
    layer = GGUFQAttentionWithRope.from_gguf(good, 0)
    before = snapshot(layer)
    x = np.random.default_rng(3).standard_normal((5, HIDDEN)).astype(np.float32)
    want = {p: getattr(layer, p).dequantized_weight() @ x.T for p in PROJS}   # in_dim 256 all
    with pytest.raises(ValueError, match=r"v_proj.weight.*non-finite scale"):
        layer.load_from_gguf(bad, 0)
    assert_unchanged(layer, before)
    assert layer.quantization_encodings == {p: e for p, (_, e) in before["projs"].items()}
    for p, y in want.items():
        np.testing.assert_array_equal(getattr(layer, p).dequantized_weight() @ x.T, y)
    # The same file, mended, loads in full afterwards.
    gguf_file(bad, dict(mix, q_proj="Q8_0", o_proj="Q4_0"), seed=2)
    layer.load_from_gguf(bad, 0)
    assert layer.quantization_encodings["q_proj"].value == "Q8_0"
    assert layer.quantization_encodings["o_proj"].value == "Q4_0"
    assert layer.gguf_config is not None


def test_a_gptq_order_refused_after_loading_keeps_the_old_weights():
    # desc_act's check that q, k and v share one g_idx order runs once all four projections
    # have converted their tensors: a refusal there must undo them.
    tensors, _ = checkpoint(2, 32, True, True)
    _, _, quant, _ = build(QuantizationConfig(group_size=32, desc_act=True))
    sd = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    quant.load_state_dict(sd)
    before = snapshot(quant)
    other, _ = checkpoint(7, 32, True, True)
    sd2 = {k[len(PREFIX):]: v for k, v in other.items() if k.startswith(PREFIX)}
    sd2["k_proj.g_idx"] = make_g_idx(np.random.default_rng(9), HIDDEN, 32, True)
    with pytest.raises(ValueError, match="different g_idx orders"):
        quant.load_state_dict(sd2)
    assert_unchanged(quant, before)
