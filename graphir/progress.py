"""Progress bars (tqdm, on stderr) for the slow steps: compile, tune, weight binding, checks.

Who sees them, first rule that applies wins:
  1. an explicit "off": the CLI's `-q/--quiet`, `progress=False` in a call, `scope("off")`;
  2. `GRAPHIR_PROGRESS=1` shows them (even when stderr is not a terminal), `=0` hides them;
  3. an explicit "on" (`progress=True`, `scope("on")`) shows them;
  4. "auto" (what the `graphir` CLI sets) shows them when stderr is a terminal;
  5. otherwise (library use, tests) nothing is shown.

Bars only observe: results never depend on them. Disabled, `bar()` returns a shared no-op
(tqdm is not even imported), so a loop pays one attribute call per step at most.

Example:
    >>> from graphir import progress
    >>> with progress.scope("off"), progress.bar(total=2, desc="work") as b:
    ...     b.stage("first")
    ...     b.update()
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterable, Iterator

ENV = "GRAPHIR_PROGRESS"
_ON, _OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")
_mode: ContextVar[str | None] = ContextVar("graphir_progress_mode", default=None)


def _as_mode(mode: str | bool | None) -> str | None:
    if mode is None or isinstance(mode, bool):
        return None if mode is None else ("on" if mode else "off")
    if mode not in ("on", "off", "auto"):
        raise ValueError(f"progress mode must be 'on', 'off', 'auto', a bool or None, got {mode!r}")
    return mode


def enabled() -> bool:
    """Whether a bar opened now would be shown (see the module docstring for the rules)."""
    mode = _mode.get()
    if mode == "off":
        return False
    env = os.environ.get(ENV, "").strip().lower()
    if env in _ON or env in _OFF:
        return env in _ON
    if mode == "on":
        return True
    if mode == "auto":
        isatty = getattr(sys.stderr, "isatty", None)
        return bool(isatty and isatty())
    return False


@contextmanager
def scope(mode: str | bool | None) -> Iterator[None]:
    """Within the block, bars follow `mode`: "on"/True, "off"/False, "auto" (when stderr is a
    terminal), or None (keep the enclosing choice)."""
    m = _as_mode(mode)
    if m is None:
        yield
        return
    token = _mode.set(m)
    try:
        yield
    finally:
        _mode.reset(token)


class _Null:
    """The disabled bar: every method does nothing."""

    n = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int = 1) -> None:
        pass

    def stage(self, text: str, advance: int = 0, refresh: bool = True) -> None:
        pass

    def add_total(self, n: int) -> None:
        pass

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass


NULL = _Null()


class Bar:
    """A tqdm bar on stderr that also names the current stage (shown at once, not throttled)."""

    def __init__(self, total: int | None, desc: str, unit: str):
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                         dynamic_ncols=True)

    @property
    def n(self) -> int:
        return self._bar.n

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def stage(self, text: str, advance: int = 0, refresh: bool = True) -> None:
        """Show `text` beside the bar and advance by `advance` steps; refresh=False leaves the
        redraw to tqdm's rate limit (for per-item names in long loops)."""
        self._bar.set_postfix_str(text, refresh=False)
        if refresh:
            self._bar.n += advance  # one redraw below, not update()'s as well
            self._bar.refresh()
        elif advance:
            self._bar.update(advance)

    def add_total(self, n: int) -> None:
        """Grow the total by `n` (work discovered on the way, e.g. kernels after lowering)."""
        self._bar.total = (self._bar.total or 0) + n
        self._bar.refresh()

    def reset(self) -> None:
        """Back to zero steps done (the same total)."""
        self._bar.reset(total=self._bar.total)

    def close(self) -> None:
        if self._bar.n != self._bar.last_print_n:  # the final count, before the bar goes
            self._bar.refresh()
        self._bar.close()


def bar(total: int | None = None, *, desc: str, unit: str = "step") -> Bar | _Null:
    """A progress bar when bars are enabled (see `enabled`), else the no-op NULL.

    Use as a context manager; `update(n)`, `stage(text)`, `add_total(n)`.
    """
    return Bar(total, desc, unit) if enabled() else NULL


def iterate(items: Iterable, *, desc: str, unit: str = "step", total: int | None = None):
    """`items` counted by a bar when bars are enabled, else `items` itself."""
    if not enabled():
        return items
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    return _counted(items, Bar(total, desc, unit))


def _counted(items: Iterable, b: Bar):
    with b:
        for item in items:
            yield item
            b.update()
