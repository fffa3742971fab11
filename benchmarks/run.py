"""Every performance target as a ratio against a baseline measured in the same run.

    python benchmarks/run.py            # the full run, written to benchmarks/results.md
    python benchmarks/run.py --quick    # seconds: every row once, few repeats (CI runs this)

Baselines run in this process, interleaved with what they are compared to: hand-written
numpy, PyTorch eager (when installed: pip install torch==2.13.0), the engine in-process,
a raw grpcio echo moving the same bytes, an empty unary call. Model: a 784-256-10 ReLU
MLP, softmax cross-entropy, float32, Adam. Timings are medians of alternating rounds; a
ratio is the median of the rounds' ratios, given with their lowest and highest. Nothing is
asserted.

Targets (issue 7):
  T7  a step of training on the server <= 1.3 x the in-process engine step (forward,
      backward, the same Adam update) at batch 1, 32, 256, 1024; at batch 256 faster than
      PyTorch eager training in this process
  T2  a client-driven step (gg.train's ForwardBackward with the parameters, then Adam) <=
      the in-process step + 1.2 x a raw grpcio echo of the same bytes in one call
  T3  the lecture's 3-4-4-1 net, forward_backward through the SDK (over its stream of calls; also
      measured as unary calls, for reference) <= 1.3 x an empty unary call; for reference, its
      forward and backward as two calls over the stream against two unary calls
  T16 a 16 MiB input through Forward <= 1.25 x a raw grpcio call carrying the same bytes
T2, T3 and T16 are measured as the SDK sends them to a server on this host (through shared
memory and pipes, gradgate.shared_memory), and, for reference, over the socket
(shared_memory=False) as to a server elsewhere.
Also: tail latency of concurrent calls by BLAS threads per call, and (from other
modules, when present) the convnet step against PyTorch, 2 replicas against 1, a server
process on one core (--cpus) against one free to use any, and how long a /metrics scrape
of each takes while it computes.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import threadpoolctl

import gradgate as gg
from gradgate.memory import tune_malloc
from gradgate_server import Config, serve
from gradgate_server.engine import backward, compile_graph, forward

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


@dataclass
class Row:
    target: str
    measured: str  # what was timed, with its time
    baseline: str  # what it is compared to, with its time
    ratio: float
    goal: str  # e.g. "<= 1.3"
    met: bool | None  # None: no goal, a reference
    spread: tuple[float, float] | None = None  # the lowest and highest ratio of single rounds

    @classmethod
    def of(cls, target: str, measured: str, baseline: str, ratio: tuple[float, tuple[float, float]], goal: str = "",
           meets: Callable[[float], bool] | None = None) -> Row:
        """A row whose ratio is a median over rounds with its range (Timings.ratio)."""
        return cls(target, measured, baseline, ratio[0], goal, None if meets is None else meets(ratio[0]), ratio[1])

    def cells(self) -> list[str]:
        verdict = "—" if self.met is None else "met" if self.met else "NOT met"
        ratio = f"{self.ratio:.2f}" + (f" ({self.spread[0]:.2f}-{self.spread[1]:.2f})" if self.spread else "")
        return [self.target, self.measured, self.baseline, ratio, self.goal, verdict]


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Timings(dict):
    """Seconds by name: the median of its rounds' medians; ``rounds[name]`` holds those."""

    def __init__(self, rounds: dict[str, list[float]]):
        super().__init__((k, statistics.median(v)) for k, v in rounds.items())
        self.rounds = rounds

    def scaled(self, factor: float) -> Timings:
        return Timings({k: [x * factor for x in v] for k, v in self.rounds.items()})

    def ratio(self, of: Callable[[Mapping[str, float]], float]) -> tuple[float, tuple[float, float]]:
        """``of`` the timings of each round: their median, and the lowest and highest (how much
        the machine moved)."""
        count = min(len(v) for v in self.rounds.values())
        ratios = [of({k: v[i] for k, v in self.rounds.items()}) for i in range(count)]
        return statistics.median(ratios), (min(ratios), max(ratios))


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, rounds: int = 5,
                warmup: int = 3) -> Timings:
    """Medians of each fn, measured in alternating rounds so drift hits all of them alike."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(median_seconds(fn, max(1, repeats // rounds), warmup))
    return Timings(samples)


def _repeat(fn: Callable[[], object], times: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(times):
            fn()
    return run


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


# -- models ------------------------------------------------------------------------------

def mlp(dtype: str = "float32") -> gg.Graph:
    g = gg.Graph(dtype)
    x, y = g.input("x", (None, 784)), g.input("y", (None,), dtype="int64")
    W1, b1 = g.param("W1", (784, 256)), g.param("b1", (256,))
    W2, b2 = g.param("W2", (256, 10)), g.param("b2", (10,))
    g.set_loss(gg.softmax_cross_entropy(gg.relu(x @ W1 + b1) @ W2 + b2, y))
    return g


def lecture_net() -> tuple[gg.Graph, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """CS231n's 3-4-4-1 sigmoid net (h1 = f(W1 x + b1), h2 = f(W2 h1 + b2), out = W3 h2 + b3)."""
    rng = np.random.default_rng(4)
    shapes = {"W1": (4, 3), "b1": (4, 1), "W2": (4, 4), "b2": (4, 1), "W3": (1, 4), "b3": (1, 1)}
    params = {k: rng.normal(size=s) for k, s in shapes.items()}
    g = gg.Graph("float64")
    x = g.input("x", (3, 1))
    p = {k: g.param(k, s) for k, s in shapes.items()}
    h1 = gg.sigmoid(p["W1"] @ x + p["b1"])
    h2 = gg.sigmoid(p["W2"] @ h1 + p["b2"])
    g.set_loss(gg.sum(p["W3"] @ h2 + p["b3"]))
    return g, params, {"x": rng.normal(size=(3, 1))}


