"""``gradgate gradcheck``: run many gradient-check cases over one or more servers.

Cases are spread dynamically: each server lends ``jobs`` client slots to a thread
pool, and every case borrows whichever slot is free, so a faster server takes more
cases. Exit codes: 0 every case passed, 1 some case failed its check, 2 the job
could not run properly (usage, unreadable case file, unreachable server, a case
the server rejected).
"""
from __future__ import annotations

import argparse
import json
import queue
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from tqdm.auto import tqdm

from gradgate.client import Client, connect
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

    @property
    def status(self) -> str:
        return "error" if self.report is None else "pass" if self.report.passed else "fail"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"case": self.name, "file": self.file, "server": self.server,
                               "seconds": round(self.seconds, 6), "status": self.status}
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
    """Check every (file, case) on the clients' servers in parallel; outcomes in input order."""
    slots: queue.Queue[Client] = queue.Queue()
    for _ in range(jobs):
        for client in clients:  # interleaved, so concurrent cases start on different servers
            slots.put(client)

    def check(file: str, case: GradCheckCase) -> CaseOutcome:
        client = slots.get()
        start = time.perf_counter()
        try:
            report = run_case(client, case)
            return CaseOutcome(file, case.name, client.address, time.perf_counter() - start, report)
        except GradgateError as e:
            return CaseOutcome(file, case.name, client.address, time.perf_counter() - start, None, str(e))
        finally:
            slots.put(client)

    with ThreadPoolExecutor(jobs * len(clients), thread_name_prefix="gradcheck") as pool, \
            tqdm(total=len(cases), unit="case", disable=not progress, file=sys.stderr) as bar:
        futures = [pool.submit(check, file, case) for file, case in cases]
        for future in as_completed(futures):
            outcome = future.result()
            bar.set_postfix_str(f"{outcome.name}: {outcome.status}", refresh=False)
            bar.update()
    return [f.result() for f in futures]


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
            clients.append(connect(address, timeout=args.timeout))
            try:
                clients[-1].list_ops()  # fail fast, before any case runs
            except GradgateError as e:
                return fail(f"cannot reach server {address}: {e}")
        outcomes = run_job(cases, clients, args.jobs, progress=not args.no_progress)
    finally:
        for client in clients:
            client.close()
    seconds = time.perf_counter() - start

    code = exit_code(outcomes)
    print(summary(outcomes))
    print(f"{seconds:.2f} s on {len(clients)} server(s): {', '.join(c.address for c in clients)}")
    if args.report:
        report = {"passed": code == PASSED, "exit_code": code, "seconds": round(seconds, 6),
                  "servers": [c.address for c in clients],
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=command)
