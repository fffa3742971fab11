"""``--cpus``: run the whole server process on a chosen set of CPUs (Linux).

A call passes between several threads of the process: gRPC's poller, the RPC thread
that runs it, the threads that send the answer. Each hand-off to a thread on another
core costs that core's wake-up and cold caches. On the 2-vCPU VM of benchmarks/, one
core for all of them cut a small ForwardBackward from 0.84-0.88 ms to 0.62-0.72 ms and a
batch-1 MLP step from 3.0 ms to 2.1 ms (a server process; the client in another one).
A process computes on about one core anyway (the GIL; one BLAS thread per call), so
gradgate-replicas gives each replica a core of its own.
"""
from __future__ import annotations

import os


def available() -> list[int]:
    """The CPUs this process may run on, in order."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def parse(spec: str) -> set[int]:
    """A CPU list as taskset and cpusets write it: "0", "0,2", "0-3,6"."""
    cpus: set[int] = set()
    for part in spec.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            lo, hi = int(first), int(last) if dash else int(first)
        except ValueError:
            raise ValueError(f"--cpus {spec!r} is not a CPU list such as 0 or 0,2 or 0-3") from None
        if lo < 0 or hi < lo:
            raise ValueError(f"--cpus {spec!r}: {part.strip()!r} is not a CPU number or range")
        cpus.update(range(lo, hi + 1))
    return cpus


def pin(spec: str) -> set[int]:
    """Run every thread of this process, and every thread it starts later, on the CPUs of
    ``spec``; returns them. ValueError if they are not all available to this process."""
    cpus = parse(spec)
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("--cpus needs Linux (sched_setaffinity)")
    allowed = available()
    unavailable = cpus - set(allowed)
    if unavailable:
        raise ValueError(f"--cpus {spec!r}: CPU(s) {sorted(unavailable)} are not available to this process "
                         f"(available: {allowed})")
    for tid in os.listdir("/proc/self/task"):  # threads started already (BLAS's, say) too
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # it ended meanwhile
            pass
    return cpus
