"""Benchmark our argus.py against the upstream argus-reporter client from PyPI.

    python benchmarks/bench.py [--upstream-python /work/upstream-venv/bin/python]
                               [--events 20000] [--slow-ms 50] [--quick] [--json OUT]

Every measurement runs in subprocesses: the client under test in its own
interpreter (bench_client.py), the stand-in Argus server in another
(bench_server.py), so neither shares a GIL with the other or with this harness.
"Ours" is the repository's argus.py, imported by the interpreter running this
script (or --ours-python) with the repository root on PYTHONPATH; "upstream" is
whatever `import argus` finds in --upstream-python with a clean PYTHONPATH.

This prints a report; it asserts nothing. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
CLIENT_SCRIPT = HERE / "bench_client.py"
SERVER_SCRIPT = HERE / "bench_server.py"
RESULT_MARKER = "BENCH_RESULT "

# Environment variables that would change which argus is imported or how it behaves.
_SCRUBBED_ENV_PREFIXES = ("ARGUS_", "PYTHON")
_STATS_TIMEOUT_S = 10.0
_EVENT_ID_RE = re.compile(r'"event_id"\s*:\s*"([^"]+)"')
# What one Reporter with one job sends around the epochs.
_LIFECYCLE_EVENTS = ("batch_start", "job_start", "job_done", "batch_done")


class Client:
    """One client under test: an interpreter plus what goes on its PYTHONPATH."""

    def __init__(self, name: str, python: Optional[str], pythonpath: Optional[Path],
                 extra_env: Optional[Dict[str, str]] = None) -> None:
        self.name = name
        self.python = python
        self.pythonpath = pythonpath
        self.extra_env = extra_env or {}
        self.problem = self._find_problem()

    def _find_problem(self) -> Optional[str]:
        if not self.python:
            return "no interpreter given"
        if not (os.path.isfile(self.python) and os.access(self.python, os.X_OK)):
            return "interpreter not found: %s" % self.python
        if self.pythonpath is not None and not (self.pythonpath / "argus.py").is_file():
            return "no argus.py in %s" % self.pythonpath
        return None


class Sandbox:
    """Fresh HOME, spill directory and working directory for one client run."""

    def __init__(self, root: Path, pycache: Path) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="run-", dir=str(root)))
        self.home = self.root / "home"
        self.spill = self.root / "spill"
        self.cwd = self.root / "cwd"
        self.pycache = pycache
        for path in (self.home, self.spill, self.cwd):
            path.mkdir()

    def env(self, client: Client) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_ENV_PREFIXES)}
        env.update({
            "HOME": str(self.home),
            "ARGUS_SPILL_DIR": str(self.spill),
            # Byte code goes here, not into the repository or site-packages.
            "PYTHONPYCACHEPREFIX": str(self.pycache),
            # requests honours *_proxy variables; the local server must be reached directly.
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        })
        if client.pythonpath is not None:
            env["PYTHONPATH"] = str(client.pythonpath)
        env.update(client.extra_env)
        return env

    def spilled(self, delivered_ids: Set[str]) -> Dict[str, int]:
        """Count lines left in spill files (*.jsonl*) under the spill dir and HOME.

        A spilled job_epoch whose event_id the server did receive (an ack lost on
        the way back, say) is counted apart, so it is not counted twice.
        """
        lines = epoch_lines = epoch_delivered = 0
        for base in (self.spill, self.home):
            for path in base.rglob("*.jsonl*"):
                if not path.is_file():
                    continue
                with path.open("r", encoding="utf-8", errors="replace") as fh:
                    for line in fh:
                        if not line.strip():
                            continue
                        lines += 1
                        if '"job_epoch"' in line:
                            epoch_lines += 1
                            match = _EVENT_ID_RE.search(line)
                            epoch_delivered += bool(match and match.group(1) in delivered_ids)
        return {"lines": lines, "job_epoch_lines": epoch_lines,
                "job_epoch_lines_delivered": epoch_delivered}


class Harness:
    def __init__(self, tmp_root: Path, timeout_s: float, token: Optional[str]) -> None:
        self.tmp_root = tmp_root
        self.timeout_s = timeout_s
        self.token = token
        self.pycache = tmp_root / "pycache"

    def sandbox(self) -> Sandbox:
        return Sandbox(self.tmp_root, self.pycache)

    def run_client(self, client: Client, sandbox: Sandbox, args: List[str],
                   extra_env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        """Run bench_client.py under the client's interpreter; its result, or an error.

        The result also carries ``process_cpu_s``: the CPU time of the whole client
        process (start-up, import and exit included) and of any child it waited for,
        from this process's RUSAGE_CHILDREN. The stand-in server is a child too, but it
        is only waited for after its clients, so it is not counted here.
        """
        cmd = [client.python, str(CLIENT_SCRIPT)] + args
        stderr_path = sandbox.root / "stderr.txt"
        env = sandbox.env(client)
        env.update(extra_env or {})
        started = time.perf_counter()
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            with stderr_path.open("w") as stderr:
                proc = subprocess.run(
                    cmd, cwd=str(sandbox.cwd), env=env,
                    stdout=subprocess.PIPE, stderr=stderr,
                    universal_newlines=True, timeout=self.timeout_s,
                )
        except subprocess.TimeoutExpired:
            return {"error": "timed out after %.0f s" % self.timeout_s}
        wall_s = time.perf_counter() - started
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        process_cpu_s = (children_after.ru_utime - children_before.ru_utime
                         + children_after.ru_stime - children_before.ru_stime)
        stderr_text = stderr_path.read_text(errors="replace")
        for line in proc.stdout.splitlines():
            if line.startswith(RESULT_MARKER):
                result = json.loads(line[len(RESULT_MARKER):])
                result["process_wall_s"] = wall_s
                result["process_cpu_s"] = process_cpu_s
                result["stderr_lines"] = len(stderr_text.splitlines())
                result["stderr_head"] = stderr_text.splitlines()[:3]
                return result
        last_line = (stderr_text.strip().splitlines() or ["(no stderr)"])[-1]
        return {"error": "exit code %d: %s" % (proc.returncode, last_line[:300])}

    def client_args(self, mode: str, url: str, *extra: str) -> List[str]:
        args = [mode, url]
        if self.token:
            args += ["--token", self.token]
        return args + list(extra)


# -- the stand-in server ------------------------------------------------------


def _no_proxy_opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


@contextmanager
def argus_server(slow_ms: float = 0.0) -> Iterator[Tuple[str, Callable[[], Dict[str, Any]]]]:
    """Start bench_server.py; yield its URL and a function returning its stats."""
    proc = subprocess.Popen(
        [sys.executable, str(SERVER_SCRIPT), "--slow-ms", str(slow_ms)],
        stdout=subprocess.PIPE, universal_newlines=True,
    )
    try:
        first_line = proc.stdout.readline() if proc.stdout else ""
        if not first_line.startswith("PORT "):
            raise RuntimeError("bench_server.py did not start: %r" % first_line)
        url = "http://127.0.0.1:%d" % int(first_line.split()[1])
        opener = _no_proxy_opener()

        def stats() -> Dict[str, Any]:
            """The server's counters, with the set of event ids it received."""
            def get(path: str) -> Any:
                with opener.open(url + path, timeout=_STATS_TIMEOUT_S) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            result = get("/_stats")
            result["event_ids"] = set(get("/_ids"))
            return result

        yield url, stats
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- measurements -------------------------------------------------------------


