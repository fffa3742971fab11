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


def convnet(classes: int = 10) -> gg.Graph:
    """conv-relu-pool x2 and an affine layer, for 8x8 grey images (N, 1, 8, 8)."""
    g = gg.Graph()
    x = g.input("x", (None, 1, 8, 8))
    y = g.input("y", (None,), dtype="int64")
    w1, b1 = g.param("conv1.w", (8, 1, 3, 3)), g.param("conv1.b", (8,))
    w2, b2 = g.param("conv2.w", (16, 8, 3, 3)), g.param("conv2.b", (16,))
    fc_w, fc_b = g.param("fc.w", (16 * 2 * 2, classes)), g.param("fc.b", (classes,))
    h = gg.max_pool2d(gg.relu(gg.conv2d(x, w1, b1, padding=1)), kernel=2)  # (N, 8, 4, 4)
    h = gg.max_pool2d(gg.relu(gg.conv2d(h, w2, b2, padding=1)), kernel=2)  # (N, 16, 2, 2)
    scores = g.output(gg.affine(gg.flatten(h), fc_w, fc_b), name="scores")
    g.set_loss(gg.softmax_cross_entropy(scores, y))
    return g


def digits(seed: int = 0, test_size: int = 360) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """scikit-learn's bundled 8x8 digit images (nothing is downloaded), scaled to [0, 1] and split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("gradgate demo --convnet needs scikit-learn: pip install 'gradgate[examples]'") from None
    data = load_digits()
    X, y = (data.images / 16.0).astype(np.float32)[:, None], data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    test, train = order[:test_size], order[test_size:]
    return {"x": X[train], "y": y[train]}, {"x": X[test], "y": y[test]}


def demo_convnet(args: argparse.Namespace) -> int:
    train_set, test_set = digits(args.seed)
    g = convnet()
    start = time.perf_counter()
    with gg.connect(args.server) as client, client.session(g, gg.init_params(g, args.seed)) as sess:
        print(f"training a convnet ({sess.parameter_count} parameters) on {len(train_set['y'])} 8x8 digit images "
              f"via {client.address}")
        losses = gg.train(sess, train_set, gg.optim.Adam(lr=args.lr or 0.01), epochs=args.epochs,
                          batch_size=args.batch_size, seed=args.seed, on_server=args.on_server)
        scores = sess.forward(test_set, train=False).outputs["scores"]
    accuracy = float(np.mean(scores.argmax(axis=1) == test_set["y"]))
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps, {time.perf_counter() - start:.1f} s")
    print(f"test accuracy: {accuracy:.3f} on {len(test_set['y'])} held-out images")
    return 0


def demo(args: argparse.Namespace) -> int:
    if args.convnet:
        return demo_convnet(args)
    X, y = gg.spiral(seed=args.seed)
    g = two_layer_net()
    start = time.perf_counter()
    with gg.connect(args.server) as client, client.session(g, gg.init_params(g, args.seed)) as sess:
        print(f"training {sess.parameter_count} parameters on {len(y)} spiral points via {client.address}")
        losses = gg.train(sess, {"x": X, "y": y}, gg.optim.Adam(lr=args.lr or 0.03), epochs=args.steps,
                          seed=args.seed, on_server=args.on_server)
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

    p = commands.add_parser("demo", help="train a two-layer net on the spiral data (or, with --convnet, a convnet "
                                          "on scikit-learn's digits) through a server")
    p.add_argument("--server", metavar="ADDR", help=server_help)
    p.add_argument("--convnet", action="store_true",
                   help="conv-relu-pool x2 + affine on the 8x8 digits (needs pip install 'gradgate[examples]')")
    p.add_argument("--steps", type=int, default=500, help="full-batch training steps on the spiral (default 500)")
    p.add_argument("--epochs", type=int, default=8, help="--convnet: epochs (default 8)")
    p.add_argument("--batch-size", type=int, default=32, help="--convnet: minibatch size (default 32)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 0.03; --convnet 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the initial weights and the shuffling")
    p.add_argument("--on-server", action=argparse.BooleanOptionalAction, default=True,
                   help="run the training steps on the server (the default), or drive each step from here "
                        "(--no-on-server): the same result either way")
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
