"""The ``gradgate`` command: ``gradgate demo`` trains a network through a server, ``gradgate ops`` lists the ops,
``gradgate gradcheck`` checks the gradients of saved cases."""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np

import gradgate as gg
from gradgate import gradcheck_job


def two_layer_net(hidden: int = 100, classes: int = 3, reg: float = 1e-3) -> gg.Graph:
    """The CS231n two-layer ReLU net on 2-D points, softmax loss plus L2 regularization."""
    g = gg.Graph()
    x = g.input("x", (None, 2))
    y = g.input("y", (None,), dtype="int64")
    W1, b1 = g.param("W1", (2, hidden)), g.param("b1", (hidden,))
    W2, b2 = g.param("W2", (hidden, classes)), g.param("b2", (classes,))
    scores = g.output(gg.relu(x @ W1 + b1) @ W2 + b2, name="scores")
    g.set_loss(gg.softmax_cross_entropy(scores, y) + reg * (gg.l2(W1) + gg.l2(W2)))
    return g


def demo(args: argparse.Namespace) -> int:
    X, y = gg.spiral(seed=args.seed)
    g = two_layer_net()
    start = time.perf_counter()
    with gg.connect(args.server) as client, client.session(g, gg.init_params(g, args.seed)) as sess:
        print(f"training {sess.parameter_count} parameters on {len(y)} spiral points via {client.address}")
        losses = gg.train(sess, {"x": X, "y": y}, gg.optim.Adam(lr=args.lr), epochs=args.steps, seed=args.seed)
        scores = sess.forward({"x": X, "y": y}).outputs["scores"]
    accuracy = float(np.mean(scores.argmax(axis=1) == y))
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps, {time.perf_counter() - start:.1f} s")
    print(f"training accuracy: {accuracy:.3f}")
    return 0


def ops(args: argparse.Namespace) -> int:
    with gg.connect(args.server) as client:
        rows = [(op.name, ", ".join(op.inputs),
                 ", ".join(f"{k}={v or '(required)'}" for k, v in sorted(op.attrs.items())), op.doc)
                for op in client.list_ops()]
    header = ("op", "inputs", "attrs", "doc")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(3)]
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)), row[3])
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradgate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    server_help = "server address host:port (default: start an embedded server)"

    p = commands.add_parser("demo", help="train a two-layer net on the spiral data through a server")
    p.add_argument("--server", metavar="ADDR", help=server_help)
    p.add_argument("--steps", type=int, default=500, help="full-batch training steps (default 500)")
    p.add_argument("--lr", type=float, default=0.03, help="Adam learning rate (default 0.03)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the initial weights and the shuffling")
    p.set_defaults(run=demo)

    p = commands.add_parser("ops", help="list the ops the server supports")
    p.add_argument("--server", metavar="ADDR", help=server_help)
    p.set_defaults(run=ops)

    gradcheck_job.add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except gg.GradgateError as e:
        print(f"gradgate: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
