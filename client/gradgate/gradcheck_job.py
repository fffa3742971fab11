"""``gradgate gradcheck``: run many gradient-check cases over one or more servers.

Cases are spread dynamically: each server runs ``jobs`` workers that take the next
case from one queue, so a faster server takes more cases. A server that stops
answering (UNAVAILABLE once the client's retries are over) leaves the job, and its
cases, the one in flight included, go back to the queue for the others. Exit codes:
0 every case passed, 1 some case failed its check, 2 the job could not run properly
(usage, unreadable case file, no server left, a case the server rejected).
"""
from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from tqdm.auto import tqdm

from gradgate.client import DEFAULT_RETRY_SECONDS, Client, connect
from gradgate.errors import GradgateError
from gradgate.gradcheck import (CASE_SUFFIXES, CaseFileError, GradCheckCase, GradCheckReport, load_case, run_case,
                                table, verdict)

PASSED, FAILED, USAGE_OR_CONNECTION = 0, 1, 2


@dataclass(frozen=True)
class CaseOutcome:
    """One case of a job: its report, or the error that kept it from being checked."""

    file: str
    name: str
    server: str
    seconds: float
    report: GradCheckReport | None
    error: str = ""
    moved_from: tuple[str, ...] = ()  # servers that stopped answering while they had this case

    @property
    def status(self) -> str:
        return "error" if self.report is None else "pass" if self.report.passed else "fail"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"case": self.name, "file": self.file, "server": self.server,
                               "seconds": round(self.seconds, 6), "status": self.status}
        if self.moved_from:
            out["moved_from"] = list(self.moved_from)
        if self.report is None:
            out["error"] = self.error
        else:  # non-finite numbers become "NaN"/"Infinity" strings, as in protobuf JSON
            out["result"] = json_format.MessageToDict(self.report.proto, preserving_proto_field_name=True,
                                                      always_print_fields_with_no_presence=True)
        return out


def find_cases(paths: Sequence[str]) -> list[Path]:
    """The given files; a directory stands for its *.pb and *.json files."""
    found: list[Path] = []
    for p in map(Path, paths):
        found += sorted(f for f in p.iterdir() if f.suffix in CASE_SUFFIXES) if p.is_dir() else [p]
    return found


def run_job(cases: Sequence[tuple[str, GradCheckCase]], clients: Sequence[Client], jobs: int = 2,
            progress: bool = True) -> list[CaseOutcome]:
    """Check every (file, case) on the clients' servers in parallel; outcomes in input order.

    A case whose server stopped answering runs again on another; a case left when no
    server is, is an error outcome with server "".
    """
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(cases)):
        todo.put(i)
    outcomes: list[CaseOutcome | None] = [None] * len(cases)
    moved: dict[int, tuple[str, ...]] = {}
    lost: set[int] = set()  # ids of the clients whose server is gone
    lock = threading.Lock()

    def work(client: Client, bar: tqdm) -> None:
        while id(client) not in lost:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            file, case = cases[i]
            start = time.perf_counter()
            try:
                report = run_case(client, case)
                outcome = CaseOutcome(file, case.name, client.address, time.perf_counter() - start, report,
                                      moved_from=moved.get(i, ()))
            except GradgateError as e:
                if e.code == grpc.StatusCode.UNAVAILABLE:  # retried for retry_seconds: the server is gone
                    with lock:
                        if id(client) not in lost:
                            lost.add(id(client))
                            print(f"gradgate gradcheck: server {client.address} stopped answering ({e.message}); "
                                  "its cases go to the other servers", file=sys.stderr)
                        moved[i] = (*moved.get(i, ()), client.address)
                    todo.put(i)
                    return
                outcome = CaseOutcome(file, case.name, client.address, time.perf_counter() - start, None, str(e),
                                      moved.get(i, ()))
            outcomes[i] = outcome
            bar.set_postfix_str(f"{outcome.name}: {outcome.status}", refresh=False)
            bar.update()

    with tqdm(total=len(cases), unit="case", disable=not progress, file=sys.stderr) as bar:
        # A round ends when the queue is empty, or with cases put back by a server that left.
        while not todo.empty() and (live := [c for c in clients if id(c) not in lost]):
            with ThreadPoolExecutor(jobs * len(live), thread_name_prefix="gradcheck") as pool:
                workers = [pool.submit(work, c, bar) for _ in range(jobs) for c in live]  # interleaved
            for w in workers:
                w.result()  # a bug in a worker surfaces here
    while not todo.empty():
        i = todo.get()
        file, case = cases[i]
        outcomes[i] = CaseOutcome(file, case.name, "", 0.0, None, "no server left to check it", moved.get(i, ()))
    return [o for o in outcomes if o is not None]