def dataset(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 784)).astype(np.float32), "y": rng.integers(0, 10, n)}


def numpy_step(X: np.ndarray, y: np.ndarray, p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The CS231n two-layer net, forward and backward by hand."""
    h = np.maximum(0, np.dot(X, p["W1"]) + p["b1"])
    scores = np.dot(h, p["W2"]) + p["b2"]
    scores -= scores.max(axis=1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=1, keepdims=True)
    dscores = probs
    dscores[np.arange(len(y)), y] -= 1
    dscores /= len(y)
    dh = np.dot(dscores, p["W2"].T) * (h > 0)
    return {"W1": np.dot(X.T, dh), "b1": dh.sum(0), "W2": np.dot(h.T, dscores), "b2": dscores.sum(0)}


def torch_training_step(batch: dict[str, np.ndarray], params: dict[str, np.ndarray]) -> Callable[[], None] | None:
    """PyTorch eager: forward, backward and torch.optim.Adam, in this process; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    tx, ty = torch.from_numpy(batch["x"]), torch.from_numpy(batch["y"])
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    opt = torch.optim.Adam(tp.values(), lr=1e-3)

    def step() -> None:
        opt.zero_grad()
        scores = torch.relu(tx @ tp["W1"] + tp["b1"]) @ tp["W2"] + tp["b2"]
        torch.nn.functional.cross_entropy(scores, ty).backward()
        opt.step()
    return step


def client_driven_step(sess: gg.Session, batch: dict[str, np.ndarray]) -> Callable[[], None]:
    """gg.train's client-driven step: ForwardBackward with the parameters pushed, then Adam here."""
    params, opt = sess.get_params(), gg.optim.Adam(1e-3)

    def step() -> None:
        nonlocal params
        _, grads = sess.forward_backward(batch, params=params)
        params = opt.step(params, grads)
    return step


# -- raw grpcio baselines ------------------------------------------------------------------

class Echo:
    """A raw grpcio server: Empty answers b""; Echo answers a preset reply of any size."""

    def __init__(self) -> None:
        self.reply = b""
        handler = grpc.method_handlers_generic_handler("bench.Echo", {
            "Empty": grpc.unary_unary_rpc_method_handler(lambda request, context: b""),
            "Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: self.reply)})
        options = [("grpc.max_receive_message_length", 256 * 2**20), ("grpc.max_send_message_length", 256 * 2**20)]
        self.server = grpc.server(futures.ThreadPoolExecutor(4), options=options)
        self.server.add_generic_rpc_handlers((handler,))
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
        self.empty = self.channel.unary_unary("/bench.Echo/Empty", _registered_method=True)
        self.echo = self.channel.unary_unary("/bench.Echo/Echo", _registered_method=True)

    def moving(self, up: int, down: int) -> Callable[[], object]:
        """A call that sends ``up`` bytes and receives ``down`` bytes."""
        request, reply = bytes(up), bytes(down)

        def call() -> object:
            self.reply = reply
            return self.echo(request, timeout=60)
        return call

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0)


# -- the targets ---------------------------------------------------------------------------

def training_rows(client: gg.Client, socket_client: gg.Client, echo: Echo, batches: list[int],
                  quick: bool) -> list[Row]:
    g = mlp()
    plan = compile_graph(g.to_proto())
    init = gg.init_params(g, seed=0)
    rows = []
    for n in batches:
        steps = {1: 600, 32: 300, 256: 60, 1024: 24}[n] // (12 if quick else 1)
        data = dataset(max(n, min(4096, n * steps)))
        batch = {k: v[:n] for k, v in data.items()}
        local_params, local_opt = dict(init), gg.optim.Adam(1e-3)

        def in_process() -> None:
            nonlocal local_params
            tape = forward(plan, batch, local_params)
            local_params = local_opt.step(local_params, backward(plan, tape, plan.params))

        with client.session(g, init) as sess, socket_client.session(g, init) as socket_sess:
            client_driven = client_driven_step(sess, batch)
            over_socket = client_driven_step(socket_sess, batch)
            sess.upload(data)
            server_opt = gg.optim.Adam(1e-3)
            epochs = max(1, steps * n // len(data["y"]))

            def on_server() -> None:
                for _ in sess.train_stream(server_opt, n, epochs, 0, sync_every=100):
                    pass

            up = sum(a.nbytes for a in batch.values()) + sum(a.nbytes for a in init.values())
            down = sum(a.nbytes for a in init.values())
            torch_step = torch_training_step(batch, init) if n == 256 else None
            rounds = 2 if quick else 9  # a median of many: single rounds here move by 1.5x on this machine
            t = interleaved({"in_process": in_process, "client_driven": client_driven, "socket": over_socket,
                             "echo": echo.moving(up, down)}, max(6, steps // 2), rounds)
            # a whole Train stream against as many local steps, alternating, so all see the same machine
            total_steps = epochs * (len(data["y"]) // n)
            runs = {"on_server": on_server, "in_process_run": _repeat(in_process, total_steps)}
            if torch_step:
                runs["torch"] = _repeat(torch_step, total_steps)
            r = interleaved(runs, rounds, rounds, warmup=1).scaled(1 / total_steps)
        rows.append(Row.of(f"T7 batch {n}", f"step on the server {ms(r['on_server'])}",
                           f"engine in-process {ms(r['in_process_run'])}",
                           r.ratio(lambda x: x["on_server"] / x["in_process_run"]), "<= 1.3", lambda v: v <= 1.3))
        if "torch" in r:
            rows.append(Row.of(f"T7 batch {n} vs PyTorch", f"step on the server {ms(r['on_server'])}",
                               f"PyTorch eager {ms(r['torch'])}", r.ratio(lambda x: x["on_server"] / x["torch"]),
                               "< 1", lambda v: v < 1))
        wire = t["client_driven"] - t["in_process"]
        rows.append(Row.of(f"T2 batch {n}", f"client-driven step {ms(t['client_driven'])} (wire {ms(wire)})",
                           f"raw echo of {(up + down) / 2**20:.2f} MiB {ms(t['echo'])}",
                           t.ratio(lambda x: (x["client_driven"] - x["in_process"]) / x["echo"]), "<= 1.2",
                           lambda v: v <= 1.2))
        rows.append(Row.of(f"T2 batch {n} over the socket", f"shared_memory=False {ms(t['socket'])} "
                           f"(wire {ms(t['socket'] - t['in_process'])})", f"raw echo {ms(t['echo'])}",
                           t.ratio(lambda x: (x["socket"] - x["in_process"]) / x["echo"])))
    return rows


def reference_rows(batches: list[int], quick: bool) -> list[Row]:
    """How the engine compares with hand-written numpy (forward + backward only)."""
    g = mlp()
    plan = compile_graph(g.to_proto())
    params = gg.init_params(g, seed=0)
    rows = []
    for n in batches:
        batch = {k: v[:n] for k, v in dataset(n).items()}
        t = interleaved({"engine": lambda: backward(plan, forward(plan, batch, params), plan.params),
                         "numpy": lambda: numpy_step(batch["x"], batch["y"], params)}, 30 if quick else 300)
        rows.append(Row.of(f"engine batch {n}", f"forward+backward {ms(t['engine'])}", f"hand numpy {ms(t['numpy'])}",
                           t.ratio(lambda x: x["engine"] / x["numpy"])))
    return rows


def tiny_rows(client: gg.Client, socket_client: gg.Client, unary_client: gg.Client, echo: Echo,
              quick: bool) -> list[Row]:
    """T3, as the SDK sends it to a server on this host (its stream of calls, through shared
    memory and pipes) and, for reference, over the socket and as unary calls; and the same
    net's forward and backward as two calls, on the stream over the socket and unary."""
    g, params, batch = lecture_net()

    def two_calls(sess: gg.Session) -> Callable[[], object]:
        return lambda: (sess.forward(batch), sess.backward())

    with client.session(g, params) as sess, socket_client.session(g, params) as socket, \
            unary_client.session(g, params) as unary:
        t = interleaved({"sdk": lambda: sess.forward_backward(batch), "socket": lambda: socket.forward_backward(batch),
                         "unary": lambda: unary.forward_backward(batch), "two": two_calls(socket),
                         "two_unary": two_calls(unary), "empty": lambda: echo.empty(b"", timeout=10)},
                        100 if quick else 2000)
    return [Row.of("T3 3-4-4-1 net", f"forward_backward {ms(t['sdk'])}", f"empty unary call {ms(t['empty'])}",
                   t.ratio(lambda x: x["sdk"] / x["empty"]), "<= 1.3", lambda v: v <= 1.3),
            Row.of("T3 over the socket", f"forward_backward, shared_memory=False {ms(t['socket'])}",
                   f"empty unary call {ms(t['empty'])}", t.ratio(lambda x: x["socket"] / x["empty"])),
            Row.of("T3 with unary calls", f"forward_backward, call_streams=False {ms(t['unary'])}",
                   f"empty unary call {ms(t['empty'])}", t.ratio(lambda x: x["unary"] / x["empty"])),
            Row.of("3-4-4-1 net, forward + backward", f"two calls over the CallStream {ms(t['two'])}",
                   f"two unary calls {ms(t['two_unary'])}", t.ratio(lambda x: x["two"] / x["two_unary"]))]


def big_tensor_rows(client: gg.Client, socket_client: gg.Client, echo: Echo, quick: bool) -> list[Row]:
    g = gg.Graph("float32")
    x = g.input("x", (None, 2**20))
    g.set_loss(gg.sum(x))
    big = np.random.default_rng(0).normal(size=(4, 2**20)).astype(np.float32)  # 16 MiB
    with client.session(g, {}) as sess, socket_client.session(g, {}) as socket_sess:
        t = interleaved({"forward": lambda: sess.forward({"x": big}), "socket": lambda: socket_sess.forward({"x": big}),
                         "raw": echo.moving(big.nbytes, 16)}, 4 if quick else 60)
    return [Row.of("T16 16 MiB input", f"Forward {ms(t['forward'])}", f"raw grpcio call {ms(t['raw'])}",
                   t.ratio(lambda x: x["forward"] / x["raw"]), "<= 1.25", lambda v: v <= 1.25),
            Row.of("T16 over the socket", f"Forward, shared_memory=False {ms(t['socket'])}",
                   f"raw grpcio call {ms(t['raw'])}", t.ratio(lambda x: x["socket"] / x["raw"]))]


def blas_rows(quick: bool) -> list[Row]:
    """p90 latency of 4 concurrent batch-256 ForwardBackward calls, by BLAS threads per call."""
    g = mlp()
    batch = dataset(256)
    calls = 8 if quick else 200
    p90 = {}
    for threads in (1, 2):
        with threadpoolctl.threadpool_limits(threads, user_api="blas"), serve("127.0.0.1:0") as server, \
                gg.connect(server.address) as client:
            sessions = [client.session(g, gg.init_params(g, seed=i)) for i in range(4)]
            latencies: list[float] = []

            def worker(sess: gg.Session) -> None:
                for _ in range(calls // 4):
                    start = time.perf_counter()
                    sess.forward_backward(batch)
                    latencies.append(time.perf_counter() - start)

            workers = [threading.Thread(target=worker, args=(s,)) for s in sessions]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            p90[threads] = float(np.percentile(latencies, 90))
    return [Row("BLAS threads", f"p90, 1 thread per call {ms(p90[1])}", f"2 threads per call {ms(p90[2])}",
                p90[1] / p90[2], "(rule: cores // max-workers)", None)]


def other_rows(quick: bool) -> list[Row]:
    """Benchmarks of other modules, when they exist: convnet_step.py, replicas.py, pinning.py, scrape.py."""
    rows = []
    for module, make in (
            ("convnet_step", lambda m: [Row("convnet step", f"engine {m['engine_ms']:.3f} ms",
                                            f"PyTorch eager {m['torch_ms']:.3f} ms", m["ratio"], "", None)]),
            ("replicas", lambda m: [Row("2 replicas", f"{m['two_replicas_steps_per_s']:.0f} steps/s",
                                        f"1 replica {m['one_replica_steps_per_s']:.0f} steps/s", m["ratio"],
                                        ">= 1.8", m["ratio"] >= 1.8)]),
            ("pinning", lambda m: [Row(f"server on one core, {what}", f"--cpus {m[f'{kind}_pinned_ms']:.3f} ms",
                                       f"any core {m[f'{kind}_free_ms']:.3f} ms", m[f"{kind}_ratio"], "", None)
                                   for kind, what in (("small", "T3's call"), ("step", "T2's batch-1 step"))]),
            ("scrape", lambda m: [Row("/metrics scrape, server computing", f"--cpus {m['pinned_busy_ms']:.1f} ms "
                                      f"(slowest {m['pinned_busy_max_ms']:.0f})",
                                      f"any core {m['free_busy_ms']:.1f} ms (slowest {m['free_busy_max_ms']:.0f})",
                                      m["busy_ratio"], "", None)])):
        try:
            measure = importlib.import_module(module).measure
        except (ImportError, AttributeError):
            continue
        rows += make(measure(quick))
    return rows


def machine() -> str:
    import google.protobuf
    versions = [f"Python {platform.python_version()}", f"numpy {np.__version__}", f"grpcio {grpc.__version__}",
                f"protobuf {google.protobuf.__version__}", f"gradgate {gg.__version__}"]
    try:
        import torch
        versions.append(f"torch {torch.__version__}")
    except ImportError:
        pass
    blas = threadpoolctl.threadpool_info()
    blas_text = ", ".join(f"{b.get('internal_api')} {b.get('version')}" for b in blas if b.get("user_api") == "blas")
    return (f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
            f"{', '.join(versions)}; BLAS {blas_text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds, not minutes: every row, few repeats")
    parser.add_argument("--out", default=str(HERE / "results.md"), help="markdown file to write")
    args = parser.parse_args(argv)
    tune_malloc()
    batches = [1, 256] if args.quick else [1, 32, 256, 1024]
    rows: list[Row] = []
    with threadpoolctl.threadpool_limits(1, user_api="blas"), serve("127.0.0.1:0", Config()) as server, \
            gg.connect(server.address, timeout=120) as client, \
            gg.connect(server.address, timeout=120, call_streams=False) as unary_client, \
            gg.connect(server.address, timeout=120, shared_memory=False) as socket_client:
        echo = Echo()
        try:
            rows += training_rows(client, socket_client, echo, batches, args.quick)
            rows += tiny_rows(client, socket_client, unary_client, echo, args.quick)
            rows += big_tensor_rows(client, socket_client, echo, args.quick)
        finally:
            echo.close()
        rows += reference_rows(batches, args.quick)
    rows += blas_rows(args.quick)
    rows += other_rows(args.quick)
    header = ["target", "measured", "baseline", "ratio (lowest-highest round)", "goal", "verdict"]
    table = [header, ["---"] * len(header), *[r.cells() for r in rows]]
    text = "\n".join("| " + " | ".join(cells) + " |" for cells in table)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = (f"# Benchmark results\n\n`python benchmarks/run.py{' --quick' if args.quick else ''}`, {stamp}, "
              f"one BLAS thread. Times are medians of alternating rounds; a ratio is the median of the "
              f"rounds' ratios, with the lowest and highest of them in parentheses.\n\nMachine: {machine()}\n\n{text}\n")
    print(text)
    Path(args.out).write_text(report)
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
