"""Host-side paged KV-cache manager: page pool, per-sequence page lists, step inputs.

The blocks array is ``[total_num_pages + 1, 2, num_layers, page_size, n_kv_heads, head_dim]``; the
last page (id ``total_num_pages``) is the null page that unused lookup-table entries point at, so
a kernel reading past a sequence's pages touches memory that exists and belongs to nobody.

A step is two-phase: :meth:`PagedKVCacheManager.prepare_step` allocates the pages the new tokens
need and builds the kernel inputs; the graph runs and writes the cache; :meth:`commit_step`
advances the lengths. A failed prepare changes nothing.

The lookup table's width (pages per row) is padded with the null page to a multiple of
``lut_bucket`` pages (default: 256 tokens' worth, the KV-length bucket of the CUDA decode
launches), capped at the pages a sequence can hold: its shape is part of a compiled call's
key, so an unpadded table would force a new plan (and CUDA graph) at every page a sequence
grows into, where a padded one changes only when the launches change anyway.
"""

from __future__ import annotations

import functools
import heapq
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["OutOfPagesError", "StepInputs", "PagedKVCacheManager", "LUT_BUCKET_TOKENS"]

LUT_BUCKET_TOKENS = 256  # lowering/triton_gpu/lowerings/attention.py DECODE_KV_BUCKET


class OutOfPagesError(RuntimeError):
    """The pool cannot supply the pages a step needs; the manager's state is unchanged."""


@dataclass(frozen=True, eq=False)
class StepInputs:
    """Kernel inputs for one step, rows in the order of ``seq_ids``."""

    seq_ids: tuple[int, ...]
    new_token_counts: tuple[int, ...]
    lookup_table: np.ndarray  # [batch, width] uint32, padded with the null page id (see lut_bucket)
    cache_lengths: np.ndarray  # [batch] uint32, tokens cached before this step
    input_row_offsets: np.ndarray  # [batch + 1] uint32
    max_lengths: np.ndarray  # [1, 2] uint32: max new tokens, max cache_length + new tokens
    _token: object = field(default=None, repr=False, compare=False)
    # The sequence records the step was prepared for: a sequence released and claimed again
    # under the same id is a new record, so a stale step cannot commit into it.
    _records: tuple = field(default=(), repr=False, compare=False)


@dataclass
class _Seq:
    length: int = 0
    pages: list[int] = field(default_factory=list)


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"PagedKVCacheManager: {name} must be a positive int, got {v!r}")
    return int(v)


