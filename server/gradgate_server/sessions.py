"""SessionStore: per-session graph, parameters and the last forward's cache.

Ids are 128 random bits. Calls on one session are serialized by its lock;
different sessions run concurrently. Idle sessions expire after a TTL; cached
activations share one byte budget and the least recently used are evicted.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .engine import FailedPrecondition, NotFound, Plan, ResourceExhausted, Tape


@dataclass(eq=False)
class Session:
    id: str
    plan: Plan
    params: dict[str, np.ndarray]
    last_used: float
    tape: Tape | None = None
    tape_bytes: int = 0
    evicted: bool = False  # the tape was dropped to fit the cache budget
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def require_tape(self) -> Tape:
        if self.tape is None:
            why = ("its cached activations were evicted to fit the server's cache budget"
                   if self.evicted else "it has no cached forward since creation or the last parameter change")
            raise FailedPrecondition(f"cannot run backward on session {self.id[:8]}: {why}; call Forward first",
                                     "session_id")
        return self.tape


class SessionStore:
    def __init__(self, ttl_seconds: float, max_sessions: int, cache_bytes: int,
                 clock: Callable[[], float] = time.monotonic,
                 on_event: Callable[[str], None] = lambda event: None):
        """``on_event`` hears created | closed | expired | evicted (activations only)."""
        self.ttl = ttl_seconds
        self.on_event = on_event
        self.max_sessions = max_sessions
        self.cache_budget = cache_bytes
        self.clock = clock
        self.cache_bytes = 0
        self._next_sweep = 0.0
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()  # guards the dict and the byte count

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, plan: Plan, params: dict[str, np.ndarray]) -> Session:
        with self._lock:
            self._expire_idle()
            if len(self._sessions) >= self.max_sessions:
                raise ResourceExhausted(f"server holds {len(self._sessions)} sessions, the limit; "
                                        "close sessions you no longer need", "session_id")
            session = Session(secrets.token_hex(16), plan, params, self.clock())
            self._sessions[session.id] = session
        self.on_event("created")
        return session

    @contextmanager
    def use(self, session_id: str) -> Iterator[Session]:
        """The session, locked for the duration of one call."""
        with self._lock:
            self._expire_idle()
            session = self._sessions.get(session_id)
        if session is None:
            raise NotFound(f"session {session_id[:8]!r}... not found: unknown, closed, or idle for more than "
                           f"{self.ttl:g}s; create a new session", "session_id")
        with session.lock:
            try:
                yield session
            finally:
                session.last_used = self.clock()

    def close(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
            if session is None:
                raise NotFound(f"session {session_id[:8]!r}... not found (already closed or expired)", "session_id")
            self._drop_tape(session)
        self.on_event("closed")

    def cache(self, session: Session, tape: Tape | None) -> None:
        """Keep ``tape`` as the session's cache, evicting others' to stay in budget."""
        size = tape.nbytes if tape is not None else 0
        if size > self.cache_budget:
            raise ResourceExhausted(f"this forward's activations take {size} bytes, more than the server's "
                                    f"whole cache budget of {self.cache_budget}; use smaller batches", "inputs")
        with self._lock:
            self._drop_tape(session)
            if session.id not in self._sessions:  # closed while running
                return
            for other in sorted(self._sessions.values(), key=lambda s: s.last_used):
                if self.cache_bytes + size <= self.cache_budget:
                    break
                if other.tape is not None and other is not session:
                    self._drop_tape(other)
                    other.evicted = True
                    self.on_event("evicted")
            session.tape, session.tape_bytes, session.evicted = tape, size, False
            self.cache_bytes += size

    def _drop_tape(self, session: Session) -> None:
        self.cache_bytes -= session.tape_bytes
        session.tape, session.tape_bytes = None, 0

    def sweep(self) -> None:
        """Expire idle sessions now (the server calls this periodically, so an idle
        server frees memory and its metrics stay true without traffic)."""
        with self._lock:
            self._expire_idle()

    def _expire_idle(self) -> None:
        now = self.clock()
        if now < self._next_sweep:  # a sweep is O(sessions): at most one a second
            return
        self._next_sweep = now + min(1.0, self.ttl)
        for sid in [sid for sid, s in self._sessions.items()
                    if now - s.last_used > self.ttl and not s.lock.locked()]:
            self._drop_tape(self._sessions.pop(sid))
            self.on_event("expired")
