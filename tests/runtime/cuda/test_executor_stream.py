"""A short random serving stream through the CUDA executor on the stand-in device, against the
reference interpreter (tests/runtime/cuda/serving_stream.py; long runs: `TRITON_INTERPRET=1
python -m tests.runtime.cuda.serving_stream SECONDS SEED`)."""
import random

from tests.runtime.cuda.graph_device import executor, program  # noqa: F401  (program: a fixture)
from tests.runtime.cuda.serving_stream import stream  # noqa: E402


def test_a_random_serving_stream_agrees_with_the_interpreter(program):
    ex, _ = executor(program)
    n, refused, findings = stream(ex, random.Random(7), steps=60)
    assert not findings, findings
    # The stream exercised what it is for: replays on the fast path, buffers read in place,
    # and refusals.
    st = ex.stats
    assert st["fast_hits"] > 5 and st["direct_hits"] > 0 and refused > 3, (st, refused)
