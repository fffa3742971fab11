"""A server process on one core (``--cpus``) against the same server free to run anywhere.

    python benchmarks/pinning.py [--quick]

Two server processes, one started with ``--cpus`` (the first core this process may use)
and one without, answer this process's calls in turns: the lecture's 3-4-4-1 net's
forward_backward (T3's call) and a client-driven batch-1 step of the 784-256-10 MLP (T2's,
with Adam here), over the socket as from another host (shared_memory=False: calls through
shared memory and pipes skip gRPC's threads, and pinning changes nothing for them).
ratio = pinned / free. A call passes between several threads of the
server (gRPC's poller, the RPC thread, the sender); on one core those hand-offs find warm
caches and a core that is awake.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import gradgate as gg
from gradgate_server import cpus, replicas

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  # the models and the interleaved timing of run.py


def measure(quick: bool = False) -> dict[str, float]:
    servers = {"pinned": replicas.Replica("127.0.0.1", 0, -1, cpu=cpus.available()[0]),
               "free": replicas.Replica("127.0.0.1", 0, -1)}
    try:
        for s in servers.values():
            s.wait_ready()
        calls, closing = {}, []
        g, params, batch = run.lecture_net()
        mlp = run.mlp()
        data = {k: v[:1] for k, v in run.dataset(1).items()}
        for name, server in servers.items():
            client = gg.connect(server.address, timeout=60, shared_memory=False)  # as from another host
            small, step = client.session(g, params), client.session(mlp, gg.init_params(mlp, seed=0))
            closing += [small, step, client]
            calls[f"small_{name}"] = lambda s=small: s.forward_backward(batch)
            calls[f"step_{name}"] = run.client_driven_step(step, data)
        t = run.interleaved(calls, 200 if quick else 2000, 3 if quick else 9)
        for c in closing:
            c.close()
    finally:
        for s in servers.values():
            s.terminate()
    out: dict[str, float] = {}
    for kind in ("small", "step"):
        ratios = [p / f for p, f in zip(t.rounds[f"{kind}_pinned"], t.rounds[f"{kind}_free"])]
        out |= {f"{kind}_pinned_ms": t[f"{kind}_pinned"] * 1e3, f"{kind}_free_ms": t[f"{kind}_free"] * 1e3,
                f"{kind}_ratio": statistics.median(ratios)}
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    print(json.dumps(measure(p.parse_args().quick), indent=1))
