"""One training step (forward + backward) of a small convnet: the engine in-process vs PyTorch eager.

    python benchmarks/convnet_step.py [--quick]

The net: (N, 3, 32, 32) float32 -> conv 3x3 16 + relu + max pool 2 -> conv 3x3 32 + relu +
max pool 2 -> affine 2048x10 -> softmax cross-entropy, batch 32. PyTorch (pip install
torch==2.13.0) is the reference; ``measure()`` returns engine_ms, torch_ms and their ratio
(NaN without torch). The two steps alternate, so both see the same machine load (it is
shared here), and the medians are compared; both use the default BLAS/OpenMP threads.
"""
from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np

import gradgate as gg
from gradgate_server.engine import backward, compile_graph, forward

BATCH, CLASSES = 32, 10


def convnet() -> gg.Graph:
    g = gg.Graph("float32")
    x, y = g.input("x", (None, 3, 32, 32)), g.input("y", (None,), dtype="int64")
    w1, b1 = g.param("w1", (16, 3, 3, 3)), g.param("b1", (16,))
    w2, b2 = g.param("w2", (32, 16, 3, 3)), g.param("b2", (32,))
    fw, fb = g.param("fw", (32 * 8 * 8, CLASSES)), g.param("fb", (CLASSES,))
    h = gg.max_pool2d(gg.relu(gg.conv2d(x, w1, b1, padding=1)), 2)
    h = gg.max_pool2d(gg.relu(gg.conv2d(h, w2, b2, padding=1)), 2)
    g.set_loss(gg.softmax_cross_entropy(gg.affine(gg.flatten(h), fw, fb), y))
    return g


def median_ms(steps: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median milliseconds of each step, timed in turns after a warm-up."""
    times: list[list[float]] = [[] for _ in steps]
    for r in range(max(2, repeats // 5) + repeats):
        for step, record in zip(steps, times):
            start = time.perf_counter()
            step()
            if r >= max(2, repeats // 5):
                record.append(time.perf_counter() - start)
    return [float(np.median(t)) * 1e3 for t in times]


def measure(quick: bool = False) -> dict[str, float]:
    repeats = 5 if quick else 30
    g = convnet()
    params = gg.init_params(g, seed=0)
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(BATCH, 3, 32, 32)).astype(np.float32),
             "y": rng.integers(0, CLASSES, BATCH)}
    plan = compile_graph(g.to_proto())

    def engine_step() -> None:
        backward(plan, forward(plan, batch, params), plan.params)

    try:
        import torch
    except ImportError:
        (engine_ms,) = median_ms([engine_step], repeats)
        return {"engine_ms": engine_ms, "torch_ms": math.nan, "ratio": math.nan}
    F = torch.nn.functional
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    x, y = torch.from_numpy(batch["x"]), torch.from_numpy(batch["y"])

    def torch_step() -> None:
        for p in t.values():
            p.grad = None
        h = F.max_pool2d(F.relu(F.conv2d(x, t["w1"], t["b1"], padding=1)), 2)
        h = F.max_pool2d(F.relu(F.conv2d(h, t["w2"], t["b2"], padding=1)), 2)
        F.cross_entropy(torch.flatten(h, 1) @ t["fw"] + t["fb"], y).backward()

    engine_ms, torch_ms = median_ms([engine_step, torch_step], repeats)
    return {"engine_ms": engine_ms, "torch_ms": torch_ms, "ratio": engine_ms / torch_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    result = measure(parser.parse_args().quick)
    print(f"convnet step, batch {BATCH}: engine {result['engine_ms']:.2f} ms, PyTorch eager "
          f"{result['torch_ms']:.2f} ms, engine/torch {result['ratio']:.2f}x")


if __name__ == "__main__":
    main()
