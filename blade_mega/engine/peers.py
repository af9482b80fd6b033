"""What the ranks of a job tell each other through the rendezvous store, for when things fail.

* Heartbeats: every rank writes the time into the store each second from a daemon thread, so a
  rank whose collective timed out can name the rank that stopped answering (a SIGSTOPped, hung
  or lost process writes no more; a rank merely waiting in a collective still does).
* One line per error: ranks that fail with the same message agree through the store on the
  lowest of them, which alone prints it.

Each side talks to the store on its own connection (``Store.clone``) with short timeouts, so
neither a busy training loop nor a dead store host can stall it. Nothing here is needed for
training; every store operation that fails only makes the report less precise.
"""

from __future__ import annotations

import datetime
import hashlib
import threading
import time
from typing import Optional

HEARTBEAT_S = 1.0
STALE_S = 3.0       # three missed beats: the rank stopped answering
GRACE_S = 0.5       # how long a failing rank waits for lower ranks with the same error
STORE_TIMEOUT = datetime.timedelta(seconds=2)


class Peers:
    def __init__(self, store, prefix: str, rank: int, world_size: int,
                 timeout_minutes: float):
        """``store``: the process's rendezvous store (a TCPStore); ``prefix``: this run's keys."""
        self.rank, self.world_size = rank, world_size
        self.timeout_minutes = timeout_minutes
        self._store, self._prefix = store, prefix
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _connect(self):
        import torch

        store = self._store.clone()
        store.set_timeout(STORE_TIMEOUT)
        return torch.distributed.PrefixStore(self._prefix, store)

    def start(self) -> None:
        store = self._connect()
        store.set(f"beat/{self.rank}", repr(time.time()))  # before training starts
        self._thread = threading.Thread(target=self._beat, args=(store,), daemon=True,
                                        name="blade-heartbeat")
        self._thread.start()

    def _beat(self, store) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                store.set(f"beat/{self.rank}", repr(time.time()))
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending anyway
                return

    def stop(self) -> None:
        """Stop beating (the run is over); the reports below still work."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * HEARTBEAT_S)
            self._thread = None

    def silent_ranks(self) -> Optional[dict[int, float]]:
        """{rank: seconds since its last heartbeat} of the ranks that stopped answering, or None
        if the store itself does not answer. Ranks that reported a failure of their own (they
        are exiting, their heartbeat stops too) are not counted."""
        try:
            store = self._connect()
            store.set(f"failed/{self.rank}", "1")
            now = time.time()
            silent = {}
            for rank in range(self.world_size):
                if rank == self.rank or store.check([f"failed/{rank}"]):
                    continue
                last = float(store.get(f"beat/{rank}")) if store.check([f"beat/{rank}"]) else 0.0
                if now - last > STALE_S:
                    silent[rank] = now - last
            return silent
        except Exception:  # noqa: BLE001 - the store's host (rank 0 or the launcher) is gone
            return None

    def first_to_report(self, message: str) -> bool:
        """True on the lowest rank that fails with ``message`` (call on every failing rank)."""
        key = "error/" + hashlib.sha1(message.encode()).hexdigest()
        try:
            store = self._connect()
            current = store.compare_set(key, "", str(self.rank)).decode()
            while int(current) > self.rank:  # lower the recorded rank to ours, atomically
                current = store.compare_set(key, current, str(self.rank)).decode()
            if self.rank == 0:
                return True  # no rank is lower: print at once (a launcher may kill us soon)
            time.sleep(GRACE_S)  # ranks failing alike fail within milliseconds of each other
            return int(store.get(key).decode()) == self.rank
        except Exception:  # noqa: BLE001 - no store: better every rank's line than none
            return True
