"""Replicas: aggregate training steps/s of two server processes against one.

    python benchmarks/replicas.py [--quick]

One server process computes on one core (Python's GIL), so a second replica on a
second core should nearly double what the machine serves. Both setups get the same
load, two clients stepping as fast as they can, each on its own session:
  one_replica      both clients on one server process
  two_replicas     one client on each of two server processes (gradgate-replicas'
                   own code starts them, one BLAS thread each)
and, for reference, one_client: one client alone on one server. ratio =
two_replicas / one_replica; the target is >= 1.8 on 2 cores. A step is what
gg.train sends: one ForwardBackward with the parameters pushed along, here on the
README's spiral network (2-100-3, batch 300, float32), a step dominated by Python
per-call work, the case replicas are for. The clients run in this process, on the
same cores, sending a request built once so that they take little CPU: measure on a
quiet machine.
"""
from __future__ import annotations

import argparse
import functools
import os
import threading
import time
from collections.abc import Sequence

import grpc
import numpy as np

import gradgate as gg
from gradgate import codec
from gradgate.cli import two_layer_net
from gradgate.v1 import gradient_service_pb2 as pb
from gradgate.v1 import gradient_service_pb2_grpc as pb_grpc
from gradgate_server import replicas


def steps_per_s(addresses: Sequence[str], seconds: float) -> float:
    """One client thread per address, each stepping its own session; aggregate steps/s.

    The clients send a request built once (batch and parameters, as gg.train sends
    them) and drop the gradients, so that nearly all the CPU goes to the servers."""
    X, y = gg.spiral(seed=0)
    g = two_layer_net()
    channels = [grpc.insecure_channel(a) for a in addresses]
    stubs = [pb_grpc.GradientServiceStub(c) for c in channels]
    requests = []
    for i, stub in enumerate(stubs):
        create = pb.CreateSessionRequest(graph=g.to_proto())
        params = {k: v.astype(np.float32) for k, v in gg.init_params(g, seed=i).items()}
        codec.to_tensor_map(params, create.params)
        request = pb.ForwardBackwardRequest(session_id=stub.CreateSession(create, timeout=30).session_id)
        codec.to_tensor_map({"x": X.astype(np.float32), "y": y}, request.inputs)
        codec.to_tensor_map(params, request.params)
        requests.append(request)
    counts = [0] * len(stubs)
    start, stop = threading.Barrier(len(stubs) + 1), threading.Event()

    def client(i: int) -> None:
        step = functools.partial(stubs[i].ForwardBackward, requests[i], timeout=30)
        for _ in range(20):  # warm up
            step()
        start.wait()
        while not stop.is_set():
            step()
            counts[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(stubs))]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    for c in channels:
        c.close()
    return sum(counts) / elapsed


def measure(quick: bool = False) -> dict[str, float]:
    """Steps/s of one and two replicas under two clients, and their ratio."""
    seconds = 1.5 if quick else 5.0
    servers = replicas.start(2, port=0, metrics_port=-1)
    try:
        a, b = (r.address for r in servers)
        one_client = steps_per_s([a], seconds)
        one = steps_per_s([a, a], seconds)
        two = steps_per_s([a, b], seconds)
    finally:
        for r in servers:
            r.terminate()
    return {"one_client_steps_per_s": one_client, "one_replica_steps_per_s": one,
            "two_replicas_steps_per_s": two, "ratio": two / one, "cores": float(replicas.cores())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1.5 s per setup instead of 5 s")
    args = p.parse_args()
    load = os.getloadavg()[0]
    r = measure(args.quick)
    print(f"load average before: {load:.2f} on {r['cores']:.0f} cores")
    print(f"one client, one replica:   {r['one_client_steps_per_s']:8.1f} steps/s")
    print(f"two clients, one replica:  {r['one_replica_steps_per_s']:8.1f} steps/s")
    print(f"two clients, two replicas: {r['two_replicas_steps_per_s']:8.1f} steps/s")
    print(f"ratio two replicas / one:  {r['ratio']:8.2f}x  (target >= 1.8 on 2 cores)")


if __name__ == "__main__":
    main()