def _probe(client: Client) -> str:
    """"" when ``client``'s server answers, else why not."""
    try:
        client.list_ops()
        return ""
    except GradgateError as e:
        return str(e)


def exit_code(outcomes: Sequence[CaseOutcome]) -> int:
    statuses = {o.status for o in outcomes}
    return USAGE_OR_CONNECTION if "error" in statuses else FAILED if "fail" in statuses else PASSED


def summary(outcomes: Sequence[CaseOutcome]) -> str:
    """The table (case, tensor, max rel error, verdict), then why each failure failed."""
    rows, notes = [], []
    for o in outcomes:
        if o.report is None:
            rows.append((o.name, "-", "-", "ERROR"))
            notes.append(f"{o.name}: {o.error}")
            continue
        for t in o.report.tensors:
            tensor = t.name + (" (input)" if t.is_input else "")
            rows.append((o.name, tensor, f"{t.max_rel_error:.2e}", verdict(t)))
            if not t.passed:
                notes.append(f"{o.name}: {t.message}")
    counts = {s: sum(o.status == s for o in outcomes) for s in ("pass", "fail", "error")}
    lines = table(("case", "tensor", "max rel error", "verdict"), rows)
    lines.append(f"{len(outcomes)} case(s): {counts['pass']} passed, {counts['fail']} failed, "
                 f"{counts['error']} error(s)")
    return "\n".join([*lines, *notes])


def command(args: argparse.Namespace) -> int:
    """The ``gradgate gradcheck`` subcommand."""
    def fail(message: str) -> int:
        print(f"gradgate gradcheck: {message}", file=sys.stderr)
        return USAGE_OR_CONNECTION

    if args.jobs < 1:
        return fail("--jobs must be >= 1")
    try:
        files = find_cases(args.cases)
        cases = [(str(f), load_case(f)) for f in files]
    except CaseFileError as e:
        return fail(str(e))
    except OSError as e:
        return fail(f"{e.filename}: cannot read: {e.strerror}")
    if not cases:
        return fail(f"no case files (*.pb, *.json) in {' '.join(args.cases)}")

    clients: list[Client] = []
    start = time.perf_counter()
    try:
        for address in args.server or [None]:  # None: an embedded server
            clients.append(connect(address, timeout=args.timeout, retry_seconds=args.retry_seconds))
        with ThreadPoolExecutor(len(clients)) as pool:  # probe them all at once, before any case runs
            probes = list(pool.map(_probe, clients))
        unreachable = [f"{c.address} ({error})" for c, error in zip(clients, probes) if error]
        reachable = [c for c, error in zip(clients, probes) if not error]
        if not reachable:
            return fail(f"cannot reach server {'; '.join(unreachable)}")
        for server in unreachable:
            print(f"gradgate gradcheck: cannot reach server {server}; going on without it", file=sys.stderr)
        outcomes = run_job(cases, reachable, args.jobs, progress=not args.no_progress)
    finally:
        for client in clients:
            client.close()
    seconds = time.perf_counter() - start

    code = exit_code(outcomes)
    lost = sorted({s for o in outcomes for s in o.moved_from} | {c.address for c in clients if c not in reachable})
    print(summary(outcomes))
    print(f"{seconds:.2f} s on {len(reachable)} server(s): {', '.join(c.address for c in reachable)}"
          + (f"; lost: {', '.join(lost)}" if lost else ""))
    if args.report:
        report = {"passed": code == PASSED, "exit_code": code, "seconds": round(seconds, 6),
                  "servers": [c.address for c in clients], "lost_servers": lost,
                  "counts": {s: sum(o.status == s for o in outcomes) for s in ("pass", "fail", "error")},
                  "cases": [o.to_json() for o in outcomes]}
        try:
            Path(args.report).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        except OSError as e:
            return fail(f"cannot write report {args.report}: {e.strerror}")
    return code


def add_command(commands: Any) -> None:
    """Register ``gradcheck`` on the ``gradgate`` command's subparsers."""
    p = commands.add_parser("gradcheck", help="check analytic gradients of saved cases (*.pb, *.json)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cases", nargs="+", metavar="CASE", help="case files (.pb or .json) or directories of them")
    p.add_argument("--server", metavar="ADDR", action="append",
                   help="server host:port; repeat to spread the cases over several (default: an embedded server)")
    p.add_argument("--report", metavar="FILE", help="write a JSON report of every case and tensor")
    p.add_argument("--jobs", type=int, default=2, help="cases in flight per server (default 2)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per case (default 120)")
    p.add_argument("--retry-seconds", type=float, default=DEFAULT_RETRY_SECONDS,
                   help="how long a server that does not answer is retried before its cases go to the others "
                        f"(default {DEFAULT_RETRY_SECONDS:g})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=command)
