"""Training on the server (DESIGN.md): a dataset uploaded once into the session, then
a Train stream that runs optimizer steps back to back, with no round trip per step.

The schedule (gradgate.schedule) and the update rules (gradgate.optim) are the SDK's
own, so a run on the server gives the parameters of the client-driven loop. Each
step takes the session's lock for itself, so other calls (GetParameters, say) are
answered between steps. Losses stream out in batches, at most every
``PROGRESS_SECONDS``; parameters and optimizer state every ``sync_every`` steps, on
request, and at the end.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator

import grpc
import numpy as np

from gradgate import optim, schedule
from gradgate.codec import from_tensor_map
from gradgate.v1 import train_pb2

from .config import Config
from .engine import DeadlineExceeded, InvalidArgument, ResourceExhausted, backward, forward
from .engine.cost import Cost, admit
from .engine.ops import BATCH, fmt
from .metrics import Metrics
from .rpc import Call, Requests
from .sessions import Session, SessionStore

PROGRESS_SECONDS = 0.05


class Training:
    def __init__(self, store: SessionStore, config: Config, metrics: Metrics):
        self.store, self.config, self.metrics = store, config, metrics

    # -- UploadData ------------------------------------------------------------

    def upload(self, calls: Requests) -> bytes:
        """Fill every input column chunk by chunk, then swap the dataset in (all or nothing)."""
        first = next(calls, None)
        if first is None:
            raise InvalidArgument("UploadData got no message; the first names the session and the row count",
                                  "session_id")
        session_id, rows = first.msg.session_id, first.msg.rows
        with self.store.use(session_id) as session:
            session.require_idle("cannot replace the dataset")
            plan = session.plan
        if rows <= 0:
            raise InvalidArgument(f"rows must be > 0, got {rows}", "rows")
        columns = {}
        for s in plan.inputs:
            name, shape = plan.names[s], plan.shapes[s]
            if not shape or shape[0] != BATCH or BATCH in shape[1:]:
                raise InvalidArgument(f"input {name!r} {fmt(shape)} cannot be a dataset column: its first "
                                      "dimension must be the batch dimension N, and only that one", "columns")
            columns[name] = (rows, *shape[1:])
        size = sum(math.prod(shape) * plan.dtypes[plan.slot[name]].itemsize for name, shape in columns.items())
        with self.store.reserve(session, size):  # before allocating anything
            data = {name: np.empty(shape, plan.dtypes[plan.slot[name]]) for name, shape in columns.items()}
            self._fill(data, rows, first, calls)
            with self.store.use(session_id) as session:
                session.require_idle("cannot replace the dataset")  # a Train may have started meanwhile
                self.store.commit(session, data=data, reserved=size)
        return first.reply(train_pb2.UploadDataResponse(rows=rows, bytes=size))

    def _fill(self, data: dict[str, np.ndarray], rows: int, first: Call, calls: Iterator[Call]) -> None:
        """Copy every chunk of the upload into ``data``, checking each against the announced shape."""
        session_id = first.msg.session_id
        filled = 0
        for call in _chain(first, calls):
            if call.msg.session_id not in ("", session_id):
                raise InvalidArgument("every message of an upload must name the same session", "session_id")
            chunk = call.arrays["columns"]
            if set(chunk) != set(data):
                raise InvalidArgument(f"each chunk must carry every input column {sorted(data)}, got {sorted(chunk)}",
                                      "columns")
            n = None
            for name, a in chunk.items():
                field = f"columns[{name!r}]"
                column = data[name]
                if a.dtype != column.dtype or a.shape[1:] != column.shape[1:] or a.ndim != column.ndim:
                    raise InvalidArgument(f"column {name!r} rows must be {column.dtype.name} "
                                          f"{fmt((BATCH, *column.shape[1:]))}, got {a.dtype.name} {fmt(a.shape)}", field)
                if n not in (None, len(a)):
                    raise InvalidArgument(f"column {name!r} has {len(a)} rows in this chunk, the others {n}", field)
                n = len(a)
                if filled + n > rows:
                    raise InvalidArgument(f"the upload sends more than the {rows} rows it announced", field)
                column[filled:filled + n] = a
            filled += n or 0
        if filled != rows:
            raise InvalidArgument(f"the upload announced {rows} rows but sent {filled}", "rows")

    # -- Train -----------------------------------------------------------------

    def train(self, calls: Requests, context: grpc.ServicerContext) -> Iterator[bytes]:
        first = next(calls, None)
        if first is None or first.msg.WhichOneof("kind") != "start":
            raise InvalidArgument("the first Train message must be `start`", "start")
        start = first.msg.start
        with self.store.use(start.session_id) as session:
            session.require_idle("cannot start another Train")
            steps, optimizer = self._plan(session, start)
            self.store.commit(session, extra_bytes=optimizer.state_bytes(session.params))
            session.training = True
        step, losses, first_step, flushed = start.start_step, [], start.start_step, time.monotonic()
        costs: dict[int, Cost] = {}  # by batch size: admitted once each
        try:
            for rows in steps:
                if not context.is_active():
                    raise DeadlineExceeded(f"the Train call ended (cancelled or past its deadline) at step {step}")
                # the seed gg.train sends with the same step, so both loops draw the same dropout masks
                try:
                    losses.append(self._step(start.session_id, rows, optimizer, schedule.step_seed(start.seed, step),
                                             costs))
                except (InvalidArgument, ResourceExhausted) as e:  # this batch's fault: say which step it was
                    raise type(e)(f"step {step}: {e.message}", e.field) from None
                step += 1
                # the client's later messages, read between steps: each `sync` asks for parameters now
                asked = any(call.msg.WhichOneof("kind") == "sync" for call in calls.ready())
                if asked or (start.sync_every and step % start.sync_every == 0):
                    yield first.reply(_progress(first_step, losses))
                    first_step, losses, flushed = step, [], time.monotonic()
                    yield self._sync(first, start.session_id, step, optimizer, done=False)
                elif time.monotonic() - flushed > PROGRESS_SECONDS:
                    yield first.reply(_progress(first_step, losses))
                    first_step, losses, flushed = step, [], time.monotonic()
            if losses:
                yield first.reply(_progress(first_step, losses))
            yield self._sync(first, start.session_id, step, optimizer, done=True)
        finally:
            try:  # as its owner: grpc may close this generator from a thread without the caller's principal
                with self.store.use(start.session_id, session.owner) as session:
                    session.training = False
                    self.store.commit(session, extra_bytes=0)
            except Exception:  # the session may be gone; nothing to release then
                pass

    def _plan(self, session: Session, start: train_pb2.TrainStart) -> tuple[Iterator, optim.SGD | optim.Adam]:
        """Validate a TrainStart: the schedule's row indices from start_step on, and the optimizer."""
        if not session.data:
            raise InvalidArgument("the session has no dataset: call UploadData before Train", "session_id")
        n = len(next(iter(session.data.values())))
        try:
            optimizer = optim.from_proto(start.optimizer)
        except ValueError as e:
            raise InvalidArgument(str(e), "optimizer") from None
        for field, value in (("sync_every", start.sync_every), ("start_step", start.start_step),
                             ("epochs", start.epochs), ("batch_size", start.batch_size)):
            if value < 0:
                raise InvalidArgument(f"{field} must be >= 0, got {value}", field)
        if start.batches:
            bad = [(r.start, r.stop) for r in start.batches if not 0 <= r.start < r.stop <= n]
            if bad:
                raise InvalidArgument(f"batch row range(s) {bad[:3]} are not within the dataset's {n} rows "
                                      "(need 0 <= start < stop <= rows)", "batches")
            total = len(start.batches)
            steps: Iterator = (slice(r.start, r.stop) for r in start.batches[start.start_step:])
        else:
            batch_size = start.batch_size or n
            total = schedule.step_count(n, batch_size, start.epochs)
            steps = schedule.batches(n, batch_size, start.epochs, start.seed, start.start_step)
        if start.start_step > total:
            raise InvalidArgument(f"start_step {start.start_step} is past the schedule's {total} steps", "start_step")
        if start.HasField("optimizer_state"):
            state = start.optimizer_state
            slots = from_tensor_map(state.slots, "optimizer_state.slots", self.config.max_tensor_elements)
            params = session.params
            for key, a in slots.items():
                name = key.partition("/")[2]
                if name not in params or a.shape != params[name].shape or a.dtype != params[name].dtype:
                    raise InvalidArgument(f"optimizer state {key!r} does not match a parameter of the session",
                                          f"optimizer_state.slots[{key!r}]")
            try:
                optimizer.load_state(state.step, slots)
            except ValueError as e:
                raise InvalidArgument(str(e), "optimizer_state") from None
        return steps, optimizer

    def _step(self, session_id: str, rows: np.ndarray | slice, optimizer: optim.SGD | optim.Adam,
              seed: int, costs: dict[int, Cost]) -> float:
        with self.store.use(session_id) as session:
            plan = session.plan
            inputs = {name: column[rows] for name, column in session.data.items()}
            size = len(next(iter(inputs.values())))
            cost = costs.get(size)
            if cost is None:  # bounded before anything is allocated; a batch's cost depends on its size alone
                cost = costs[size] = admit(plan, inputs, self.config.limits, backward=True)
            tape = forward(plan, inputs, session.params, session.buffers, seed=seed, batch=cost.batch)
            grads = backward(plan, tape, plan.params)
            with np.errstate(all="ignore"):  # a diverging run gives NaN losses, not warnings on stderr
                params = optimizer.step(session.params, grads)
            self.store.commit(session, params=params, buffers=tape.updates, tape=None)
        self.metrics.forward_ran(tape.batch_size, tape.loss)
        return tape.loss

    def _sync(self, first: Call, session_id: str, step: int, optimizer: optim.SGD | optim.Adam,
              done: bool) -> bytes:
        with self.store.use(session_id) as session:
            params, buffers = session.params, session.buffers  # replaced, never changed in place, by commits
        msg = train_pb2.TrainSync(step=step, done=done, optimizer_state=train_pb2.OptimizerState(
            step=optimizer.step_count))
        return first.reply(train_pb2.TrainResponse(sync=msg), sync={
            "params": params, "buffers": buffers, "optimizer_state": {"slots": optimizer.state()}})


def _progress(first_step: int, losses: list[float]) -> train_pb2.TrainResponse:
    return train_pb2.TrainResponse(progress=train_pb2.TrainProgress(first_step=first_step, losses=losses))


def _chain(first: Call, rest: Iterator[Call]) -> Iterator[Call]:
    yield first
    yield from rest
