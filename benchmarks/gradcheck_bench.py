"""Gradient-check cost per checked coordinate, as a ratio to one full forward pass.

    PYTHONPATH=client:server python benchmarks/gradcheck_bench.py [--batch 64] [--checks 200]

A coordinate costs two perturbed evaluations (centered differences), each recomputing
only the steps downstream of the perturbed tensor. So perturbing the first layer's
weights should cost about 2 forwards per coordinate, and the last layer's far less:
the ratio measures that the upstream nodes are really reused. Printed, never asserted.

Engine: the check called in-process (no network). gRPC: one GradientCheck RPC
checking many coordinates, against one Forward RPC of the same graph and batch.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

import gradgate as gg
from gradgate_server.engine import compile_graph, forward
from gradgate_server.engine.gradcheck import CheckSettings, downstream, gradient_check


def mlp(sizes: tuple[int, ...]) -> gg.Graph:
    """ReLU MLP, softmax loss, float64."""
    g = gg.Graph(dtype="float64")
    h = g.input("x", (None, sizes[0]))
    y = g.input("y", (None,), dtype="int64")
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:]), start=1):
        h = h @ g.param(f"W{i}", (fan_in, fan_out)) + g.param(f"b{i}", (fan_out,))
        if i < len(sizes) - 1:
            h = gg.relu(h)
    g.set_loss(gg.softmax_cross_entropy(h, y))
    return g


def best(fn: Callable[[], object], repeat: int) -> float:
    """Minimum wall time of ``repeat`` calls: the least disturbed run."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="784,256,256,256,10", help="layer widths (default 784,256,256,256,10)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--checks", type=int, default=200, help="coordinates checked per run (sparse mode)")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()

    sizes = tuple(int(s) for s in args.sizes.split(","))
    g = mlp(sizes)
    params = gg.init_params(g, seed=0)
    rng = np.random.default_rng(0)
    batch = {"x": rng.standard_normal((args.batch, sizes[0])), "y": rng.integers(0, sizes[-1], args.batch)}
    plan = compile_graph(g.to_proto())
    first, last = "W1", f"W{len(sizes) - 1}"

    t_forward = best(lambda: forward(plan, batch, params), args.repeat * 4)
    print(f"MLP {'-'.join(map(str, sizes))}, ReLU, softmax loss, float64, batch {args.batch}; "
          f"one full forward: {t_forward * 1e3:.3f} ms ({len(plan.steps)} steps)")
    print(f"{'engine (in-process)':<22}{'steps/eval':>11}{'per coordinate':>16}{'/ forward':>11}"
          f"{'marginal / forward':>20}")
    for name in (first, last):
        def check(k: int, name: str = name) -> None:
            gradient_check(plan, batch, params, CheckSettings(num_checks=k, params=(name,)))
        t_many = best(lambda: check(args.checks), args.repeat)
        t_one = best(lambda: check(1), args.repeat)
        per = t_many / args.checks  # includes the base forward and backward, amortized
        marginal = (t_many - t_one) / (args.checks - 1)  # one more coordinate, fixed costs excluded
        layer = "first" if name == first else "last"
        print(f"  perturb {name} ({layer})".ljust(22) + f"{len(downstream(plan, plan.slot[name])):>11}"
              f"{per * 1e3:>13.3f} ms{per / t_forward:>11.3f}{marginal / t_forward:>20.3f}")

    with gg.connect() as client, client.session(g, params) as sess:
        t_rpc_forward = best(lambda: sess.forward(batch), args.repeat * 4)
        print(f"gRPC (embedded server): one Forward RPC {t_rpc_forward * 1e3:.3f} ms; one GradientCheck RPC "
              f"checking {args.checks} coordinates:")
        for name in (first, last):
            t = best(lambda: sess.gradient_check(batch, num_checks=args.checks, wrt=[name]), args.repeat)
            print(f"  perturb {name}: {t * 1e3:.1f} ms, {t / args.checks * 1e3:.3f} ms per coordinate = "
                  f"{t / args.checks / t_rpc_forward:.3f} Forward RPCs (one RPC per perturbation would be 2)")


if __name__ == "__main__":
    main()
