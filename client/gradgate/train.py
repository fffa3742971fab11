"""A minibatch training loop over a session: one round trip per step."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from gradgate.session import Session


class Optimizer(Protocol):
    def step(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def train(sess: Session, data: Mapping[str, Any], optimizer: Optimizer, epochs: int = 1,
          batch_size: int | None = None, seed: int = 0, progress: bool = True) -> list[float]:
    """Train the session's parameters on ``data`` ({input name: array, one row per example}).

    Each epoch visits the examples in a fresh order drawn from ``seed``, in batches of
    ``batch_size`` (None = all at once). The parameters the optimizer produces ride
    along with the next step's ForwardBackward and are pushed once more at the end.
    Returns the loss of every step.
    """
    data = {name: np.asarray(a) for name, a in data.items()}
    n = len(next(iter(data.values())))
    batch_size = batch_size or n
    rng = np.random.default_rng(seed)
    params = sess.get_params()
    losses: list[float] = []
    with tqdm(total=epochs * math.ceil(n / batch_size), disable=not progress, unit="step") as bar:
        for _ in range(epochs):
            order = rng.permutation(n)
            for start in range(0, n, batch_size):
                rows = order[start:start + batch_size]
                loss, grads = sess.forward_backward({name: a[rows] for name, a in data.items()}, params=params)
                params = optimizer.step(params, grads)
                losses.append(loss)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)  # drawn at tqdm's own pace
                bar.update()
    sess.set_params(params)
    return losses
