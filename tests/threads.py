"""Run a test's workers in threads that switch as often as CPython allows, so that a race
between them (a check-then-act without a lock) shows up in a short test."""
from __future__ import annotations

import sys
import threading
from typing import Callable, Iterable


def run_in_threads(worker: Callable, args: Iterable) -> None:
    """worker(a) in one thread per a of `args`, all at once; the first error is raised here."""
    errors: list[BaseException] = []

    def body(a):
        try:
            worker(a)
        except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
            errors.append(e)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        ts = [threading.Thread(target=body, args=(a,)) for a in args]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        sys.setswitchinterval(old)
    if errors:
        raise errors[0]
