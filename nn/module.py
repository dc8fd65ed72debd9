"""Module: named weights and submodules, with MAX's state-dict API.

A weight's graph name is its qualified path ("q_proj.weight" inside an attention layer,
"layers.0.self_attn.q_proj.weight" once that layer sits in a model): names are assigned when a
weight or submodule is attached, so graphs built afterwards reference the full names.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import numpy as np

from graphir.weight import Weight

_DATA = "_graphir_data"  # where a loaded array sits on its Weight
_UNSET = object()         # a weight with no array, in a load's snapshot


def weight_data(w: Weight) -> np.ndarray | None:
    """The array loaded into a weight, or None."""
    getter = getattr(type(w), "shard_data", None)
    if getter is not None:
        return w.shard_data()
    return w.__dict__.get(_DATA)


def set_weight_data(w: Weight, array) -> None:
    """Check `array` against the weight's shape and dtype, then keep it on the weight."""
    a = np.asarray(array)
    want = tuple(int(d) for d in w.shape)
    if tuple(a.shape) != want:
        raise ValueError(f"weight {w.name!r}: expected shape {list(want)}, got {list(a.shape)}")
    if w.dtype.is_float:
        if a.dtype.kind != "f":
            raise ValueError(f"weight {w.name!r}: expected float data for {w.dtype.short}, "
                             f"got {a.dtype}")
    elif a.dtype != w.dtype.storage:
        raise ValueError(f"weight {w.name!r}: expected dtype {w.dtype.storage} for "
                         f"{w.dtype.short}, got {a.dtype}")
    w.__dict__[_DATA] = a


class Module:
    """Base class of layers: weights and submodules assigned as attributes are tracked.

    Example:
        >>> class Scale(Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.weight = Weight("weight", DType.float32, [4])
        >>> m = Scale(); m.load_state_dict({"weight": np.ones(4, np.float32)})
        >>> sorted(m.state_dict())
        ['weight']
    """

    def __init__(self) -> None:
        object.__setattr__(self, "_weights", {})   # attribute -> (local name, Weight)
        object.__setattr__(self, "_children", {})  # attribute -> Module
        object.__setattr__(self, "_prefix", "")

    def __setattr__(self, name: str, value) -> None:
        if "_weights" not in self.__dict__:
            Module.__init__(self)
        self._weights.pop(name, None)
        self._children.pop(name, None)
        if isinstance(value, Weight):
            local = value.name
            self._weights[name] = (local, value)
            if not getattr(type(value), "fixed_name", False):
                value.name = self._prefix + local
        elif isinstance(value, Module):
            self._children[name] = value
            value._set_prefix(self._prefix + name + ".")
        object.__setattr__(self, name, value)

    def _set_prefix(self, prefix: str) -> None:
        object.__setattr__(self, "_prefix", prefix)
        for local, w in self._weights.values():
            if not getattr(type(w), "fixed_name", False):
                w.name = prefix + local
        for name, child in self._children.items():
            child._set_prefix(prefix + name + ".")

    # -- loading as one transaction ---------------------------------------------------------
    @contextlib.contextmanager
    def _all_or_nothing(self) -> Iterator[None]:
        """Changes inside to this module tree's weights and submodules are kept only if the block
        completes: on an exception each module gets back its weights, submodules and each
        weight its array (or none), so a refused checkpoint never leaves a layer half loaded
        (q_proj from the new file, v_proj from the old, or a projection rebuilt for another
        encoding with no data). Snapshots hold references only."""
        saved = []
        for m in self._tree():
            data = [(w, w.__dict__.get(_DATA, _UNSET)) for _, w in m._weights.values()]
            saved.append((m, dict(m._weights), dict(m._children), data))
        try:
            yield
        except BaseException:
            for m, weights, children, data in saved:
                for attr in (set(m._weights) | set(m._children)) - set(weights) - set(children):
                    m.__dict__.pop(attr, None)      # attached during the failed load
                object.__setattr__(m, "_weights", weights)
                object.__setattr__(m, "_children", children)
                for attr, (_, w) in weights.items():
                    object.__setattr__(m, attr, w)
                for attr, child in children.items():
                    object.__setattr__(m, attr, child)
                for w, a in data:
                    if a is _UNSET:
                        w.__dict__.pop(_DATA, None)
                    else:
                        w.__dict__[_DATA] = a
            raise

    def _tree(self) -> Iterator["Module"]:
        yield self
        for child in self._children.values():
            yield from child._tree()

    # -- traversal -------------------------------------------------------------------------
    def _owned(self, prefix: str = "") -> Iterator[tuple[str, str, Weight, "Module"]]:
        """(qualified name relative to self, attribute, Weight, owning module)."""
        for attr, (local, w) in self._weights.items():
            yield prefix + local, attr, w, self
        for name, child in self._children.items():
            yield from child._owned(prefix + name + ".")

    def _extra_weights(self) -> dict[str, Weight]:
        """Weights graphs may use besides the owned ones (the shards of a parallel layer)."""
        return {}

    @property
    def layer_weights(self) -> dict[str, Weight]:
        """This module's own weights by local name (not its submodules')."""
        return {local: w for local, w in self._weights.values()}

    @property
    def sublayers(self) -> dict[str, "Module"]:
        return dict(self._children)

    def raw_state_dict(self) -> dict[str, Weight]:
        """Every Weight by its graph name (owned ones, then shards of parallel layers)."""
        out = {w.name: w for _, _, w, _ in self._owned()}
        for m in [self] + [c for _, _, _, c in self._owned()]:
            out.update(m._extra_weights())
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """Loaded arrays by graph name: what `runtime.interpreter.run(..., weights=)` binds."""
        out = {}
        for name, w in self.raw_state_dict().items():
            a = weight_data(w)
            if a is not None:
                out[name] = a
        return out

    def load_state_dict(self, state_dict: Mapping[str, object], *, strict: bool = True) -> None:
        """Load arrays by name relative to this module (e.g. "q_proj.weight"). All or nothing:
        a refused state dict leaves every weight as it was.

        Raises ValueError for missing weights, unexpected names (when strict) and arrays whose
        shape or dtype does not fit (subclasses check more: block encodings, GPTQ orders).
        """
        with self._all_or_nothing():
            self._load_state_dict(state_dict, strict=strict)

    def _load_state_dict(self, state_dict: Mapping[str, object], *, strict: bool) -> None:
        """What load_state_dict does inside its transaction; layers that check or convert a
        checkpoint override this one."""
        owned = {rel: w for rel, _, w, _ in self._owned()}
        missing = sorted(set(owned) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(owned))
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing weights {missing}")
            if unexpected:
                parts.append(f"unexpected weights {unexpected}")
            raise ValueError(f"{type(self).__name__}.load_state_dict: " + "; ".join(parts)
                             + f"; expected {sorted(owned)}")
        for rel, w in owned.items():
            if rel in state_dict:
                try:
                    set_weight_data(w, state_dict[rel])
                except ValueError as e:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: {e}") from None

