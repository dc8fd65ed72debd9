"""Ed25519 signing of artifacts: a signed artifact loads for a session that trusts its key;
an unsigned, re-signed, edited or foreign-signed one is refused."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("cryptography")

from graphir import DeviceRef, DType, Graph, TensorType, ops  # noqa: E402
from graphir.lowering.artifact import ArtifactError, load_artifact, root_digest  # noqa: E402
from graphir.lowering.driver import compile_graph  # noqa: E402
from graphir.lowering.signing import SignatureError, generate_key, sign  # noqa: E402
from graphir.runtime import InferenceSession  # noqa: E402


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return generate_key(d / "build.key"), generate_key(d / "other.key")


@pytest.fixture
def art(tmp_path):
    with Graph("s", input_types=[TensorType(DType.float32, ["n", 4], DeviceRef.CPU())]) as g:
        g.output(ops.exp(g.inputs[0]))
    return compile_graph(g, "cpu", out=tmp_path / "s.gart").path


def test_signed_artifact_loads_for_its_key(art, keys):
    (priv, pub), _ = keys
    rec = sign(art, priv)
    assert rec["root_digest"] == load_artifact(art).manifest["root_digest"]
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    (y,) = InferenceSession(trusted_keys=[pub]).load(art).execute(x)
    np.testing.assert_allclose(y, np.exp(x), rtol=1e-6)
    load_artifact(art, trusted_keys=[pub.read_text().strip()])  # hex text works too


def test_unsigned_and_foreign_signatures_are_refused(art, keys):
    (priv, pub), (opriv, opub) = keys
    with pytest.raises(ArtifactError, match="not signed"):
        InferenceSession(trusted_keys=[pub]).load(art)
    sign(art, opriv)
    with pytest.raises(ArtifactError, match="not one of the 1 trusted key"):
        load_artifact(art, trusted_keys=[pub])
    load_artifact(art)  # without trusted keys a signature is not required


def test_edits_after_signing_are_refused(art, keys, tmp_path):
    (priv, pub), _ = keys
    sign(art, priv)
    # Replace the kernel library and update every hash consistently: only the signature catches it.
    other = tmp_path / "other.gart"
    shutil.copytree(art, other)
    m = json.loads((art / "manifest.json").read_text())
    m["tool_versions"]["python"] = m["tool_versions"]["python"] + "+patched"
    m["root_digest"] = root_digest(m)
    (art / "manifest.json").write_text(json.dumps(m))
    load_artifact(art)  # self-consistent ...
    with pytest.raises(ArtifactError, match="another root digest"):
        load_artifact(art, trusted_keys=[pub])  # ... but not what was signed
    sig = json.loads((other / "signature.json").read_text())
    sig["signature"] = sig["signature"][:-2] + ("00" if sig["signature"][-2:] != "00" else "01")
    (other / "signature.json").write_text(json.dumps(sig))
    with pytest.raises(ArtifactError, match="does not verify"):
        load_artifact(other, trusted_keys=[pub])


def test_bad_keys_are_clear_errors(tmp_path, art):
    with pytest.raises(ArtifactError, match="neither 64 hex characters nor a readable .pub"):
        load_artifact(art, trusted_keys=["abc"])
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    with pytest.raises(SignatureError, match="not a readable PEM private key"):
        sign(art, bad)
