"""Host-side check of the ragged / paged metadata of a call, and the facts launches need.

Every runtime runs this before any kernel: the ragged ops (rope, kv_cache_store,
rope_split_store, flash_attention_ragged, the MLA ops) read `input_row_offsets`,
`cache_lengths` and `lookup_table` as raw indices, so a bad entry would write the KV cache out
of bounds. `RaggedCheck(graph)` finds, once, which graph inputs feed those operands (through
transfer_to / reshape) and what bounds them: the ragged input's row count, the KV blocks' page
pool and page size, the RoPE table's rows. `check(host, env)` then does one vectorized
O(batch + pages) pass per distinct (offsets, cache lengths, lookup table) triple that both
validates and returns the facts the launch rules use (the most new tokens of any sequence,
the longest cache + new tokens). A bad entry raises ValueError naming the input and the
offending index; nothing has been written then.

`fast(...)` gives, per input signature, the check a serving loop runs every step: a few
scalar reads, one reduction over the cache lengths, and byte comparisons of the offsets and
lookup table with the last call's (a decode loop repeats them); it answers None when it is
not sure, and the caller then runs `check`, which names the fault.

Checked: offsets start at 0, never decrease and end at the row count; cache_lengths has one
entry per sequence and none is negative; cache length + new tokens fit in the pages a
lookup_table row holds and in the RoPE table; the page ids a sequence uses (those covering
its positions) lie inside the pool; the arrays are integer and of the right length.

Example:
    >>> chk = RaggedCheck(graph)                                  # doctest: +SKIP
    >>> facts = chk.check(lambda k: arrays[k], env)               # doctest: +SKIP
    >>> facts.seq_max[1], facts.kv_max[(1, 3)]                    # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from graphir.types import ChainType

# op -> operand index of each role: rows (the ragged token rows), offsets, cache_lengths,
# lookup (table), blocks (the paged cache), rope (the freqs_cis table).
ROLES: dict[str, dict[str, int]] = {
    "rope": {"rows": 0, "rope": 1, "offsets": 2, "cache_lengths": 3},
    "kv_cache_store": {"rows": 0, "blocks": 1, "offsets": 2, "cache_lengths": 3, "lookup": 4},
    "rope_split_store": {"rows": 0, "rope": 1, "offsets": 2, "cache_lengths": 3, "lookup": 4,
                         "blocks": 5},
    "flash_attention_ragged": {"rows": 0, "blocks": 1, "offsets": 2, "cache_lengths": 3,
                               "lookup": 4},
    "mla_cache_store": {"rows": 0, "rope": 2, "offsets": 3, "cache_lengths": 4, "lookup": 5,
                        "blocks": 6},
    "mla_prefill": {"rows": 0, "blocks": 1, "offsets": 2, "cache_lengths": 3, "lookup": 4},
    "mla_decode": {"rows": 0, "blocks": 1, "offsets": 2, "cache_lengths": 3, "lookup": 4},
    "mla_attention": {"rows": 0, "blocks": 1, "offsets": 2, "cache_lengths": 3, "lookup": 4},
    "mla_prefill_plan": {"offsets": 0, "cache_lengths": 1},
}
_PASS_THROUGH = ("transfer_to", "reshape")
# Ops that write the new tokens' K/V into the paged cache: two sequences of one batch must not
# write the same (page, slot), or the result depends on which kernel program wins.
WRITERS = {"kv_cache_store", "rope_split_store", "mla_cache_store"}
BLOCKS_PAGES_AXIS, BLOCKS_PAGE_SIZE_AXIS = 0, 3


@dataclass
class RaggedFacts:
    """What one call's metadata says: per offsets input the most new tokens of a sequence,
    per (offsets, cache lengths) pair the longest cache + new tokens (both exact)."""

    seq_max: dict[int, int] = field(default_factory=dict)
    kv_max: dict[tuple[int, int], int] = field(default_factory=dict)


@dataclass
class _Group:
    """The ops sharing one (offsets, cache_lengths, lookup_table) triple of graph inputs."""

    offsets: int
    cache_lengths: int | None
    lookup: int | None
    ops: list[str] = field(default_factory=list)
    rows: list = field(default_factory=list)        # (Dim of the row count, op)
    blocks: list = field(default_factory=list)      # (pages Dim, page_size Dim, input or None)
    rope: list = field(default_factory=list)        # (rows Dim, op)


class RaggedCheck:
    """The ragged-metadata check of one graph (see the module docstring)."""

    def __init__(self, graph):
        inputs = [v for v in graph.inputs if not isinstance(v.type, ChainType)]
        raw_names = graph.input_names or []
        names = {}
        for i, v in enumerate(graph.inputs):
            if not isinstance(v.type, ChainType):
                names[id(v)] = raw_names[i] if i < len(raw_names) else None
        self._index = {id(v): k for k, v in enumerate(inputs)}
        self.names = [names[id(v)] for v in inputs]
        self.types = [v.type for v in inputs]
        groups: dict[tuple, _Group] = {}
        for n in graph.nodes:
            roles = ROLES.get(n.op)
            if roles is None:
                continue
            ops = [v for v in n.operands if not isinstance(v.type, ChainType)]
            src = {r: self._input_of(ops[i]) for r, i in roles.items() if i < len(ops)}
            if src.get("offsets") is None:
                continue  # computed on the device: nothing to read on the host
            key = (src["offsets"], src.get("cache_lengths"), src.get("lookup"))
            g = groups.setdefault(key, _Group(*key))
            g.ops.append(n.op)
            if "rows" in roles:
                g.rows.append((ops[roles["rows"]].type.shape[0], n.op))
            if "blocks" in roles:
                shape = ops[roles["blocks"]].type.shape
                g.blocks.append((shape[BLOCKS_PAGES_AXIS], shape[BLOCKS_PAGE_SIZE_AXIS],
                                 src.get("blocks"), n.op))
            if "rope" in roles:
                g.rope.append((ops[roles["rope"]].type.shape[0], n.op))
        self.groups = list(groups.values())

    def _input_of(self, v) -> int | None:
        """The graph input (index among non-chain inputs) whose values `v` carries."""
        while id(v) not in self._index:
            node = v.node
            if node is None or node.op not in _PASS_THROUGH:
                return None
            v = node.operands[0]
        return self._index[id(v)]

    def what(self, k: int | None, role: str = "") -> str:
        """How an error names graph input `k`."""
        if k is None:
            return role or "a computed value"
        nm = self.names[k]
        return f"{nm or role or 'input'} (input {k})"

    @property
    def inputs(self) -> set[int]:
        """The graph inputs the check reads on the host."""
        out = set()
        for g in self.groups:
            out.update(k for k in (g.offsets, g.cache_lengths, g.lookup) if k is not None)
        return out

    def bounds(self, env: Mapping[str, int]) -> list:
        """What the call's dims say about each group: (rows, blocks, rope) with the dims
        evaluated; a runtime computes it once per input-shape signature."""
        out = []
        for g in self.groups:
            rows, rope = {}, {}
            for d, op in g.rows:
                rows.setdefault(d.evaluate(env), op)
            for d, op in g.rope:
                rope.setdefault(d.evaluate(env), op)
            blocks = [(p.evaluate(env), s_.evaluate(env), k, op) for p, s_, k, op in g.blocks]
            out.append((list(rows.items()), blocks, sorted(rope.items())))
        return out

    def check(self, host: Callable[[int], np.ndarray], env: Mapping[str, int],
              bounds: list | None = None) -> RaggedFacts:
        """Validate the metadata of one call; `host(k)` gives input k as a numpy array and
        `env` the call's symbolic dims (`bounds`: `self.bounds(env)`, if already computed).
        Raises ValueError on the first bad entry."""
        facts = RaggedFacts()
        for g, b in zip(self.groups, bounds if bounds is not None else self.bounds(env)):
            self._check_group(g, b, host, facts)
        return facts

    def fast(self, bounds: list, shapes, dtypes, wanted) -> "FastFacts | None":
        """A `FastFacts` for one input signature (`bounds` of its dims, input `shapes`, numpy
        `dtypes` or None for device tensors), giving the `wanted` facts ((kind, key, bucket):
        ('kvmax', (offsets, cache lengths), 256)); None when the fast path does not apply
        (metadata not given as numpy integers, or a wanted fact no group gives)."""
        groups = []
        for g, (rows, blocks, rope) in zip(self.groups, bounds):
            ks = (g.offsets, g.cache_lengths, g.lookup)
            if any(k is not None and (dtypes[k] is None or dtypes[k].kind not in "iu")
                   for k in ks):
                return None
            if len(shapes[g.offsets]) != 1 or len({t for t, _ in rows}) > 1:
                return None
            n = shapes[g.offsets][0]
            if g.cache_lengths is not None and tuple(shapes[g.cache_lengths]) != (n - 1,):
                return None
            cap = pages = None
            if g.lookup is not None:
                lut = tuple(shapes[g.lookup])
                if len(lut) != 2 or lut[0] != n - 1:
                    return None
                cap = min([lut[1] * page for _, page, _, _ in blocks], default=None)
                pages = min([p for p, _, _, _ in blocks], default=None)
            groups.append(_FastGroup(
                ks, n, rows[0][0] if rows else None, min([r for r, _ in rope], default=None),
                cap, pages, [dtypes[k].kind == "i" if k is not None else False for k in ks],
                bool(WRITERS.intersection(g.ops))))
        where = {}
        for i, g in enumerate(groups):
            where[("seqmax", g.ks[0])] = (i, 0)
            if g.ks[1] is not None:
                where[("kvmax", (g.ks[0], g.ks[1]))] = (i, 1)
        try:
            order = [(where[(kind, key)], bucket) for kind, key, bucket in wanted]
        except KeyError:
            return None
        return FastFacts(groups, order)

    # -- one group ------------------------------------------------------------------------------
    def _meta(self, host, k: int, role: str, rank: int) -> np.ndarray:
        a = host(k)
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "iu" or a.ndim != rank:
            desc = f"{a.dtype} array of shape {list(a.shape)}" if isinstance(a, np.ndarray) \
                else type(a).__name__
            raise ValueError(f"{self.what(k, role)}: {role} must be an integer array of rank "
                             f"{rank}, got {desc}")
        return a

    def _check_group(self, g: _Group, bounds, host, facts: RaggedFacts) -> None:
        # Few numpy calls on purpose: this runs before every step of a serving loop.
        rows, blocks, rope = bounds
        o = self._meta(host, g.offsets, "input_row_offsets", 1)
        n = o.shape[0]
        if n == 0:
            raise ValueError(f"{self.what(g.offsets, 'input_row_offsets')}: input_row_offsets "
                             f"must hold batch + 1 >= 1 entries, got none")
        last = o.item(n - 1)
        # Unsigned offsets that decrease wrap to a run longer than all rows: one max tells.
        lens = o[1:] - o[:-1]
        seq_max = int(_MAX(lens)) if n > 1 else 0
        ok = o.item(0) == 0 and seq_max <= last
        if ok and o.dtype.kind == "i" and n > 1:
            ok = int(_MIN(lens)) >= 0
        for t, _ in rows:
            ok = ok and last == t
        if not ok:
            self._bad_offsets(g, o.astype(np.int64), rows)
        facts.seq_max[g.offsets] = seq_max
        if g.cache_lengths is None:
            return
        c = self._meta(host, g.cache_lengths, "cache_lengths", 1)
        if c.shape[0] != n - 1:
            raise ValueError(f"{self.what(g.cache_lengths, 'cache_lengths')}: cache_lengths has "
                             f"{c.shape[0]} entries but "
                             f"{self.what(g.offsets, 'input_row_offsets')} has {n} = batch + 1")
        if c.dtype.kind == "i" and n > 1 and int(_MIN(c)) < 0:
            i = int(np.argmax(c < 0))
            raise ValueError(f"{self.what(g.cache_lengths, 'cache_lengths')}: cache_lengths[{i}]"
                             f" = {int(c[i])} is negative")
        end = np.add(c, lens, dtype=np.int64)
        kv_max = int(_MAX(end)) if n > 1 else 0
        facts.kv_max[(g.offsets, g.cache_lengths)] = kv_max
        for n_rope, op in rope:
            if kv_max > n_rope:
                self._past_rope(g, c, lens.astype(np.int64), end, n_rope, op)
        if g.lookup is not None:
            self._check_pages(g, blocks, host, end, c, lens, kv_max)

    def _bad_offsets(self, g: _Group, o, rows) -> None:
        what = self.what(g.offsets, "input_row_offsets")
        lens = o[1:] - o[:-1]
        if o[0] != 0:
            raise ValueError(f"{what}: input_row_offsets must start at 0, got "
                             f"input_row_offsets[0] = {int(o[0])}")
        if lens.size and lens.min() < 0:
            i = int(np.argmax(lens < 0))
            raise ValueError(f"{what}: input_row_offsets decrease at index {i + 1} "
                             f"(input_row_offsets[{i}] = {int(o[i])} > "
                             f"input_row_offsets[{i + 1}] = {int(o[i + 1])})")
        t, op = next((t, op) for t, op in rows if int(o[-1]) != t)
        raise ValueError(f"{what}: input_row_offsets end at {int(o[-1])} "
                         f"(index {o.size - 1}) but the ragged input of gir.{op} has {t} rows")

    def _past_rope(self, g: _Group, c, lens, end, n_rope: int, op: str) -> None:
        # Only sequences with new tokens take positions from the table.
        over = (end > n_rope) & (lens > 0)
        if over.any():
            i = int(np.argmax(over))
            raise ValueError(
                f"{self.what(g.cache_lengths, 'cache_lengths')}: sequence {i} reaches position "
                f"{int(end[i]) - 1} (cache length {int(c[i])} + {int(lens[i])} new tokens) past "
                f"the RoPE table's {n_rope} rows (gir.{op})")

    def _check_pages(self, g: _Group, blocks, host, end, c, lens, kv_max: int) -> None:
        lut = self._meta(host, g.lookup, "lookup_table", 2)
        if lut.shape[0] != end.shape[0]:
            what = self.what(g.lookup, "lookup_table")
            raise ValueError(f"{what}: lookup_table has {lut.shape[0]} rows for a batch of "
                             f"{end.shape[0]} sequences")
        max_pages = lut.shape[1]
        # Fast accept: every entry (used or padding) inside the pool.
        top = int(_MAX(lut, None)) if lut.size else -1
        low = int(_MIN(lut, None)) if lut.size and lut.dtype.kind == "i" else 0
        for pages, page, blocks_in, op in blocks:
            if kv_max > max_pages * page:
                what = self.what(g.lookup, "lookup_table")
                i = int(np.argmax(end > max_pages * page))
                raise ValueError(
                    f"{self.what(g.cache_lengths, 'cache_lengths')}: sequence {i} needs "
                    f"{int(end[i])} positions (cache length {int(c[i])} + {int(lens[i])} new "
                    f"tokens) but a lookup_table row ({what}) holds {max_pages} pages of "
                    f"{page} = {max_pages * page} (gir.{op})")
            if top < pages and low >= 0:
                continue
            used = np.arange(max_pages)[None, :] < (-(-end // page))[:, None]
            ids = lut.astype(np.int64)
            bad = used & ((ids >= pages) | (ids < 0))
            if bad.any():
                what = self.what(g.lookup, "lookup_table")
                b, p = (int(x) for x in np.argwhere(bad)[0])
                pool = self.what(blocks_in, "kv blocks")
                raise ValueError(f"{what}: page id {int(ids[b, p])} at lookup_table[{b}, {p}] "
                                 f"(used by sequence {b}) is outside the pool of {pages} pages "
                                 f"of {pool} (gir.{op})")
        if WRITERS.intersection(g.ops) and end.shape[0] > 0:
            for pages, page, _, op in blocks:
                self._shared_writes(g, lut, c, end, page, pages)

    def _shared_writes(self, g: _Group, lut, c, end, page: int, pages: int) -> None:
        """Refuse a batch where new tokens land twice on one (page, slot): two sequences sharing
        a page, or one sequence naming a page twice. Reading a shared page (a common prefix) is
        fine; writing one slot twice is a race. The null page (the pool's last, `pages - 1`) is
        exempt, as in the fast check (FastFacts): it is the KV manager's sink for padding, such
        as the dummy sequences that pad a batch to a captured size, whose writes are lost
        whatever their order."""
        c, end = c.astype(np.int64), end.astype(np.int64)
        first, last = c // page, (end - 1) // page
        n = np.where(end > c, last - first + 1, 0)
        if not n.any():
            return
        seq = np.repeat(np.arange(n.size), n)
        pidx = np.repeat(first, n) + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))
        lo = np.maximum(np.repeat(c, n), pidx * page)            # first written position
        hi = np.minimum(np.repeat(end, n), (pidx + 1) * page)    # one past the last
        ids = lut.astype(np.int64)[seq, pidx]
        keep = ids != pages - 1
        ids, seq, pidx, lo, hi = ids[keep], seq[keep], pidx[keep], lo[keep], hi[keep]
        first_slot, end_slot = lo - pidx * page, hi - pidx * page
        # Sorted by (page, first slot), a slot written twice shows in some adjacent pair.
        order = np.lexsort((first_slot, ids))
        ids, seq, pidx = ids[order], seq[order], pidx[order]
        first_slot, end_slot = first_slot[order], end_slot[order]
        clash = (ids[1:] == ids[:-1]) & (first_slot[1:] < end_slot[:-1])
        if clash.any():
            i = int(np.argmax(clash))
            a, b = int(seq[i]), int(seq[i + 1])
            who = f"sequences {a} and {b} both write" if a != b else f"sequence {a} writes twice"
            raise ValueError(f"{self.what(g.lookup, 'lookup_table')}: {who} new tokens into page "
                             f"{int(ids[i])} (lookup_table[{a}, {int(pidx[i])}] and "
                             f"lookup_table[{b}, {int(pidx[i + 1])}]); a slot can be written "
                             f"once per step")


_MAX, _MIN = np.maximum.reduce, np.minimum.reduce


class _FastGroup:
    """One group's fixed bounds for a signature, and what the last call's metadata gave."""

    __slots__ = ("ks", "n", "rows", "rope", "cap", "pages", "signed", "o_bytes", "lens",
                 "seq_max", "uniform", "lut_bytes", "lut_ok", "writes")

    def __init__(self, ks, n, rows, rope, cap, pages, signed, writes=False):
        self.ks, self.n, self.rows, self.rope = ks, n, rows, rope
        self.cap, self.pages, self.signed = cap, pages, signed
        self.writes = writes
        self.o_bytes = self.lut_bytes = None
        self.lens = self.seq_max = self.uniform = None
        self.lut_ok = False

    def offsets(self, o, ob) -> bool:
        """Validate offsets unseen in the last call; keep what the facts need of them."""
        if self.n == 0:
            return False
        o = o.astype(np.int64)
        lens = o[1:] - o[:-1]
        lo = int(_MIN(lens)) if lens.size else 0
        hi = int(_MAX(lens)) if lens.size else 0
        if o.item(0) != 0 or lo < 0 or (self.rows is not None and o.item(-1) != self.rows):
            return False
        self.o_bytes, self.lens, self.seq_max = ob, lens, hi
        self.uniform = hi if lo == hi else None
        return True

    def lookup(self, lut, lb) -> None:
        if lut.size and self.pages is not None:
            ok = int(_MAX(lut, None)) < self.pages
            if ok and self.signed[2]:
                ok = int(_MIN(lut, None)) >= 0
        else:
            ok = True
        if ok and self.writes:
            # A page id twice in the table (rows sharing a common prefix, or one row naming a
            # page twice) may get one slot written twice as the cache grows: such tables take
            # the full check every call. The null page (the pool's last, which padding points
            # at) is ignored: writes that land there are lost whatever the order, as the KV
            # manager's convention has it.
            ids = lut.ravel()
            ids = np.sort(ids[ids != self.pages - 1])
            ok = not (ids[1:] == ids[:-1]).any()
        self.lut_bytes, self.lut_ok = lb, ok


class FastFacts:
    """`facts(inputs, blobs)`: the bucketed fact values in the caller's order, or None when
    the metadata needs the full check (bad, or unusual: a page id past the pool in padding,
    a cache past the RoPE table). `blobs[k]` is input k's bytes (or None)."""

    def __init__(self, groups, order):
        self.groups, self.order = groups, order

    def __call__(self, inputs, blobs):
        vals = []
        for g in self.groups:
            ko, kc, kl = g.ks
            ob = blobs[ko]
            if ob is None or ob != g.o_bytes:
                if not g.offsets(inputs[ko], ob if ob is not None else inputs[ko].tobytes()):
                    return None
            kv = 0
            if kc is not None and g.n > 1:
                c = inputs[kc]
                if g.n == 2:  # one sequence: a scalar read beats a reduction
                    top = low = c.item(0)
                else:
                    top = int(_MAX(c))
                    low = int(_MIN(c)) if g.signed[1] else 0
                if low < 0:
                    return None
                if g.uniform is not None:
                    kv = top + g.uniform
                else:
                    kv = int(_MAX(np.add(c, g.lens, dtype=np.int64)))
                if g.rope is not None and kv > g.rope:
                    return None
                if kl is not None:
                    if g.cap is not None and kv > g.cap:
                        return None
                    lb = blobs[kl]
                    if lb is None or lb != g.lut_bytes:
                        lut = inputs[kl]
                        g.lookup(lut, lb if lb is not None else lut.tobytes())
                    if not g.lut_ok:
                        return None
            vals.append((g.seq_max, kv))
        out = []
        for (i, j), b in self.order:
            v = vals[i][j]
            out.append(v if v <= 1 or b <= 1 else -(-v // b) * b)
        return tuple(out)