def bench_import(harness: Harness, client: Client, runs: int) -> Dict[str, Any]:
    sandbox = harness.sandbox()
    warmup = harness.run_client(client, sandbox, ["import"])  # compiles byte code
    if "error" in warmup:
        return {"import_error": warmup["error"]}
    samples = []
    for _ in range(runs):
        result = harness.run_client(client, sandbox, ["import"])
        if "error" in result:
            return {"import_error": result["error"]}
        samples.append(result["import_s"])
    return {
        "import_ms": statistics.median(samples) * 1e3,
        "import_min_ms": min(samples) * 1e3,
        "import_runs": runs,
        "argus_file": warmup.get("argus_file"),
        "argus_version": warmup.get("argus_version"),
        "python": warmup.get("python"),
    }


def bench_epoch(harness: Harness, client: Client, calls: int,
                amortised_calls: int, amortised_reps: int) -> Dict[str, Any]:
    sandbox = harness.sandbox()
    with argus_server() as (url, _stats):
        result = harness.run_client(client, sandbox, harness.client_args(
            "epoch", url, "--calls", str(calls),
            "--amortised-calls", str(amortised_calls),
            "--amortised-reps", str(amortised_reps)))
    if "error" in result:
        return {"epoch_error": result["error"]}
    return {
        "epoch_p50_us": result["p50_ns"] / 1e3,
        "epoch_p90_us": result["p90_ns"] / 1e3,
        "epoch_p99_us": result["p99_ns"] / 1e3,
        "epoch_max_us": result["max_ns"] / 1e3,
        "epoch_timer_overhead_us": result["timer_overhead_ns"] / 1e3,
        "epoch_amortised_us": result["amortised_ns"] / 1e3,
        "epoch_calls": calls,
        "epoch_stderr_lines": result["stderr_lines"],
    }


