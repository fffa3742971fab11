"""Replicas: aggregate training steps/s of two server processes against one.

    python benchmarks/replicas.py [--quick]

One server process computes on one core (Python's GIL), so a second replica on a
second core should nearly double what the machine serves. Each setup runs client
processes stepping as fast as they can, each on its own session:
  one_replica                  one replica, one client
  two_replicas                 two replicas (gradgate-replicas' own code starts them,
                               one BLAS thread each), one client on each
  one_replica_two_clients      both clients on one replica
ratio = two_replicas / one_replica (each replica driven by one training client; the
target is >= 1.8 on 2 cores), and ratio_same_load = two_replicas /
one_replica_two_clients (the same two clients; on this machine the clients take
their CPU from the same 2 cores, which caps it below 2). A step is what gg.train
sends: one ForwardBackward with the parameters pushed along, on the README's spiral
network (2-100-3, batch 300, float32), a step dominated by Python per-call work, the
case replicas are for. The clients send a request built once so that they take little
CPU. Measure on a quiet machine: other_load_cores says how many cores other processes
kept busy on average during the measurement.
"""
from __future__ import annotations

import argparse
import functools
import os
import resource
import subprocess
import sys
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


def client(address: str) -> None:
    """One client (``replicas.py --client ADDRESS``): a session of its own, warmed up; says
    "ready", then for every line "SECONDS" on stdin steps that long and prints steps/s.

    It sends one request built once (the batch and the parameters, as gg.train sends
    them) and drops the gradients, so that nearly all the CPU goes to the server."""
    X, y = gg.spiral(seed=0)
    g = two_layer_net()
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        create = pb.CreateSessionRequest(graph=g.to_proto())
        params = {k: v.astype(np.float32) for k, v in gg.init_params(g, seed=0).items()}
        codec.to_tensor_map(params, create.params)
        request = pb.ForwardBackwardRequest(session_id=stub.CreateSession(create, timeout=30).session_id)
        codec.to_tensor_map({"x": X.astype(np.float32), "y": y}, request.inputs)
        codec.to_tensor_map(params, request.params)
        step = functools.partial(stub.ForwardBackward, request, timeout=30)
        for _ in range(50):
            step()
        print("ready", flush=True)
        for line in sys.stdin:
            seconds, count, began = float(line), 0, time.perf_counter()
            while (elapsed := time.perf_counter() - began) < seconds:
                step()
                count += 1
            print(count / elapsed, flush=True)


class Clients:
    """Client processes (no GIL shared between them), started once and warmed up."""

    def __init__(self, addresses: Sequence[str]):
        self.procs = [subprocess.Popen([sys.executable, __file__, "--client", a], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True) for a in addresses]
        for p in self.procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a benchmark client did not start")

    def steps_per_s(self, which: Sequence[int], seconds: float) -> float:
        """Aggregate steps/s of the clients ``which``, stepping at the same time."""
        for i in which:
            self.procs[i].stdin.write(f"{seconds}\n")
            self.procs[i].stdin.flush()
        return sum(float(self.procs[i].stdout.readline()) for i in which)

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def measure(quick: bool = False) -> dict[str, float]:
    """Steps/s of one replica and of two, each with one client; of one with both clients; the ratios.
    The setups take turns in short windows, and each gets the median of its windows, so that
    load that comes and goes on the machine spreads over all of them."""
    rounds, seconds = (3, 0.5) if quick else (9, 1.0)
    busy, ours, began = _machine_busy(), _our_cpu(), time.monotonic()
    servers = replicas.start(2, port=0, metrics_port=-1)
    clients = None
    try:
        a, b = (r.address for r in servers)
        clients = Clients([a, b, a])  # 0 and 1 on their own replicas; 2 shares replica a with 0
        setups = {"one_replica_steps_per_s": [0], "two_replicas_steps_per_s": [0, 1],
                  "one_replica_two_clients_steps_per_s": [0, 2]}
        samples: dict[str, list[float]] = {name: [] for name in setups}
        for r in range(rounds):
            for name in list(setups)[r % 3:] + list(setups)[:r % 3]:  # rotate the order
                samples[name].append(clients.steps_per_s(setups[name], seconds))
    finally:
        if clients is not None:
            clients.close()
        for server in servers:
            server.terminate()
    out = {name: float(np.median(values)) for name, values in samples.items()}
    out["ratio"] = out["two_replicas_steps_per_s"] / out["one_replica_steps_per_s"]
    out["ratio_same_load"] = out["two_replicas_steps_per_s"] / out["one_replica_two_clients_steps_per_s"]
    out["cores"] = float(replicas.cores())
    # what else ran meanwhile, in cores: all busy CPU time but ours (this process and its children)
    out["other_load_cores"] = ((_machine_busy() - busy) - (_our_cpu() - ours)) / (time.monotonic() - began)
    return out


def _machine_busy() -> float:
    """CPU seconds spent not idle by the whole machine (/proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def _our_cpu() -> float:
    """CPU seconds of this process and of its children that have ended."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 rounds of 0.5 s instead of 9 of 1 s")
    p.add_argument("--client", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        return client(args.client)
    r = measure(args.quick)
    print(f"{r['cores']:.0f} cores; other processes used {r['other_load_cores']:.2f} cores on average meanwhile")
    print(f"one replica, one client:     {r['one_replica_steps_per_s']:8.1f} steps/s")
    print(f"two replicas, one client on each: {r['two_replicas_steps_per_s']:8.1f} steps/s   "
          f"ratio {r['ratio']:.2f}x  (target >= 1.8 on 2 cores)")
    print(f"one replica, two clients:    {r['one_replica_two_clients_steps_per_s']:8.1f} steps/s   "
          f"two replicas / this: {r['ratio_same_load']:.2f}x")


if __name__ == "__main__":
    main()
