"""``--cpus`` (gradgate_server.cpus): the CPU list syntax, every thread of the process
pinned, those started before and after, and a CPU the process may not use refused at start."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from gradgate_server import cpus

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sched_setaffinity is Linux's")


def test_cpu_lists_parse_as_taskset_writes_them() -> None:
    assert cpus.parse("0") == {0}
    assert cpus.parse("0,2") == {0, 2}
    assert cpus.parse("0-3, 6") == {0, 1, 2, 3, 6}
    for bad in ("", "a", "3-1", "-1", "0,,1", "1-"):
        with pytest.raises(ValueError, match="--cpus"):
            cpus.parse(bad)


def test_pin_moves_every_thread_and_the_ones_started_later() -> None:
    last = cpus.available()[-1]
    script = textwrap.dedent(f"""
        import os, threading
        from gradgate_server import cpus
        stop = threading.Event()
        before = threading.Thread(target=stop.wait); before.start()
        assert cpus.pin("{last}") == {{{last}}}
        after = threading.Thread(target=stop.wait); after.start()
        masks = {{tid: os.sched_getaffinity(int(tid)) for tid in os.listdir("/proc/self/task")}}
        stop.set()
        print(len(masks), sorted(set(map(frozenset, masks.values())), key=sorted))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    threads, masks = out.stdout.split(" ", 1)
    assert int(threads) >= 3 and masks.strip() == f"[frozenset({{{last}}})]"


def test_the_server_refuses_cpus_it_may_not_use() -> None:
    missing = max(cpus.available()) + 1
    out = subprocess.run([sys.executable, "-m", "gradgate_server", "--port", "0", "--metrics-port", "-1",
                          "--cpus", str(missing)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"CPU(s) [{missing}] are not available to this process" in out.stderr
    out = subprocess.run([sys.executable, "-m", "gradgate_server", "--port", "0", "--cpus", "x"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "is not a CPU list" in out.stderr
