"""One training step of a 784-256-10 ReLU MLP, as ratios against baselines run here.

    python benchmarks/train_step.py [--repeats N]

Rows, per batch size:
  numpy      hand-written forward + backward (the floor: BLAS)
  torch      the same step with PyTorch CPU autograd, if torch is installed
             (pip install torch==2.13.0; a reference only, never a dependency)
  engine     gradgate's engine in-process (compile once, forward + backward)
  rpc        one ForwardBackward round trip through a local server, parameters pushed
             along (what gg.train does per step), float32
and the baseline of an empty unary gRPC call on the same machine. The ratios are
what to track: engine/numpy is the engine's overhead, rpc - engine is the wire.
"""
from __future__ import annotations

import argparse
import time
from concurrent import futures

import grpc
import numpy as np

import gradgate as gg
from gradgate_server import serve
from gradgate_server.engine import backward, compile_graph, forward


def best_of(fn, repeats: int) -> float:
    """Median seconds per call over ``repeats`` calls, after a warm-up."""
    for _ in range(max(3, repeats // 10)):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def mlp() -> gg.Graph:
    g = gg.Graph("float32")
    x, y = g.input("x", (None, 784)), g.input("y", (None,), dtype="int64")
    W1, b1 = g.param("W1", (784, 256)), g.param("b1", (256,))
    W2, b2 = g.param("W2", (256, 10)), g.param("b2", (10,))
    g.set_loss(gg.softmax_cross_entropy(gg.relu(x @ W1 + b1) @ W2 + b2, y))
    return g


def numpy_step(X: np.ndarray, y: np.ndarray, p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The CS231n two-layer net, forward and backward by hand."""
    h = np.maximum(0, np.dot(X, p["W1"]) + p["b1"])
    scores = np.dot(h, p["W2"]) + p["b2"]
    scores -= scores.max(axis=1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=1, keepdims=True)
    n = len(y)
    dscores = probs
    dscores[np.arange(n), y] -= 1
    dscores /= n
    dh = np.dot(dscores, p["W2"].T) * (h > 0)
    return {"W1": np.dot(X.T, dh), "b1": dh.sum(0), "W2": np.dot(h.T, dscores), "b2": dscores.sum(0)}


def torch_step_fn(X: np.ndarray, y: np.ndarray, p: dict[str, np.ndarray]):
    """The same step in PyTorch autograd, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    tx, ty = torch.from_numpy(X), torch.from_numpy(y)
    tp = {k: torch.from_numpy(v).requires_grad_() for k, v in p.items()}

    def step() -> None:
        for t in tp.values():
            t.grad = None
        scores = torch.relu(tx @ tp["W1"] + tp["b1"]) @ tp["W2"] + tp["b2"]
        torch.nn.functional.cross_entropy(scores, ty).backward()
    return step


def empty_call_seconds(repeats: int) -> float:
    """An empty unary call through grpcio on loopback: the transport's floor."""
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Empty": grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"")})
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/bench.Echo/Empty")
        seconds = best_of(lambda: call(b""), repeats)
    server.stop(0)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    g = mlp()
    params = gg.init_params(g, seed=0)
    plan = compile_graph(g.to_proto())
    empty = empty_call_seconds(args.repeats)
    print(f"empty gRPC call: {empty * 1e3:.3f} ms")
    print(f"{'batch':>5} {'numpy ms':>9} {'torch ms':>9} {'engine ms':>10} {'rpc ms':>8} {'engine/numpy':>13} "
          f"{'engine/torch':>13} {'rpc/numpy':>10} {'(rpc-engine)/empty':>19}")
    with serve("127.0.0.1:0") as server, gg.connect(server.address) as client, client.session(g, params) as sess:
        for n in (1, 32, 256):
            rng = np.random.default_rng(n)
            X = rng.normal(size=(n, 784)).astype(np.float32)
            y = rng.integers(0, 10, n)
            t_numpy = best_of(lambda: numpy_step(X, y, params), args.repeats)
            torch_step = torch_step_fn(X, y, params)
            t_torch = best_of(torch_step, args.repeats) if torch_step else float("nan")
            t_engine = best_of(lambda: backward(plan, forward(plan, {"x": X, "y": y}, params), plan.params),
                               args.repeats)
            t_rpc = best_of(lambda: sess.forward_backward({"x": X, "y": y}, params=params), args.repeats)
            print(f"{n:>5} {t_numpy * 1e3:>9.3f} {t_torch * 1e3:>9.3f} {t_engine * 1e3:>10.3f} {t_rpc * 1e3:>8.3f} "
                  f"{t_engine / t_numpy:>13.2f} {t_engine / t_torch:>13.2f} {t_rpc / t_numpy:>10.2f} "
                  f"{(t_rpc - t_engine) / empty:>19.2f}")


if __name__ == "__main__":
    main()
