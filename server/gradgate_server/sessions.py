"""SessionStore: per-session graph, parameters, uploaded data and the last forward's cache.

Ids are 128 random bits. Calls on one session are serialized by its lock;
different sessions run concurrently. Idle sessions expire after a TTL.

Memory has two budgets. State (parameters, buffers, an uploaded dataset, a running
optimizer's state) is what a session cannot lose: it is counted per session and for
the server, and a call that would go over either budget fails before it changes
anything. Cached activations share a third budget and the least recently used are
evicted to make room (their sessions stay; Backward then asks for a new Forward).
"""
from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .auth import principal
from .engine import FailedPrecondition, InvalidArgument, NotFound, Plan, ResourceExhausted, Tape

KEEP: Any = object()  # commit(): leave this part of the session as it is


def owned(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` such that they keep no buffer alive that is more than about twice their own
    size: zero-copy views into a request that also carried a big batch are copied out, so a
    session holds about what it counts; views that are most of their request stay views.
    Pass every array the session will hold (e.g. the merged dict), so that views left over
    from an earlier request are judged again when others of that request are replaced."""
    views: dict[int, tuple[Any, dict[int, int], list[str]]] = {}  # buffer id -> it, its views' sizes, names
    for name, a in arrays.items():
        base = a
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        _, sizes, names = views.setdefault(id(base), (base, {}, []))
        sizes[id(a)] = a.nbytes  # an array under two names counts once
        names.append(name)
    out = dict(arrays)
    for base, sizes, names in views.values():
        try:
            held = memoryview(base).nbytes
        except TypeError:  # not a buffer: nothing more is held than the arrays themselves
            continue
        if held > 2 * sum(sizes.values()) + 4096:
            out.update((n, arrays[n].copy()) for n in names)
    return out


def nbytes(*groups: Iterable[np.ndarray] | None) -> int:
    return sum(a.nbytes for group in groups if group for a in group)


@dataclass(eq=False)
class Session:
    id: str
    plan: Plan
    params: dict[str, np.ndarray]
    last_used: float
    owner: str = ""
    buffers: dict[str, np.ndarray] = field(default_factory=dict)
    data: dict[str, np.ndarray] = field(default_factory=dict)  # an uploaded dataset (UploadData)
    extra_bytes: int = 0  # e.g. a running Train call's optimizer state
    reserved_bytes: int = 0  # datasets being uploaded into this session, not yet committed
    plan_bytes: int = 0  # its compiled graph, estimated (engine.cost.plan_bytes)
    state_bytes: int = 0  # params + buffers + data + extra + plan
    tape: Tape | None = None
    tape_bytes: int = 0
    forward_id: int = 0  # of the cached forward; 0 = none
    forwards: int = 0  # forwards committed so far (the next one's id is forwards + 1)
    evicted: bool = False  # the tape was dropped to fit the cache budget
    training: bool = False  # a Train stream runs on this session (one at a time)
    tape_sizes: dict[int, int] = field(default_factory=dict)  # batch size -> Tape.nbytes (shapes are static)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def require_tape(self, forward_id: int = 0) -> Tape:
        """The cached forward, which must be ``forward_id`` when that is given."""
        if self.tape is None:
            why = ("its cached activations were evicted to fit the server's cache budget"
                   if self.evicted else "it has no cached forward since creation or the last parameter change")
            raise FailedPrecondition(f"cannot run backward on session {self.id[:8]}: {why}; call Forward first",
                                     "session_id")
        if forward_id and forward_id != self.forward_id:
            raise FailedPrecondition(f"forward {forward_id} of session {self.id[:8]} is no longer cached: forward "
                                     f"{self.forward_id} replaced it (another call on this session ran in between); "
                                     "run Forward and Backward again", "forward_id")
        return self.tape

    def require_idle(self, what: str) -> None:
        """Refuse ``what`` while a Train stream runs on this session."""
        if self.training:
            raise FailedPrecondition(f"{what} while a Train stream runs on session {self.id[:8]}: wait for it to "
                                     "finish or cancel it", "session_id")

    def tape_size(self, tape: Tape) -> int:
        size = self.tape_sizes.get(tape.batch_size)
        if size is None:
            size = self.tape_sizes[tape.batch_size] = tape.nbytes
        return size


class SessionStore:
    def __init__(self, ttl_seconds: float, max_sessions: int, cache_bytes: int,
                 state_bytes: int = 2**62, session_bytes: int = 2**62,
                 clock: Callable[[], float] = time.monotonic,
                 on_event: Callable[[str], None] = lambda event: None):
        """``on_event`` hears created | closed | expired | evicted (activations only)."""
        self.ttl = ttl_seconds
        self.on_event = on_event
        self.max_sessions = max_sessions
        self.cache_budget = cache_bytes
        self.state_budget = state_bytes
        self.session_budget = session_bytes
        self.clock = clock
        self.cache_bytes = 0
        self.state_bytes = 0
        self.high_water = 0  # most bytes held (state + cache) since the last memory release
        self.reserved_bytes = 0  # uploads in flight (reserve): counted against the budgets, not yet state
        self._next_sweep = 0.0
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()  # guards the dict and the byte counts

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, plan: Plan, params: dict[str, np.ndarray], buffers: dict[str, np.ndarray] | None = None,
               owner: str | None = None, plan_bytes: int = 0) -> Session:
        """A new session of ``owner`` (default: the calling principal, auth.py); ``plan_bytes``:
        what ``plan`` keeps in memory, counted with the parameters."""
        owner = principal() if owner is None else owner
        session = Session(secrets.token_hex(16), plan, owned(params), self.clock(), owner, owned(buffers or {}),
                          plan_bytes=plan_bytes)
        size = nbytes(session.params.values(), session.buffers.values()) + plan_bytes
        with self._lock:
            self._expire_idle()
            if len(self._sessions) >= self.max_sessions:
                raise ResourceExhausted(f"server holds {len(self._sessions)} sessions, the limit; "
                                        "close sessions you no longer need", "session_id")
            self._check_state(None, size, "params")
            session.state_bytes = size
            self.state_bytes += size
            self.high_water = max(self.high_water, self.state_bytes + self.cache_bytes)
            self._sessions[session.id] = session
        self.on_event("created")
        return session

    @contextmanager
    def use(self, session_id: str, owner: str | None = None) -> Iterator[Session]:
        """The session, locked for the duration of one call. Another owner's session is
        NOT_FOUND, exactly like one that does not exist; ``owner`` defaults to the calling
        principal, so every caller is checked without passing it."""
        session = self._find(session_id, owner)
        with session.lock:
            try:
                yield session
            finally:
                session.last_used = self.clock()

    def close(self, session_id: str, owner: str | None = None) -> None:
        session = self._find(session_id, owner)
        with self._lock:
            if self._sessions.pop(session.id, None) is None:
                raise NotFound(f"session {session_id[:8]!r}... not found (already closed or expired)", "session_id")
            self._forget(session)
        self.on_event("closed")

    def _find(self, session_id: str, owner: str | None) -> Session:
        if not session_id:
            raise InvalidArgument("session_id is empty; pass the id CreateSession returned", "session_id")
        with self._lock:
            self._expire_idle()
            session = self._sessions.get(session_id)
        if session is None or session.owner != (principal() if owner is None else owner):
            raise NotFound(f"session {session_id[:8]!r}... not found: unknown, closed, or idle for more than "
                           f"{self.ttl:g}s; create a new session", "session_id")
        return session

    def commit(self, session: Session, *, params: dict[str, np.ndarray] | None = None,
               buffers: dict[str, np.ndarray] | None = None, data: dict[str, np.ndarray] = KEEP,
               extra_bytes: int = KEEP, tape: Tape | None = KEEP, reserved: int = 0) -> None:
        """Apply a successful call's changes to ``session`` (whose lock the caller holds), all
        or nothing: the state budgets and the cache budget are checked before anything changes.
        ``params`` and ``buffers`` update the named entries; ``tape`` replaces the cached
        forward (None drops it), and gets the next forward id. ``reserved``: what the
        upload committing ``data`` reserved, which its data now takes the place of."""
        new_params = owned({**session.params, **params}) if params else session.params
        new_buffers = owned({**session.buffers, **buffers}) if buffers else session.buffers
        new_data = session.data if data is KEEP else data
        new_extra = session.extra_bytes if extra_bytes is KEEP else extra_bytes
        state = nbytes(new_params.values(), new_buffers.values(), new_data.values()) + new_extra + session.plan_bytes
        size = session.tape_size(tape) if tape is not KEEP and tape is not None else 0
        if size > self.cache_budget:
            raise ResourceExhausted(f"this forward's activations take {size} bytes, more than the server's "
                                    f"whole cache budget of {self.cache_budget}; use smaller batches", "inputs")
        with self._lock:
            self._check_state(session, state, "data" if data is not KEEP else "params", reserved)
            if session.id not in self._sessions:  # closed or expired while running: nothing to keep
                return
            self.state_bytes += state - session.state_bytes
            session.state_bytes = state
            session.params, session.buffers, session.data, session.extra_bytes = (
                new_params, new_buffers, new_data, new_extra)
            if tape is not KEEP:
                self._drop_tape(session)
                if tape is not None:
                    self._make_room(size, session)
                    session.forwards += 1
                    session.tape, session.tape_bytes, session.forward_id = tape, size, session.forwards
                    session.evicted = False
                    self.cache_bytes += size
            self.high_water = max(self.high_water, self.state_bytes + self.cache_bytes)

    @contextmanager
    def reserve(self, session: Session, data_bytes: int) -> Iterator[None]:
        """Hold ``data_bytes`` against the budgets while an upload fills a dataset of that size
        in place of the session's current one: refused (ResourceExhausted) before anything is
        allocated when it would not fit next to everything held or reserved already."""
        with self._lock:
            self._check_state(session, session.state_bytes - nbytes(session.data.values()) + data_bytes, "rows")
            self.reserved_bytes += data_bytes
            session.reserved_bytes += data_bytes
        try:
            yield
        finally:
            with self._lock:
                self.reserved_bytes -= data_bytes
                session.reserved_bytes -= data_bytes

    def _check_state(self, session: Session | None, size: int, field: str, own_reservation: int = 0) -> None:
        """Raise ResourceExhausted unless ``session`` (None: a new one) can hold ``size`` bytes of
        state next to the uploads in flight, other than the caller's ``own_reservation``."""
        current, pending = (session.state_bytes, session.reserved_bytes - own_reservation) if session else (0, 0)
        if size + pending > self.session_budget:
            raise ResourceExhausted(f"the session would hold {size + pending} bytes of parameters, buffers and data, "
                                    f"more than the per-session budget of {self.session_budget}", field)
        total = self.state_bytes + self.reserved_bytes - own_reservation - current + size
        if total > self.state_budget:
            raise ResourceExhausted(f"the server's sessions would hold {total} bytes of parameters, buffers and "
                                    f"data, more than its budget of {self.state_budget}; close sessions you no "
                                    "longer need or try another replica", field)

    def _make_room(self, size: int, session: Session) -> None:
        if self.cache_bytes + size <= self.cache_budget:
            return
        for other in sorted(self._sessions.values(), key=lambda s: s.last_used):
            if self.cache_bytes + size <= self.cache_budget:
                break
            if other.tape is not None and other is not session:
                self._drop_tape(other)
                other.evicted = True
                self.on_event("evicted")

    def _drop_tape(self, session: Session) -> None:
        self.cache_bytes -= session.tape_bytes
        session.tape, session.tape_bytes, session.forward_id = None, 0, 0

    def _forget(self, session: Session) -> None:
        self._drop_tape(session)
        self.state_bytes -= session.state_bytes
        session.state_bytes = 0

    def sweep(self) -> int:
        """Expire idle sessions now (the server calls this periodically, so an idle
        server frees memory and its metrics stay true without traffic). Returns the bytes
        given up since the high-water mark, and restarts the mark from here."""
        with self._lock:
            self._expire_idle()
            held = self.state_bytes + self.cache_bytes
            freed, self.high_water = self.high_water - held, held
            return freed

    def _expire_idle(self) -> None:
        now = self.clock()
        if now < self._next_sweep:  # a sweep is O(sessions): at most one a second
            return
        self._next_sweep = now + min(1.0, self.ttl)
        for sid in [sid for sid, s in self._sessions.items()
                    if now - s.last_used > self.ttl and not s.lock.locked()]:
            self._forget(self._sessions.pop(sid))
            self.on_event("expired")
