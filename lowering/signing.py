"""Ed25519 signatures over an artifact's root digest, for artifacts that travel between machines.

The manifest's root digest (lowering/artifact.py) covers every file and the whole manifest, so it
detects damage; but whoever can edit an artifact can recompute it. A signature made with a
private key that stays on the build machine is what detects tampering: a loader given
`trusted_keys` refuses any artifact not signed by one of them.

    graphir keygen build.key                      # writes build.key (private) and build.key.pub
    graphir compile model.py -o m.gart --sign build.key
    InferenceSession(trusted_keys=["build.key.pub"]).load("m.gart", weights=w)

Keys are files: the private key a PEM PKCS#8 Ed25519 key, the public key 64 hex characters.
Needs the `cryptography` package (`pip install 'graphir[sign]'`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

SIGNATURE = "signature.json"


class SignatureError(ValueError):
    """A signature is missing, malformed, or made by a key that is not trusted."""


def _ed25519():
    from graphir.optional import require

    require("cryptography", "artifact signing")
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519


def generate_key(path: str | os.PathLike) -> tuple[Path, Path]:
    """Write a new private key to `path` (mode 0600) and its public key to `path`.pub."""
    from cryptography.hazmat.primitives import serialization

    key = _ed25519().Ed25519PrivateKey.generate()
    path = Path(path)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = path.with_name(path.name + ".pub")
    pub.write_text(_public_hex(key.public_key()) + "\n")
    return path, pub


def _public_hex(public_key) -> str:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw,
                                   serialization.PublicFormat.Raw).hex()


def _load_private(path) -> object:
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise SignatureError(f"{path}: not a readable PEM private key ({e})") from None
    if not isinstance(key, _ed25519().Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 key")
    return key


def public_key_hex(key) -> str:
    """64 hex characters of a public key given as bytes, hex text, or a .pub file path."""
    if isinstance(key, (bytes, bytearray)) and len(key) == 32:
        return bytes(key).hex()
    text = str(key)
    if not (len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)):
        try:
            text = Path(key).read_text().strip()
        except OSError as e:
            raise SignatureError(f"trusted key {key!r}: neither 64 hex characters nor a "
                                 f"readable .pub file ({e})") from None
    if len(text) != 64 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise SignatureError(f"trusted key {key!r}: a public key is 64 hex characters")
    return text.lower()


def key_id(public_hex: str) -> str:
    return hashlib.sha256(bytes.fromhex(public_hex)).hexdigest()[:16]


def sign(artifact_dir: str | os.PathLike, private_key_path: str | os.PathLike) -> dict:
    """Sign the artifact's root digest; writes signature.json beside the manifest."""
    from .artifact import load_artifact

    art = load_artifact(artifact_dir)  # signs only what verifies
    key = _load_private(private_key_path)
    digest = art.manifest["root_digest"]
    pub = _public_hex(key.public_key())
    record = {"algorithm": "ed25519", "key_id": key_id(pub), "public_key": pub,
              "root_digest": digest, "signature": key.sign(bytes.fromhex(digest)).hex()}
    tmp = Path(artifact_dir) / (SIGNATURE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, Path(artifact_dir) / SIGNATURE)
    return record


def verify(artifact_dir: str | os.PathLike, root_digest: str,
           trusted_keys: Iterable) -> str:
    """Check signature.json against `root_digest` and the trusted public keys; returns the
    signing key's id. Raises SignatureError saying what is wrong."""
    trusted = {public_key_hex(k) for k in trusted_keys}
    p = Path(artifact_dir) / SIGNATURE
    if not p.is_file():
        raise SignatureError(f"{artifact_dir}: not signed (no {SIGNATURE}), and trusted keys "
                             f"were given")
    try:
        rec = json.loads(p.read_text())
        pub, sig, digest = rec["public_key"], bytes.fromhex(rec["signature"]), rec["root_digest"]
    except (ValueError, KeyError, TypeError) as e:
        raise SignatureError(f"{artifact_dir}: malformed {SIGNATURE} ({e})") from None
    if digest != root_digest:
        raise SignatureError(f"{artifact_dir}: the signature is for another root digest (the "
                             f"artifact changed after it was signed)")
    if not isinstance(pub, str) or pub.lower() not in trusted:
        raise SignatureError(f"{artifact_dir}: signed by key {str(pub)[:16]}..., which is not "
                             f"one of the {len(trusted)} trusted key(s)")
    from cryptography.exceptions import InvalidSignature

    try:
        _ed25519().Ed25519PublicKey.from_public_bytes(bytes.fromhex(pub)).verify(
            sig, bytes.fromhex(root_digest))
    except (InvalidSignature, ValueError):
        raise SignatureError(f"{artifact_dir}: the signature does not verify") from None
    return key_id(pub.lower())
