"""Heartbeats through the job's store, for collectives that cannot see a dead peer themselves.

An NCCL collective whose peer died spins on the GPU forever. Each rank's watchdog thread bumps
its counter `hb/<rank>` in the store every `period` seconds and reads the others'; a peer whose
counter has not moved for the context's timeout (measured on this host's clock, so no clocks
need to agree), or a store that stopped answering (rank 0 or the launcher's agent died), fails
the job: `RankContext.fail` records the message and runs the registered aborts
(ncclCommAbort), which lets the stuck collective return. If the main thread still has not
noticed `grace_s` later, the process exits with status 70 and the message on stderr, so a job
never hangs on a dead peer. A rank that left through `close()` sets `closed/<rank>`; its
silence is expected then.
"""
from __future__ import annotations

import os
import sys
import threading
import time

EXIT_STATUS = 70


class Watchdog(threading.Thread):
    def __init__(self, ctx, store, period: float, grace_s: float | None = None,
                 exit_on_failure: bool = True):
        super().__init__(name=f"graphir-watchdog-{ctx.rank}", daemon=True)
        self.ctx, self.store, self.period = ctx, store, float(period)
        self.grace_s = ctx.config.timeout_s / 2 if grace_s is None else grace_s
        self.exit_on_failure = exit_on_failure
        self._halt = threading.Event()
        self._seen: dict[int, tuple[int, float]] = {}   # peer -> (counter, when it last moved)

    def stop(self) -> None:
        self._halt.set()
        try:
            self.store.add(f"closed/{self.ctx.rank}", 1)
        except Exception:  # noqa: BLE001  (the store may be gone at exit)
            pass
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=2 * self.period)

    def check_once(self, now: float | None = None) -> str | None:
        """Beat once and look at the peers; the failure message, or None."""
        now = time.monotonic() if now is None else now
        ctx = self.ctx
        try:
            self.store.add(f"hb/{ctx.rank}", 1)
            for peer in range(ctx.world_size):
                if peer == ctx.rank or self.store.add(f"closed/{peer}", 0):
                    continue
                count = self.store.add(f"hb/{peer}", 0)
                last = self._seen.get(peer)
                if last is None or last[0] != count:
                    self._seen[peer] = (count, now)
                elif now - last[1] > ctx.config.timeout_s:
                    return (f"graphir.distributed: rank {peer} of {ctx.world_size} stopped "
                            f"answering: no heartbeat for {now - last[1]:.1f} s (timeout "
                            f"{ctx.config.timeout_s:g} s); it died or hangs")
        except Exception as e:  # noqa: BLE001  (the store's host is gone)
            return (f"graphir.distributed: rank {ctx.rank} lost the job's store "
                    f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}); "
                    f"the rank hosting it (or the launcher) died")
        return None

    def run(self) -> None:
        while not self._halt.wait(self.period):
            msg = self.check_once()
            if msg is None:
                continue
            self.ctx.fail(msg)
            if self.exit_on_failure and not self._halt.wait(self.grace_s):
                print(f"[graphir rank {self.ctx.rank}] exiting: {msg}", file=sys.stderr,
                      flush=True)
                os._exit(EXIT_STATUS)
            return
