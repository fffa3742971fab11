"""Deadlines for waits that cannot take a timeout of their own, such as the next message
of a gRPC stream: what is armed gets its ``expire`` callback once its deadline passes."""
from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401  registers its exit hook now, before ours (see the end)
import threading
import time
import weakref
from collections.abc import Callable, Hashable


class Watchdog:
    """A thread that checks every ``interval`` seconds for armed waits past their deadline,
    so that arming and disarming cost a dict write each (no wake-up on the hot path). The
    thread runs while something is armed, and for a few intervals after. ``at_exit``: expire
    everything when the interpreter starts to exit, before it waits for executor threads
    (which may be the very ones waiting)."""

    def __init__(self, interval: float, name: str, at_exit: bool = False):
        self.interval, self.name = interval, name
        self._armed: dict[Hashable, tuple[float, Callable[[], None]]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if at_exit:
            _AT_EXIT.add(self)

    def arm(self, key: Hashable, seconds: float, expire: Callable[[], None]) -> None:
        """Call ``expire()`` in ``seconds`` unless ``disarm(key)`` comes first."""
        self._armed[key] = (time.monotonic() + seconds, expire)
        with self._lock:  # the thread leaves under this lock, after finding nothing armed
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def disarm(self, key: Hashable) -> None:
        self._armed.pop(key, None)

    def expire_all(self) -> None:
        self._expire(float("inf"))

    def _run(self) -> None:
        quiet = 0
        while True:
            time.sleep(self.interval)
            self._expire(time.monotonic())
            quiet = 0 if self._armed else quiet + 1
            if quiet >= 10:
                with self._lock:
                    if not self._armed:
                        self._thread = None
                        return

    def _expire(self, now: float) -> None:
        for key, armed in list(self._armed.items()):
            if armed[0] <= now and self._armed.get(key) is armed:  # not re-armed meanwhile
                self._armed.pop(key, None)
                armed[1]()


_AT_EXIT: weakref.WeakSet[Watchdog] = weakref.WeakSet()


def _exiting() -> None:
    for watchdog in list(_AT_EXIT):
        watchdog.expire_all()


# Runs before the interpreter joins executor threads: concurrent.futures registers that join
# the same way, at its import above, and these run in reverse order (a plain atexit hook would
# run after the join).
getattr(threading, "_register_atexit", atexit.register)(_exiting)
