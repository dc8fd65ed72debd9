"""When a slot graph's upload is the upload kernel (runtime/cuda/upload_kernel.py), without a
GPU: the launch it makes, and every case where it leaves the copy to the caller or refuses."""
import pytest

from graphir.runtime.cuda.upload_kernel import UPLOAD_KEY, StagedUpload
from tests.runtime.cuda.test_cublaslt_cpu import FakeKernel  # records launches


class Table(dict):
    """The device's kernel table: which keys the artifact has, their entries, loaded kernels."""

    def __init__(self, entries):
        super().__init__()
        self.entries = entries

    def __contains__(self, key):
        return key in self.entries

    def metadata(self, key):
        return self.entries[key]

    def __missing__(self, key):
        k = self[key] = FakeKernel()
        return k


def upload(words=1024):
    t = Table({UPLOAD_KEY: {"constexprs": {"WORDS": words}}})
    return StagedUpload(t), t


def test_launches_one_program_per_block_of_words():
    up, t = upload()
    assert up(0x10000, 16384, 0x7000_0000, 12288, 9219, stream=5)
    assert up(0x10000, 8192, 0x7000_0000, 12288, 2, stream=5)
    assert t[UPLOAD_KEY].launches == [((3,), (0x10000, 0x7000_0000, 9219), 5),
                                      ((1,), (0x10000, 0x7000_0000, 2), 5)]


@pytest.mark.parametrize("case", ["no kernel", "switched off", "src unaligned", "dst unaligned",
                                  "src unmapped", "nothing"])
def test_leaves_the_copy_to_the_caller(case, monkeypatch):
    up, t = (StagedUpload(Table({})), None) if case == "no kernel" else upload()
    if case == "switched off":
        monkeypatch.setenv("GRAPHIR_UPLOAD_KERNEL", "0")
    src = {"src unaligned": 0x10002, "src unmapped": 0}.get(case, 0x10000)
    dst = 0x7000_0001 if case == "dst unaligned" else 0x7000_0000
    assert not up(src, 8192, dst, 8192, 0 if case == "nothing" else 100, stream=0)
    assert t is None or UPLOAD_KEY not in dict(t)  # never loaded, never launched


@pytest.mark.parametrize("src_n, dst_n", [(4096, 8192), (8192, 4096)])
def test_refuses_more_bytes_than_either_side_holds(src_n, dst_n):
    up, t = upload()
    with pytest.raises(ValueError, match="6000 bytes"):
        up(0x10000, src_n, 0x7000_0000, dst_n, 6000, stream=0)
    assert UPLOAD_KEY not in dict(t)


def test_load_ahead_of_a_capture():
    # CudaDevice.capture loads the kernel before the capture begins; the launch then reuses it
    up, t = upload()
    up.load()
    assert UPLOAD_KEY in dict(t) and not t[UPLOAD_KEY].launches
    up_off = StagedUpload(Table({}))
    up_off.load()  # nothing to load: no error, and the copy stays the caller's
    assert not up_off(0x10000, 8192, 0x7000_0000, 8192, 64, stream=0)
