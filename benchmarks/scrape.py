"""How long a Prometheus scrape of /metrics takes from a server on one core (``--cpus``, as
``gradgate-replicas`` runs each replica), idle and while it computes, against the same
server free to run anywhere.

    python benchmarks/scrape.py [--quick]

Two server processes, one pinned to the first core this process may use, one not. For
each in turn: scrapes while idle, then scrapes while two client processes run batch-256
ForwardBackward steps of the 784-256-10 MLP on it back to back. A pinned server answers
the scrape on the core it computes on. Scrapes are 50 ms apart; times are medians, with
the slowest scrape.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import gradgate as gg
from gradgate_server import cpus, replicas

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  # the models of run.py


def steps(address: str, seconds: float) -> None:
    """A client: batch-256 ForwardBackward steps for ``seconds``."""
    g = run.mlp()
    batch = {k: v[:256] for k, v in run.dataset(256).items()}
    with gg.connect(address, timeout=60) as client, client.session(g, gg.init_params(g, seed=0)) as sess:
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            sess.forward_backward(batch)


def scrapes(url: str, count: int) -> list[float]:
    took = []
    for _ in range(count):
        start = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as response:
            response.read()
        took.append(time.perf_counter() - start)
        time.sleep(0.05)
    return took


def measure(quick: bool = False) -> dict[str, float]:
    count, seconds = (5, 3.0) if quick else (60, 8.0)
    out: dict[str, float] = {}
    for name, cpu in (("pinned", cpus.available()[0]), ("free", None)):
        server = replicas.Replica("127.0.0.1", 0, 0, ["--blas-threads", "1"], cpu=cpu)
        try:
            server.wait_ready()
            url = f"http://{server.metrics_address}/metrics"
            idle = scrapes(url, count)
            clients = [multiprocessing.get_context("spawn").Process(target=steps, args=(server.address, seconds))
                       for _ in range(2)]
            for c in clients:
                c.start()
            time.sleep(2.0)  # the clients import, connect and warm up
            busy = scrapes(url, count)
            for c in clients:
                c.join()
        finally:
            server.terminate()
        out |= {f"{name}_idle_ms": statistics.median(idle) * 1e3, f"{name}_busy_ms": statistics.median(busy) * 1e3,
                f"{name}_busy_max_ms": max(busy) * 1e3}
    out["busy_ratio"] = out["pinned_busy_ms"] / out["free_busy_ms"]
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    print(json.dumps(measure(p.parse_args().quick), indent=1))
