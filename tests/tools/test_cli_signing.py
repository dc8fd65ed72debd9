"""`graphir keygen`, `compile --sign`, and `inspect` / `run --trusted-key` (one line on error)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("cryptography")
pytest.importorskip("mlir.ir")

from graphir.tools.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_sign_inspect_run(capsys, tmp_path):
    key = tmp_path / "b.key"
    rc, out, _ = cli(capsys, "keygen", str(key))
    assert rc == 0 and key.exists() and (tmp_path / "b.key.pub").exists()
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    rc, _, err = cli(capsys, "keygen", str(key))
    assert rc == 1 and "exists" in err and len(err.strip().splitlines()) == 1
    art = tmp_path / "mlp.gart"
    rc, out, _ = cli(capsys, "compile", str(ROOT / "examples" / "mlp.py"), "-o", str(art), "-q",
                     "--sign", str(key))
    assert rc == 0 and (art / "signature.json").exists()
    rc, out, _ = cli(capsys, "inspect", str(art), "--trusted-key", str(tmp_path / "b.key.pub"))
    assert rc == 0 and "verified against the trusted keys" in out
    rc, out, _ = cli(capsys, "run", str(art), "--dim", "tokens=3", "--trusted-key",
                     str(tmp_path / "b.key.pub"))
    assert rc == 0
    other = tmp_path / "o.key"
    cli(capsys, "keygen", str(other))
    rc, _, err = cli(capsys, "run", str(art), "--trusted-key", str(tmp_path / "o.key.pub"))
    assert rc == 1 and "not one of the 1 trusted key" in err and len(err.strip().splitlines()) == 1
    m = json.loads((art / "manifest.json").read_text())
    m["target"] = m["target"] + "x"
    (art / "manifest.json").write_text(json.dumps(m))
    rc, _, err = cli(capsys, "inspect", str(art))
    assert rc == 1 and "was changed after the artifact was written" in err


def test_unsigned_inspect_says_so(capsys, tmp_path):
    art = tmp_path / "mlp.gart"
    assert cli(capsys, "compile", str(ROOT / "examples" / "mlp.py"), "-o", str(art), "-q")[0] == 0
    rc, out, _ = cli(capsys, "inspect", str(art))
    assert rc == 0 and "signature none" in out and "digest    " in out
