"""The training loop: minibatch steps over a session, driven from here or run on the server.

Client-driven (the default), each step is one ForwardBackward round trip carrying
the parameters the optimizer produced. With ``on_server=True`` the data goes up once
and the server runs the steps back to back (the Train stream); every ``sync_every``
steps it sends the parameters and optimizer state back, and when the server or
session is lost the SDK re-creates the session from the last sync and resumes there.
Both loops visit the same batches (gradgate.schedule) with the same update rules
(gradgate.optim), so they end with the same parameters and the same losses.

``checkpoint="run.npz"`` also saves parameters, optimizer state, position and the
losses so far to that file (written to a temporary file, then renamed), and a call
that finds the file resumes from it: a killed client picks up where it stopped.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tqdm.auto import tqdm

from gradgate import schedule
from gradgate.errors import GradgateError
from gradgate.optim import Optimizer
from gradgate.session import Session

log = logging.getLogger("gradgate")
DEFAULT_SYNC_EVERY = 100


@dataclass
class _Run:
    """Where a run stands: every field is what a resume needs."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    params: dict[str, np.ndarray] = field(default_factory=dict)


def train(sess: Session, data: Mapping[str, Any], optimizer: Optimizer, epochs: int = 1,
          batch_size: int | None = None, seed: int = 0, progress: bool = True, *, on_server: bool = False,
          sync_every: int = DEFAULT_SYNC_EVERY, checkpoint: str | os.PathLike[str] | None = None) -> list[float]:
    """Train the session's parameters on ``data`` ({input name: array, one row per example}).

    Each epoch visits the examples in a fresh order drawn from ``seed``, in batches of
    ``batch_size`` (None = all at once). Returns the loss of every step.
    ``on_server``: upload ``data`` once and let the server run the steps (see the module
    doc); ``sync_every``: steps between the parameter syncs recovery resumes from (and
    between checkpoints). ``checkpoint``: a ``.npz`` path to save progress to and resume from.
    """
    data = {name: np.asarray(a) for name, a in data.items()}
    n = len(next(iter(data.values())))
    batch_size = batch_size or n
    if sync_every < 1:
        raise ValueError(f"sync_every must be >= 1, got {sync_every}")
    total = schedule.step_count(n, batch_size, epochs)
    meta = json.dumps({"rows": n, "batch_size": batch_size, "epochs": epochs, "seed": seed})
    run = _resume(checkpoint, meta, sess, optimizer) if checkpoint else None
    if run is None:
        run = _Run(params=sess.get_params())
    with tqdm(total=total, initial=run.step, disable=not progress, unit="step") as bar:
        loop = _on_server if on_server else _client_driven
        loop(sess, data, optimizer, batch_size, epochs, seed, sync_every, run, bar,
             lambda: _save(checkpoint, meta, run, optimizer) if checkpoint else None)
    if checkpoint:
        _save(checkpoint, meta, run, optimizer)
    return run.losses


def _client_driven(sess: Session, data: dict[str, np.ndarray], optimizer: Optimizer, batch_size: int,
                   epochs: int, seed: int, sync_every: int, run: _Run, bar: tqdm, saved: Any) -> None:
    n = len(next(iter(data.values())))
    params = run.params
    for rows in schedule.batches(n, batch_size, epochs, seed, run.step):
        # a new seed per step: fresh dropout masks, and the same ones when a run is repeated
        loss, grads = sess.forward_backward({name: a[rows] for name, a in data.items()}, params=params,
                                            seed=schedule.step_seed(seed, run.step))
        params = optimizer.step(params, grads)
        run.step += 1
        run.losses.append(loss)
        run.params = params
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)  # drawn at tqdm's own pace
        bar.update()
        if run.step % sync_every == 0:
            saved()
    sess.set_params(params)


def _on_server(sess: Session, data: dict[str, np.ndarray], optimizer: Optimizer, batch_size: int,
               epochs: int, seed: int, sync_every: int, run: _Run, bar: tqdm, saved: Any) -> None:
    """Run the schedule in Train streams, resuming from the last sync when the stream breaks."""
    client = sess.client
    uploaded = False
    deadline = None  # while recovering: when to give up
    while True:
        try:
            if not uploaded:
                sess.upload(data)
                uploaded = True
            for reply in sess.train_stream(optimizer, batch_size, epochs, seed, run.step, sync_every):
                kind = reply.WhichOneof("kind")
                if kind == "progress":
                    p = reply.progress
                    del run.losses[p.first_step:]  # a resumed stream repeats the steps after the last sync
                    run.losses.extend(p.losses)
                    bar.update(len(run.losses) - bar.n)
                    if p.losses:
                        bar.set_postfix(loss=f"{p.losses[-1]:.4f}", refresh=False)
                else:
                    sync = reply.sync
                    run.step, run.params = sync.step, sess._synced(sync, optimizer)
                    del run.losses[run.step:]
                    deadline = None
                    saved()
                    if sync.done:
                        return
            raise GradgateError(grpc.StatusCode.UNAVAILABLE, "the Train stream ended before the schedule did")
        except GradgateError as e:
            recoverable = e.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND,
                                     grpc.StatusCode.CANCELLED)
            if not recoverable or not client.recover_sessions:
                raise
            deadline = deadline or time.monotonic() + client.retry_seconds
            if time.monotonic() > deadline:
                raise
            log.warning("training on the server stopped at step %d (%s); resuming from the last sync",
                        run.step, e.code.name)
            del run.losses[run.step:]
            bar.update(run.step - bar.n)
            uploaded = sess._restore(run.params, deadline)


def _resume(path: str | os.PathLike[str], meta: str, sess: Session, optimizer: Optimizer) -> _Run | None:
    """The run saved at ``path``, applied to ``sess`` and ``optimizer``; None when there is none."""
    path = Path(path)
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as f:
        if str(f["meta"]) != meta:
            raise ValueError(f"checkpoint {path} is of another run ({f['meta']}); this one is {meta}: "
                             "remove it or pass another path")
        params = {k[len("param/"):]: f[k] for k in f.files if k.startswith("param/")}
        slots = {k[len("optimizer/"):]: f[k] for k in f.files if k.startswith("optimizer/")}
        run = _Run(int(f["step"]), [float(x) for x in f["losses"]], params)
        optimizer.load_state(int(f["optimizer_steps"]), slots)
    sess.set_params(params)
    log.info("resuming from checkpoint %s at step %d", path, run.step)
    return run


def _save(path: str | os.PathLike[str], meta: str, run: _Run, optimizer: Optimizer) -> None:
    """Write the run to ``path`` atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"meta": np.array(meta), "step": np.array(run.step), "losses": np.array(run.losses, np.float64),
              "optimizer_steps": np.array(optimizer.step_count),
              **{f"param/{k}": v for k, v in run.params.items()},
              **{f"optimizer/{k}": v for k, v in optimizer.state().items()}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub takes allow_pickle second
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
