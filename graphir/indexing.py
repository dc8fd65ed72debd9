"""`x[...]` on a TensorValue: ints, slices, Ellipsis and None, as gir.slice + gir.reshape."""
from __future__ import annotations

from .dim import Dim


def _norm(i, size: Dim, what: str) -> Dim:
    if isinstance(i, Dim):
        return i
    i = int(i)
    if i >= 0:
        if size.is_static and i > int(size):
            return size
        return Dim(i)
    if size.is_static:
        return Dim(max(int(size) + i, 0))
    return size + i  # symbolic: trust the user that size >= -i


def getitem(x, index):
    if not isinstance(index, tuple):
        index = (index,)
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    if n_real > x.rank:
        raise ValueError(f"too many indices ({n_real}) for a tensor of rank {x.rank}")
    if sum(1 for i in index if i is Ellipsis) > 1:
        raise ValueError("an index can hold only one Ellipsis")
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (x.rank - n_real) + index[k + 1:]
    else:
        index = index + (slice(None),) * (x.rank - n_real)
    starts, stops, steps, out_shape = [], [], [], []
    axis = 0
    trivial = True
    for i in index:
        if i is None:
            out_shape.append(Dim(1))
            continue
        size = x.shape[axis]
        if isinstance(i, slice):
            step = 1 if i.step is None else int(i.step)
            if step <= 0:
                raise ValueError(f"slice step must be positive, got {step}")
            start = Dim(0) if i.start is None else _norm(i.start, size, "start")
            stop = size if i.stop is None else _norm(i.stop, size, "stop")
            if (stop - start).is_static and int(stop - start) < 0:
                stop = start  # numpy: an empty slice, not an error
            length = stop - start
            if step != 1:
                if not length.is_static:
                    raise ValueError(f"a strided slice needs a static extent, got {length}")
                length = Dim(max(0, -(-int(length) // step)))
            out_shape.append(length)
        else:
            if hasattr(i, "__index__") or isinstance(i, Dim):
                start = _norm(i, size, "index")
                if size.is_static and isinstance(i, int) and not -int(size) <= i < int(size):
                    raise IndexError(f"index {i} out of range for axis {axis} of size {size}")
                stop, step = start + 1, 1
            else:
                raise TypeError(f"unsupported index {i!r}; use ints, slices, ... or None")
        trivial &= start == 0 and stop == size and step == 1
        starts.append(start)
        stops.append(stop)
        steps.append(step)
        axis += 1
    out = x
    if not trivial:
        out = x.graph.apply("slice", [x], {"starts": tuple(starts), "stops": tuple(stops),
                                           "steps": tuple(steps)})[0]
    if tuple(out_shape) != tuple(out.shape):
        out = out.reshape(out_shape)
    return out
