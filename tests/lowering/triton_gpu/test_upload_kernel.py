"""The metadata upload kernel (kernels/upload.py) under Triton's interpreter: every size copies
exactly its bytes (whole words, the 1-3 byte tail, several programs) and writes nothing past
them; and its sm_90 build takes the parameters the runtime's launcher passes."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from graphir.lowering.triton_gpu.kernels import upload as up
from graphir.runtime.cuda.upload_kernel import PARAMS, UPLOAD_KEY, programs

ROOT = Path(__file__).resolve().parents[3]
GUARD = 64


@pytest.mark.parametrize("nbytes", [1, 3, 4, 7, 4096, 4097, 9216 + 3, 3 * 4096 + 6])
def test_copies_exactly_nbytes(nbytes):
    rng = np.random.default_rng(nbytes)
    src = torch.from_numpy(rng.integers(0, 256, nbytes + GUARD, dtype=np.uint8))
    dst = torch.from_numpy(rng.integers(0, 256, nbytes + GUARD, dtype=np.uint8))
    before = dst.clone()
    grid = up.upload_spec().grid_for(nbytes=nbytes)
    assert grid == (programs(nbytes, up.WORDS), 1, 1) and grid[0] == max(1, -(-(nbytes // 4) // 1024))
    up.upload_staged[grid](src, dst, nbytes, WORDS=up.WORDS)
    assert torch.equal(dst[:nbytes], src[:nbytes])
    assert torch.equal(dst[nbytes:], before[nbytes:]), "wrote past nbytes"


def test_small_blocks_cover_many_programs():
    # A smaller block than the shipped one: the program offsets, not just program 0.
    n = 10 * 16 + 2
    src = torch.arange(n, dtype=torch.int32).view(torch.uint8)[:n].clone()
    dst = torch.zeros(n + GUARD, dtype=torch.uint8)
    up.upload_staged[(programs(n, 4),)](src, dst, n, WORDS=4)
    assert torch.equal(dst[:n], src) and not dst[n:].any()


def test_the_artifact_key_and_parameters():
    spec = up.upload_spec()
    assert up.UPLOAD_KEY == UPLOAD_KEY == spec.name
    assert spec.runtime_params() == list(PARAMS)


SCRIPT = r"""
from graphir.lowering.triton_gpu.aot import compile_spec
from graphir.lowering.triton_gpu.kernels.upload import upload_spec
c = compile_spec(upload_spec())
print(c.cubin[:4].hex(), c.shared, c.launch_pdl, [n for n, _ in c.params],
      sum("ld.global" in l for l in c.ptx.splitlines()))
"""


def test_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    magic, shared, pdl = out[0], int(out[1]), out[2]
    assert magic == "7f454c46" and shared == 0
    # No programmatic launch: it must not start before the previous step's kernels finished
    # reading the area it overwrites.
    assert pdl == "False"
    assert "'src'," in out[3] and "'profile_scratch']" in out[-2]
    assert int(out[-1]) == up.WORDS // 128 + 1  # a word per thread and block row, + the tail
