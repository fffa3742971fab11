"""``gradgate-replicas`` as a real process: N servers on consecutive ports, the address
list on stdout for gg.connect, a replica that dies restarted on its port, all drained
and stopped on SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import gradgate as gg
from gradgate.cli import two_layer_net
from gradgate_server import cpus
from gradgate_server.replicas import cores, main, start

from obs import Scrape, free_port, wait_for


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def pinned_to(pid: int) -> set[int]:
    """The CPUs every thread of ``pid`` may run on (all threads alike, or the assert says so)."""
    masks = {frozenset(os.sched_getaffinity(int(t.name))) for t in Path(f"/proc/{pid}/task").iterdir()}
    assert len(masks) == 1, masks
    return set(masks.pop())


def test_replicas_command_serves_restarts_and_stops() -> None:
    port = free_port()  # consecutive ports from here; 2 replicas
    command = [sys.executable, "-m", "gradgate_server.replicas", "-n", "2", "--port", str(port),
               "--metrics-port", "0", "--grace-seconds", "2", "--restart-delay", "0.2"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    try:
        addresses = proc.stdout.readline().strip()
        assert addresses == f"127.0.0.1:{port},127.0.0.1:{port + 1}", "".join(err)
        pids = children(proc.pid)
        assert len(pids) == 2
        available = cpus.available()  # each replica on a core of its own, round robin over these
        cores_of = [pinned_to(p) for p in pids]
        assert sorted(map(sorted, cores_of)) == sorted([[available[0]], [available[1 % len(available)]]])
        metrics = [json.loads(line)["metrics_address"] for line in err if '"listening"' in line]
        assert len(set(metrics)) == 2  # each replica its own /metrics
        X, y = gg.spiral(n_per_class=10)
        g = two_layer_net(hidden=4)
        with gg.connect(addresses, timeout=20, retry_seconds=5) as client:
            sessions = [client.session(g, gg.init_params(g, seed=i)) for i in range(8)]
            for sess in sessions:
                sess.forward({"x": X, "y": y})
            assert sum(Scrape.of(m).value("gradgate_sessions_active") for m in metrics) == len(sessions)
            os.kill(pids[0], signal.SIGKILL)  # the command notices and starts it again, same port
            wait_for(lambda: any("restarting" in line for line in err), timeout=20, what="the restart note")
            listening = wait_for(lambda: [json.loads(line)["address"] for line in err if '"listening"' in line][2:],
                                 timeout=30, what="the replacement replica to listen")
            assert listening in ([f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"])  # where the killed one was
            assert len(children(proc.pid)) == 2 and children(proc.pid) != pids
            replacement = (set(children(proc.pid)) - set(pids)).pop()
            assert pinned_to(replacement) == cores_of[0]  # on the core of the one it replaces
            for sess in sessions:  # every session answers again; the lost ones were re-created
                assert sess.forward({"x": X, "y": y}).loss > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0, "".join(err[-20:])
    assert sum('"stopped after draining' in line for line in err) == 2
    assert all(not Path(f"/proc/{p}").exists() for p in children(proc.pid))


def test_replicas_run_anywhere_with_no_pin() -> None:
    servers = start(1, port=0, metrics_port=-1, pin=False)
    try:
        assert "--cpus" not in servers[0].args
        assert pinned_to(servers[0].pid) == set(cpus.available())
    finally:
        servers[0].terminate()


def test_replicas_command_rejects_bad_flags_before_starting_anything(capsys) -> None:
    for argv in (["-n", "0"], ["--no-such-server-flag"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert cores() >= 1