def bench_daemons(harness: Harness, client: Client) -> Dict[str, Any]:
    sandbox = harness.sandbox()
    with argus_server() as (url, _stats):
        result = harness.run_client(client, sandbox, harness.client_args("daemons", url))
    if "error" in result:
        return {"daemons_error": result["error"]}
    figures = {"daemons_exit_ms": result["daemons_exit_s"] * 1e3}
    if "sample_p50_ns" in result:
        figures.update(sample_p50_ms=result["sample_p50_ns"] / 1e6,
                       sample_max_ms=result["sample_max_ns"] / 1e6,
                       sample_fields=len(result["sample_keys"]))
    return figures


def _cpu_run(harness: Harness, client: Client, events: int,
             extra_env: Optional[Dict[str, str]]) -> Dict[str, Any]:
    """One `cpu` client process against a fresh stand-in server."""
    sandbox = harness.sandbox()
    with argus_server() as (url, stats):
        result = harness.run_client(
            client, sandbox, harness.client_args("cpu", url, "--events", str(events)), extra_env)
        server = stats() if "error" not in result else None
    if server is not None:
        result["delivered"] = server["unique_by_type"].get("job_epoch", 0)
        result["lifecycle_delivered"] = sum(
            server["unique_by_type"].get(t, 0) for t in _LIFECYCLE_EVENTS)
    return result