def _locked(method):
    """Run a PagedKVCacheManager method under its lock: its updates check, then act (the
    smallest free id, the pages a batch needs against those free), so calls from two threads
    at once would hand one id or one page to two sequences."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return run


class PagedKVCacheManager:
    """Pool of fixed-size pages shared by the sequences of a batch. Its methods may be called
    from several threads (each update holds the manager's lock).

    Example:
        >>> m = PagedKVCacheManager(num_layers=1, n_kv_heads=1, head_dim=2, page_size=4, total_num_pages=3)
        >>> s = m.claim()
        >>> step = m.prepare_step([s], [5])
        >>> step.lookup_table.tolist(), m.free_pages   # padded with the null page (id 3)
        ([[0, 1, 3]], 1)
        >>> m.commit_step(step); m.cache_length(s)
        5
    """

    def __init__(self, *, num_layers: int, n_kv_heads: int, head_dim: int, page_size: int,
                 total_num_pages: int, dtype=np.float32, max_batch_size: int | None = None,
                 max_seq_len: int | None = None, blocks: np.ndarray | None = None,
                 lut_bucket: int | None = None) -> None:
        self.num_layers = _positive_int("num_layers", num_layers)
        self.n_kv_heads = _positive_int("n_kv_heads", n_kv_heads)
        self.head_dim = _positive_int("head_dim", head_dim)
        self.page_size = _positive_int("page_size", page_size)
        self.total_num_pages = _positive_int("total_num_pages", total_num_pages)
        self.max_batch_size = None if max_batch_size is None else _positive_int("max_batch_size", max_batch_size)
        self.max_seq_len = (self.total_num_pages * self.page_size if max_seq_len is None
                            else _positive_int("max_seq_len", max_seq_len))
        self.lut_bucket = (max(1, LUT_BUCKET_TOKENS // self.page_size) if lut_bucket is None
                           else _positive_int("lut_bucket", lut_bucket))
        self.max_pages_per_seq = -(-self.max_seq_len // self.page_size)
        try:
            self.dtype = np.dtype(dtype)
        except (TypeError, ValueError) as e:
            raise ValueError(f"PagedKVCacheManager: dtype must be a numpy dtype, got {dtype!r} "
                             f"({e})") from None
        self.blocks_shape = (self.total_num_pages + 1, 2, self.num_layers, self.page_size,
                             self.n_kv_heads, self.head_dim)
        self._blocks = None
        self.blocks = np.zeros(self.blocks_shape, self.dtype) if blocks is None else blocks
        self._free: list[int] = list(range(self.total_num_pages))  # a heap: lowest ids reused first
        self._seqs: dict[int, _Seq] = {}
        self._lock = threading.RLock()

    # ---- blocks -------------------------------------------------------------------------------
    @property
    def blocks(self):
        """The cache blocks (owned or handed in); assign a new array after a pure store op."""
        return self._blocks

    @blocks.setter
    def blocks(self, value) -> None:
        shape = tuple(getattr(value, "shape", ()))
        if shape != self.blocks_shape:
            raise ValueError(f"PagedKVCacheManager: blocks must have shape {self.blocks_shape} "
                             f"(total_num_pages + 1 for the null page), got {shape}")
        # Device tensors (torch, DLPack) name their dtype as e.g. torch.float16.
        got = str(getattr(value, "dtype", "")).rsplit(".", 1)[-1]
        if got != self.dtype.name:
            raise ValueError(f"PagedKVCacheManager: blocks must be {self.dtype.name} (the manager's "
                             f"dtype), got {got or type(value).__name__}")
        if isinstance(value, np.ndarray) and not value.flags.writeable:
            raise ValueError("PagedKVCacheManager: blocks must be writable (the cache is updated in "
                             "place), got a read-only array")
        self._blocks = value

    @property
    def null_page_id(self) -> int:
        """The page id unused lookup-table entries hold."""
        return self.total_num_pages

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.total_num_pages - len(self._free)

    @property
    def seq_ids(self) -> tuple[int, ...]:
        """Claimed sequences, in claim order."""
        return tuple(self._seqs)

    # ---- sequences ----------------------------------------------------------------------------
    def _get(self, seq_id) -> _Seq:
        try:
            return self._seqs[seq_id]
        except (KeyError, TypeError):
            raise ValueError(f"PagedKVCacheManager: unknown sequence id {seq_id!r} "
                             f"(claimed: {list(self._seqs)})") from None

    @_locked
    def claim(self, seq_id: int | None = None) -> int:
        """Register a new empty sequence; picks the smallest unused id when none is given."""
        if self.max_batch_size is not None and len(self._seqs) >= self.max_batch_size:
            raise ValueError(f"PagedKVCacheManager: cannot claim, already {len(self._seqs)} sequences "
                             f"(max_batch_size {self.max_batch_size})")
        if seq_id is None:
            seq_id = next(i for i in range(len(self._seqs) + 1) if i not in self._seqs)
        elif isinstance(seq_id, bool) or not isinstance(seq_id, (int, np.integer)) or seq_id < 0:
            raise ValueError(f"PagedKVCacheManager: seq_id must be a non-negative int, got {seq_id!r}")
        seq_id = int(seq_id)
        if seq_id in self._seqs:
            raise ValueError(f"PagedKVCacheManager: sequence {seq_id} is already claimed")
        self._seqs[seq_id] = _Seq()
        return seq_id

    @_locked
    def release(self, seq_id: int) -> None:
        """Forget a sequence and return its pages to the pool (their contents are left as they are)."""
        seq = self._get(seq_id)
        for p in seq.pages:
            heapq.heappush(self._free, p)
        del self._seqs[seq_id]

    def cache_length(self, seq_id: int) -> int:
        """Tokens committed to the cache for this sequence."""
        return self._get(seq_id).length

    def pages(self, seq_id: int) -> tuple[int, ...]:
        """Page ids the sequence holds, in position order."""
        return tuple(self._get(seq_id).pages)

    # ---- steps --------------------------------------------------------------------------------
    @_locked
    def prepare_step(self, seq_ids: Sequence[int], new_token_counts: Sequence[int]) -> StepInputs:
        """Allocate pages for ``new_token_counts`` more tokens per sequence and build the step inputs.

        Raises OutOfPagesError (state unchanged) when the pool is short, ValueError for bad input.
        """
        seq_ids, counts = list(seq_ids), list(new_token_counts)
        if not seq_ids:
            raise ValueError("prepare_step: empty batch")
        if len(seq_ids) != len(counts):
            raise ValueError(f"prepare_step: {len(seq_ids)} seq_ids but {len(counts)} new_token_counts")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"prepare_step: duplicate sequence ids in {seq_ids}")
        seqs = [self._get(s) for s in seq_ids]
        needs = []
        for s, seq, n in zip(seq_ids, seqs, counts):
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
                raise ValueError(f"prepare_step: sequence {s}: new token count must be a positive int, got {n!r}")
            if seq.length + n > self.max_seq_len:
                raise ValueError(f"prepare_step: sequence {s}: {seq.length} cached + {n} new = "
                                 f"{seq.length + n} tokens exceeds max_seq_len {self.max_seq_len}")
            needs.append(max(0, -(-(seq.length + n) // self.page_size) - len(seq.pages)))
        # Check the whole batch before taking any page, so a failure leaves everything as it was.
        free = len(self._free)
        for s, need in zip(seq_ids, needs):
            if need > free:
                raise OutOfPagesError(
                    f"prepare_step: out of KV-cache pages: sequence {s} needs {need} more page(s) but only "
                    f"{free} are free after earlier sequences of this batch (pool: {len(self._free)} free of "
                    f"{self.total_num_pages}, batch needs {sum(needs)}); nothing was allocated")
            free -= need
        taken: list[tuple[_Seq, int]] = []
        try:
            for seq, need in zip(seqs, needs):
                for _ in range(need):
                    seq.pages.append(heapq.heappop(self._free))
                    taken.append((seq, seq.pages[-1]))
        except BaseException:
            for seq, p in reversed(taken):
                seq.pages.pop()
                heapq.heappush(self._free, p)
            raise
        lengths = np.array([seq.length for seq in seqs], dtype=np.int64)
        counts_arr = np.array(counts, dtype=np.int64)
        width = max(len(seq.pages) for seq in seqs)
        width = min(-(-width // self.lut_bucket) * self.lut_bucket, self.max_pages_per_seq)
        lut = np.full((len(seqs), width), self.null_page_id, dtype=np.uint32)
        for row, seq in enumerate(seqs):
            lut[row, :len(seq.pages)] = seq.pages
        offs = np.concatenate([[0], np.cumsum(counts_arr)]).astype(np.uint32)
        max_lengths = np.array([[counts_arr.max(), (lengths + counts_arr).max()]], dtype=np.uint32)
        return StepInputs(tuple(int(s) for s in seq_ids), tuple(int(n) for n in counts), lut,
                          lengths.astype(np.uint32), offs, max_lengths, _token=self,
                          _records=tuple(seqs))

    @_locked
    def commit_step(self, step: StepInputs) -> None:
        """Advance each sequence's length by its new tokens once the step has run."""
        if not isinstance(step, StepInputs) or step._token is not self:
            raise ValueError("commit_step: step was not prepared by this manager")
        seqs = [self._get(s) for s in step.seq_ids]
        for s, seq, rec in zip(step.seq_ids, seqs, step._records):
            if seq is not rec:
                raise ValueError(f"commit_step: sequence {s} was released (and claimed again) after "
                                 f"this step was prepared; the step is stale")
        for s, seq, before in zip(step.seq_ids, seqs, step.cache_lengths.tolist()):
            if seq.length != before:
                raise ValueError(f"commit_step: sequence {s} has length {seq.length}, the step was prepared "
                                 f"at {before} (committed twice, or a later step was committed first)")
        for seq, n in zip(seqs, step.new_token_counts):
            seq.length += n

    # ---- reading ------------------------------------------------------------------------------
    def gather_kv(self, seq_id: int, layer: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Read ``(k, v)``, each ``[length, n_kv_heads, head_dim]``, of one layer of a sequence.

        ``length`` defaults to the committed cache length; it may reach into pages a prepared but
        uncommitted step allocated.
        """
        seq = self._get(seq_id)
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.num_layers:
            raise ValueError(f"gather_kv: layer must be an int in [0, {self.num_layers}), got {layer!r}")
        length = seq.length if length is None else length
        if not isinstance(length, (int, np.integer)) or not 0 <= length <= len(seq.pages) * self.page_size:
            raise ValueError(f"gather_kv: length must be in [0, {len(seq.pages) * self.page_size}] for "
                             f"sequence {seq_id} ({len(seq.pages)} pages), got {length!r}")
        pos = np.arange(length)
        pages = np.asarray(seq.pages, dtype=np.int64)[pos // self.page_size]
        blocks = np.asarray(self._blocks)
        slots = pos % self.page_size
        return blocks[pages, 0, layer, slots].copy(), blocks[pages, 1, layer, slots].copy()
