"""Deadlines for waits that cannot take a timeout of their own, such as the next message
of a gRPC stream: what is armed gets its ``expire`` callback once its deadline passes."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable


class Watchdog:
    """A thread that checks every ``interval`` seconds for armed waits past their deadline,
    so that arming and disarming cost a dict write each (no wake-up on the hot path). The
    thread runs while something is armed, and for a few intervals after."""

    def __init__(self, interval: float, name: str):
        self.interval, self.name = interval, name
        self._armed: dict[Hashable, tuple[float, Callable[[], None]]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

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