def bench_cpu(harness: Harness, client: Client, events: int, reps: int, prefix: str,
              extra_env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """CPU per event, all threads: (CPU of a run with epochs - CPU of an empty run) / events.

    Each run is its own process, timed from `Reporter(...)` to the outer `with` returning
    (bench_client.py's `cpu` mode), so the worker's encoding and sending and the exit
    drain count, and `import argus` does not. `reps` full runs and `reps` empty runs
    alternate (full first in even reps); the figure uses the median of each. The same
    difference from the parent's view of the whole process (start-up, import and exit
    handlers included) is reported beside it as a check.
    """
    runs: Dict[int, List[Dict[str, Any]]] = {events: [], 0: []}
    for rep in range(reps):
        for n in ((events, 0) if rep % 2 == 0 else (0, events)):
            result = _cpu_run(harness, client, n, extra_env)
            if "error" in result:
                return {prefix + "error": result["error"]}
            runs[n].append(result)

    def median(n: int, key: Callable[[Dict[str, Any]], float]) -> float:
        return statistics.median(key(r) for r in runs[n])

    def per_event_us(key: Callable[[Dict[str, Any]], float]) -> float:
        return (median(events, key) - median(0, key)) / events * 1e6

    in_run = lambda r: r["cpu_user_s"] + r["cpu_system_s"]  # noqa: E731
    full = runs[events]
    return {prefix + k: v for k, v in {
        "per_event_us": per_event_us(in_run),
        "user_per_event_us": per_event_us(lambda r: r["cpu_user_s"]),
        "system_per_event_us": per_event_us(lambda r: r["cpu_system_s"]),
        "process_per_event_us": per_event_us(lambda r: r["process_cpu_s"]),
        "full_run_ms": median(events, in_run) * 1e3,
        "empty_run_ms": median(0, in_run) * 1e3,
        "full_runs_ms": [round(in_run(r) * 1e3, 1) for r in full],
        "empty_runs_ms": [round(in_run(r) * 1e3, 1) for r in runs[0]],
        "delivered_min": min(r["delivered"] for r in full),
        "lifecycle_min": min(r["lifecycle_delivered"] for r in full + runs[0]),
        "durable_active": sorted({str(r.get("durable_active")) for r in full}),
        "reps": reps,
    }.items()}


def bench_durable_epoch(harness: Harness, client: Client, calls: int,
                        rounds: int) -> Dict[str, Any]:
    """job.epoch with durable mode off and on, interleaved in one process."""
    sandbox = harness.sandbox()
    with argus_server() as (url, _stats):
        result = harness.run_client(client, sandbox, harness.client_args(
            "durable-epoch", url, "--calls", str(calls), "--rounds", str(rounds)))
    if "error" in result:
        return {"durable_error": result["error"]}
    if not result["durable_supported"]:
        return {"durable_supported": False}
    figures: Dict[str, Any] = {"durable_supported": True, "durable_calls": result["calls_each"],
                               "durable_rounds": rounds}
    for stat in ("p50", "p90", "p99", "amortised"):
        off, on = result["off_%s_ns" % stat] / 1e3, result["on_%s_ns" % stat] / 1e3
        figures.update({"durable_off_%s_us" % stat: off, "durable_on_%s_us" % stat: on,
                        "durable_delta_%s_us" % stat: on - off})
    figures["durable_modes_seen"] = {"off": result["off_active"], "on": result["on_active"]}
    return figures


def bench_burst(harness: Harness, client: Client, events: int, slow_ms: float,
                prefix: str, extra_env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    sandbox = harness.sandbox()
    with argus_server(slow_ms) as (url, stats):
        result = harness.run_client(
            client, sandbox, harness.client_args("burst", url, "--events", str(events)),
            extra_env)
        server = stats()
    if "error" in result:
        return {prefix + "error": result["error"]}
    spilled = sandbox.spilled(server["event_ids"])
    return {prefix + k: v for k, v in _burst_figures(result, server, spilled).items()}


def _burst_figures(client: Dict[str, Any], server: Dict[str, Any],
                   spilled: Dict[str, int]) -> Dict[str, Any]:
    emitted = client["events"]
    by_type = server["unique_by_type"]
    delivered = by_type.get("job_epoch", 0)
    last_ack = server["last_ack_wall"]
    span_s = (last_ack - client["first_emit_wall"]) if last_ack else None
    return {
        "emitted": emitted,
        "delivered": delivered,
        "delivered_pct": 100.0 * delivered / emitted if emitted else None,
        "duplicates": server["duplicates"],
        "spilled": spilled["job_epoch_lines"],
        "spilled_also_delivered": spilled["job_epoch_lines_delivered"],
        "spilled_lines_total": spilled["lines"],
        "lost": emitted - delivered
        - (spilled["job_epoch_lines"] - spilled["job_epoch_lines_delivered"]),
        "events_per_s": delivered / span_s if span_s and delivered else None,
        "exit_latency_ms": (client["exit_returned_wall"] - last_ack) * 1e3 if last_ack else None,
        "exit_duration_ms": client["exit_s"] * 1e3,
        "emit_loop_ms": client["emit_s"] * 1e3,
        "server_busy_ms": server["busy_s"] * 1e3,
        "max_rss_mb": client["max_rss_mb"],
        "rss_after_import_mb": client["rss_after_import_mb"],
        "requests": server["requests"],
        "lifecycle_delivered": sum(by_type.get(t, 0) for t in _LIFECYCLE_EVENTS),
        "other_events_delivered": {k: v for k, v in by_type.items() if k != "job_epoch"},
        "stderr_lines": client["stderr_lines"],
        "stderr_head": client["stderr_head"],
        "requests_loaded": client["requests_loaded"],
    }


def measure(harness: Harness, client: Client, opts: argparse.Namespace) -> Dict[str, Any]:
    if client.problem:
        return {"error": client.problem}
    figures: Dict[str, Any] = {}

    def log(what: str) -> None:
        print("  %s: %s ..." % (client.name, what), file=sys.stderr, flush=True)

    log("import time")
    figures.update(bench_import(harness, client, opts.import_runs))
    log("epoch() cost")
    figures.update(bench_epoch(harness, client, opts.events,
                               opts.amortised_calls, opts.amortised_reps))
    log("resource sample and daemon exit")
    figures.update(bench_daemons(harness, client))
    log("burst of %d" % opts.events)
    figures.update(bench_burst(harness, client, opts.events, 0.0, "burst_"))
    log("CPU per event: %d runs of %d epochs, %d empty runs" % (opts.cpu_reps, opts.events,
                                                               opts.cpu_reps))
    figures.update(bench_cpu(harness, client, opts.events, opts.cpu_reps, "cpu_"))
    if opts.durable:
        log("durable mode: epoch() off and on")
        figures.update(bench_durable_epoch(harness, client, opts.events, opts.durable_rounds))
        if figures.get("durable_supported"):
            durable_env = {"ARGUS_DURABLE": "1"}
            log("durable mode: burst of %d" % opts.events)
            figures.update(bench_burst(harness, client, opts.events, 0.0, "dburst_", durable_env))
            log("durable mode: CPU per event")
            figures.update(bench_cpu(harness, client, opts.events, opts.cpu_reps, "dcpu_",
                                     durable_env))
    if opts.slow_ms > 0:
        log("burst of %d against a %g ms server" % (opts.slow_events, opts.slow_ms))
        figures.update(bench_burst(harness, client, opts.slow_events, opts.slow_ms, "slow_"))
    return figures


# -- the report ---------------------------------------------------------------

# (figure key, label, target, number format)
_ROWS = [
    ("import_ms", "import argus (ms, median)", "<= 10", "{:.1f}"),
    ("epoch_p50_us", "job.epoch p50 (us)", "<= 1.5", "{:.2f}"),
    ("epoch_p99_us", "job.epoch p99 (us)", "<= 10", "{:.2f}"),
    ("epoch_amortised_us", "job.epoch amortised (us)", "", "{:.2f}"),
    ("sample_p50_ms", "resource sample, no GPU (ms, p50)", "<= 5", "{:.2f}"),
    ("sample_fields", "  fields in a sample", "", "{:.0f}"),
    ("daemons_exit_ms", "exit with all 3 daemons on (ms)", "", "{:.1f}"),
    ("cpu_per_event_us", "CPU per event, all threads (us)", "<= 6", "{:.2f}"),
    ("cpu_user_per_event_us", "  of which user (us)", "", "{:.2f}"),
    ("cpu_system_per_event_us", "  of which system (us)", "", "{:.2f}"),
    ("cpu_process_per_event_us", "  whole process, parent's view (us)", "", "{:.2f}"),
    ("cpu_full_run_ms", "  CPU of a run with the epochs (ms)", "", "{:.0f}"),
    ("cpu_empty_run_ms", "  CPU of an empty run (ms)", "", "{:.0f}"),
    ("cpu_delivered_min", "  epochs delivered in those runs (min)", "all", "{:,.0f}"),
]
_DURABLE_ROWS = [
    ("durable_off_p50_us", "durable: job.epoch p50, off (us)", "", "{:.2f}"),
    ("durable_on_p50_us", "durable: job.epoch p50, on (us)", "", "{:.2f}"),
    ("durable_delta_p50_us", "durable: p50 on - off (us)", "<= 3", "{:.2f}"),
    ("durable_off_p99_us", "durable: job.epoch p99, off (us)", "", "{:.2f}"),
    ("durable_on_p99_us", "durable: job.epoch p99, on (us)", "", "{:.2f}"),
    ("durable_delta_p99_us", "durable: p99 on - off (us)", "", "{:.2f}"),
    ("durable_off_amortised_us", "durable: amortised, off (us)", "", "{:.2f}"),
    ("durable_on_amortised_us", "durable: amortised, on (us)", "", "{:.2f}"),
    ("dburst_delivered", "durable burst: unique delivered", "all", "{:,.0f}"),
    ("dburst_lost", "durable burst: lost", "0", "{:,.0f}"),
    ("dburst_lifecycle_delivered", "durable burst: start+done delivered", "4", "{:.0f}"),
    ("dburst_spilled", "durable burst: left on disk", "", "{:,.0f}"),
    ("dburst_spilled_also_delivered", "  of which also delivered", "", "{:,.0f}"),
    ("dburst_events_per_s", "durable burst: events/s end to end", "", "{:,.0f}"),
    ("dburst_exit_latency_ms", "durable burst: exit after last ack (ms)", "<= 50", "{:.1f}"),
    ("dburst_stderr_lines", "durable burst: stderr lines", "", "{:,.0f}"),
    ("dcpu_per_event_us", "durable: CPU per event, all threads (us)", "", "{:.2f}"),
]
_BURST_ROWS = [
    ("emitted", "events emitted", "", "{:,.0f}"),
    ("delivered", "unique events delivered", "all", "{:,.0f}"),
    ("delivered_pct", "delivered (%)", "100", "{:.1f}"),
    ("duplicates", "duplicates received", "", "{:,.0f}"),
    ("spilled", "left spilled on disk", "", "{:,.0f}"),
    ("spilled_also_delivered", "  of which also delivered", "", "{:,.0f}"),
    ("lost", "lost (neither delivered nor spilled)", "0", "{:,.0f}"),
    ("lifecycle_delivered", "batch/job start+done delivered", "4", "{:.0f}"),
    ("events_per_s", "events/s end to end", ">= 40,000", "{:,.0f}"),
    ("exit_latency_ms", "exit after last ack (ms)", "<= 50", "{:.1f}"),
    ("exit_duration_ms", "with-block exit took (ms)", "", "{:.1f}"),
    ("emit_loop_ms", "emit loop took (ms)", "", "{:.1f}"),
    ("server_busy_ms", "server busy handling them (ms)", "", "{:.1f}"),
    ("max_rss_mb", "max RSS after burst (MB)", "", "{:.1f}"),
    ("stderr_lines", "stderr lines printed", "", "{:,.0f}"),
]


def _report_rows(opts: argparse.Namespace) -> List[Tuple[str, str, str, str]]:
    rows = list(_ROWS)
    rows += [("burst_" + k, "burst: " + label, target, fmt)
             for k, label, target, fmt in _BURST_ROWS]
    if opts.durable:
        rows += _DURABLE_ROWS
    if opts.slow_ms > 0:
        rows += [("slow_" + k, "slow %g ms: %s" % (opts.slow_ms, label),
                  "" if k == "events_per_s" else target, fmt)
                 for k, label, target, fmt in _BURST_ROWS]
    return rows


def _cell(figures: Dict[str, Any], key: str, fmt: str) -> str:
    value = figures.get(key)
    return "n/a" if value is None else fmt.format(value)


def _ratio(ours: Dict[str, Any], upstream: Dict[str, Any], key: str) -> str:
    a, b = ours.get(key), upstream.get(key)
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b:
        return ""
    return "{:.2f}x".format(a / b)


def print_report(results: Dict[str, Dict[str, Any]], opts: argparse.Namespace) -> None:
    ours, upstream = results["ours"], results["upstream"]
    for name, figures in results.items():
        if name == "meta":
            continue
        if "argus_file" in figures:
            about = "argus %s from %s (Python %s; requests imported: %s)" % (
                figures["argus_version"], figures["argus_file"], figures["python"],
                {True: "yes", False: "no"}.get(figures.get("burst_requests_loaded"), "?"))
        else:
            about = figures.get("error", "failed")
        print("%-9s %s" % (name + ":", about))
        for key in sorted(figures):
            if key.endswith("_error"):
                print("          %s: %s" % (key, figures[key]))
        for prefix, what in (("cpu_", "CPU runs"), ("dcpu_", "durable CPU runs")):
            if prefix + "full_runs_ms" in figures:
                print("          %s (ms): with epochs %s, empty %s" % (
                    what, figures[prefix + "full_runs_ms"], figures[prefix + "empty_runs_ms"]))
        if figures.get("durable_supported") is False:
            print("          durable mode: not in this client (its durable figures are n/a)")
        elif "durable_modes_seen" in figures:
            print("          durable mode as each Reporter reported it: %s"
                  % figures["durable_modes_seen"])
    if "load" in results.get("meta", {}):
        print("load average (1 min) before / after: %.2f / %.2f on %s CPUs"
              % (results["meta"]["load"][0], results["meta"]["load"][1], os.cpu_count()))
    print()
    header = ("figure", "target", "ours", "upstream", "ratio")
    table = [header] + [
        (label, target, _cell(ours, key, fmt), _cell(upstream, key, fmt), _ratio(ours, upstream, key))
        for key, label, target, fmt in _report_rows(opts)
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for n, row in enumerate(table):
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print("\nratio = ours / upstream. epoch timings include ~%s us of timer overhead."
          % _cell(ours if "epoch_timer_overhead_us" in ours else upstream,
                  "epoch_timer_overhead_us", "{:.2f}"))


# -- command line ---------------------------------------------------------------


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream-python", help="interpreter with argus-reporter from PyPI")
    parser.add_argument("--ours-python", default=sys.executable,
                        help="interpreter for our argus.py (default: this one)")
    parser.add_argument("--ours-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for our client, e.g. ARGUS_TRANSPORT=urllib"
                             " (repeatable; ARGUS_* variables are otherwise removed)")
    parser.add_argument("--repo", type=Path, default=REPO_ROOT,
                        help="directory holding our argus.py (default: %(default)s)")
    parser.add_argument("--events", type=int, default=20000,
                        help="events in the burst, and timed epoch() calls")
    parser.add_argument("--amortised-calls", type=int, default=10000)
    parser.add_argument("--amortised-reps", type=int, default=5)
    parser.add_argument("--import-runs", type=int, default=15)
    parser.add_argument("--cpu-reps", type=int, default=3,
                        help="runs with the epochs, and as many empty runs, for CPU per event")
    parser.add_argument("--no-durable", dest="durable", action="store_false",
                        help="skip the durable-mode figures (ARGUS_DURABLE=1; ours only)")
    parser.add_argument("--durable-rounds", type=int, default=4,
                        help="off/on Reporter pairs in the durable epoch() comparison")
    parser.add_argument("--slow-ms", type=float, default=0.0,
                        help="also run a burst against a server taking this long per request")
    parser.add_argument("--slow-events", type=int, default=5000)
    parser.add_argument("--token", default="em_live_benchmark",
                        help="token passed to both clients ('' for none)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds before a client process is killed")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, for a smoke run")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the figures here")
    parser.add_argument("--keep-temp", action="store_true",
                        help="keep the sandboxes (HOME, spill dirs, stderr) for inspection")
    opts = parser.parse_args(argv)
    if any("=" not in item for item in opts.ours_env):
        parser.error("--ours-env takes KEY=VALUE")
    if opts.quick:
        opts.events = min(opts.events, 2000)
        opts.amortised_calls = min(opts.amortised_calls, 2000)
        opts.amortised_reps = min(opts.amortised_reps, 3)
        opts.import_runs = min(opts.import_runs, 5)
        opts.cpu_reps = min(opts.cpu_reps, 1)
        opts.durable_rounds = min(opts.durable_rounds, 2)
        opts.slow_events = min(opts.slow_events, 500)
    return opts


def main(argv: Optional[List[str]] = None) -> int:
    opts = parse_args(argv)
    clients = [
        Client("ours", opts.ours_python, opts.repo.resolve(),
               dict(item.split("=", 1) for item in opts.ours_env)),
        Client("upstream", opts.upstream_python, None),
    ]
    tmp_root = Path(tempfile.mkdtemp(prefix="argus-bench-"))
    load_before = os.getloadavg()[0]
    try:
        harness = Harness(tmp_root, opts.timeout, opts.token or None)
        results: Dict[str, Dict[str, Any]] = {
            client.name: measure(harness, client, opts) for client in clients}
    finally:
        if opts.keep_temp:
            print("sandboxes kept in %s" % tmp_root, file=sys.stderr)
        else:
            shutil.rmtree(str(tmp_root), ignore_errors=True)
    meta = {"argv": sys.argv[1:], "events": opts.events, "slow_ms": opts.slow_ms,
            "cpus": os.cpu_count(), "load": [load_before, os.getloadavg()[0]],
            "slow_events": opts.slow_events, "time": time.time()}
    print_report(dict(results, meta=meta), opts)
    if opts.json:
        opts.json.write_text(json.dumps(dict(results, meta=meta), indent=2, sort_keys=True,
                                        default=sorted))
    return 0


if __name__ == "__main__":
    sys.exit(main())
