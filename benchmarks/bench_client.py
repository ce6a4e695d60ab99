"""The client side of the benchmarks: runs inside the interpreter under test.

bench.py starts this script in a subprocess, once per measurement, with the
environment arranged so that ``import argus`` finds the client being measured.
It prints one line ``BENCH_RESULT <json>`` on stdout and nothing else there.

    python bench_client.py import
    python bench_client.py epoch URL --calls 20000 --amortised-calls 10000 --amortised-reps 5
    python bench_client.py burst URL --events 20000
    python bench_client.py daemons URL --samples 200
    python bench_client.py cpu URL --events 20000          # --events 0: the empty run
    python bench_client.py durable-epoch URL --calls 20000 --rounds 4

Standard library only, Python 3.8+.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import resource
import sys
import threading
import time
from typing import Any, Dict, List, Optional

RESULT_MARKER = "BENCH_RESULT "


def _emit_result(result: Dict[str, Any]) -> None:
    sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


def _max_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def _percentile(sorted_values: List[int], pct: float) -> int:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def _client_identity(argus: Any) -> Dict[str, Any]:
    return {
        "argus_file": getattr(argus, "__file__", None),
        "argus_version": getattr(argus, "__version__", None),
        "python": sys.version.split()[0],
    }


def _open_reporter(argus: Any, url: str, token: Optional[str], **extra: Any) -> Any:
    return argus.Reporter(
        batch_prefix="bench",
        source_project="bench",
        heartbeat=False,
        stop_polling=False,
        resource_snapshot=False,
        monitor_url=url,
        token=token,
        **extra
    )


def _durable_active(reporter: Any) -> Optional[bool]:
    """Whether an open Reporter of ours runs in durable mode (None: cannot tell)."""
    return getattr(getattr(reporter, "_sender", None), "durable", None)


def _process_cpu_s() -> Dict[str, float]:
    """CPU seconds of this process, every thread: user and system (getrusage, µs resolution).

    os.times() would do too, but it counts in clock ticks (10 ms on Linux).
    """
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"user": usage.ru_utime, "system": usage.ru_stime}


# -- modes ------------------------------------------------------------------


def measure_import() -> Dict[str, Any]:
    """Seconds spent in ``import argus``, interpreter start-up excluded."""
    started = time.perf_counter()
    import argus
    elapsed = time.perf_counter() - started
    result = {"import_s": elapsed}
    result.update(_client_identity(argus))
    return result


def _timer_overhead_ns(samples: int = 10000) -> int:
    """Median cost of the two perf_counter_ns() calls that bracket a timed call."""
    clock = time.perf_counter_ns
    costs = []
    for _ in range(samples):
        t0 = clock()
        costs.append(clock() - t0)
    costs.sort()
    return costs[len(costs) // 2]


def _time_each_epoch(job: Any, calls: int) -> List[int]:
    clock = time.perf_counter_ns
    epoch = job.epoch
    costs = [0] * calls
    for i in range(calls):
        t0 = clock()
        epoch(i, train_loss=0.5, val_loss=0.6, lr=1e-3)
        costs[i] = clock() - t0
    return costs


def _time_epoch_loop(job: Any, calls: int, first_epoch: int) -> float:
    """Seconds per call, the whole loop timed at once."""
    epoch = job.epoch
    t0 = time.perf_counter()
    for i in range(first_epoch, first_epoch + calls):
        epoch(i, train_loss=0.5, val_loss=0.6, lr=1e-3)
    return (time.perf_counter() - t0) / calls


def measure_epoch(url: str, token: Optional[str], calls: int,
                  amortised_calls: int, amortised_reps: int) -> Dict[str, Any]:
    import argus
    overhead_ns = _timer_overhead_ns()
    with _open_reporter(argus, url, token) as reporter:
        with reporter.job("job-1") as job:
            costs = sorted(_time_each_epoch(job, calls))
            per_call = [
                _time_epoch_loop(job, amortised_calls, calls + rep * amortised_calls)
                for rep in range(amortised_reps)
            ]
    per_call.sort()
    result = {
        "calls": calls,
        "p50_ns": _percentile(costs, 50),
        "p90_ns": _percentile(costs, 90),
        "p99_ns": _percentile(costs, 99),
        "max_ns": costs[-1],
        "timer_overhead_ns": overhead_ns,
        "amortised_calls": amortised_calls,
        "amortised_reps": amortised_reps,
        "amortised_ns": per_call[len(per_call) // 2] * 1e9,
    }
    result.update(_client_identity(argus))
    return result


def measure_burst(url: str, token: Optional[str], events: int) -> Dict[str, Any]:
    import argus
    rss_after_import = _max_rss_mb()
    reporter = _open_reporter(argus, url, token)
    with reporter:
        with reporter.job("job-1") as job:
            epoch = job.epoch
            first_emit_wall = time.time()
            t0 = time.perf_counter()
            for i in range(events):
                epoch(i, train_loss=0.5, val_loss=0.6, lr=1e-3)
            emit_s = time.perf_counter() - t0
        exit_started = time.perf_counter()
    exit_s = time.perf_counter() - exit_started
    exit_returned_wall = time.time()
    result = {
        "events": events,
        "first_emit_wall": first_emit_wall,
        "emit_s": emit_s,
        "exit_s": exit_s,
        "exit_returned_wall": exit_returned_wall,
        "rss_after_import_mb": rss_after_import,
        "max_rss_mb": _max_rss_mb(),
        "requests_loaded": "requests" in sys.modules,
    }
    result.update(_client_identity(argus))
    return result


def measure_cpu(url: str, token: Optional[str], events: int) -> Dict[str, Any]:
    """Process CPU (all threads) of one Reporter and job with ``events`` epochs.

    Counted from just before ``Reporter(...)`` to just after the outer ``with`` returns,
    so it includes the worker's encoding and sending and the exit drain; ``import argus``
    is before it. bench.py runs this with ``--events 0`` too (the empty run) and
    subtracts. Durable mode comes from the environment (ARGUS_DURABLE), if at all.
    """
    import argus
    before = _process_cpu_s()
    wall0 = time.perf_counter()
    reporter = _open_reporter(argus, url, token)
    with reporter:
        durable = _durable_active(reporter)
        with reporter.job("job-1") as job:
            epoch = job.epoch
            for i in range(events):
                epoch(i, train_loss=0.5, val_loss=0.6, lr=1e-3)
    wall_s = time.perf_counter() - wall0
    after = _process_cpu_s()
    result = {
        "events": events,
        "cpu_user_s": after["user"] - before["user"],
        "cpu_system_s": after["system"] - before["system"],
        "wall_s": wall_s,
        "threads_after_exit": threading.active_count(),
        "durable_active": durable,
        "requests_loaded": "requests" in sys.modules,
    }
    result.update(_client_identity(argus))
    return result


def measure_durable_epoch(url: str, token: Optional[str], calls: int,
                          rounds: int) -> Dict[str, Any]:
    """job.epoch cost with durable mode off and on, in one process, interleaved.

    Per-call timings drift between processes by more than the difference sought, so
    both modes run in this one process: ``rounds`` rounds, each with one Reporter opened
    with ``durable=False`` and one with ``durable=True`` (which goes first alternates).
    Each Reporter times ``calls // rounds`` single calls and then a loop of as many, so
    each mode gets ``calls`` timed calls in all.
    """
    import argus
    if "durable" not in inspect.signature(argus.Reporter).parameters:
        result = {"durable_supported": False}
        result.update(_client_identity(argus))
        return result
    per_round = max(1, calls // rounds)
    costs: Dict[bool, List[int]] = {False: [], True: []}
    loops: Dict[bool, List[float]] = {False: [], True: []}
    active: Dict[bool, List[Optional[bool]]] = {False: [], True: []}
    for rnd in range(rounds):
        order = (False, True) if rnd % 2 == 0 else (True, False)
        for durable in order:
            with _open_reporter(argus, url, token, durable=durable) as reporter:
                active[durable].append(_durable_active(reporter))
                with reporter.job("job-%d-%s" % (rnd, "on" if durable else "off")) as job:
                    costs[durable] += _time_each_epoch(job, per_round)
                    loops[durable].append(_time_epoch_loop(job, per_round, per_round))
    result: Dict[str, Any] = {"durable_supported": True, "calls_each": per_round * rounds,
                              "rounds": rounds, "timer_overhead_ns": _timer_overhead_ns()}
    for durable, name in ((False, "off"), (True, "on")):
        ordered = sorted(costs[durable])
        loops[durable].sort()
        result.update({
            name + "_p50_ns": _percentile(ordered, 50),
            name + "_p90_ns": _percentile(ordered, 90),
            name + "_p99_ns": _percentile(ordered, 99),
            name + "_max_ns": ordered[-1],
            name + "_amortised_ns": loops[durable][len(loops[durable]) // 2] * 1e9,
            name + "_active": active[durable],
        })
    result.update(_client_identity(argus))
    return result


def _resource_sampler(argus: Any) -> Any:
    """The client's own resource-sampling function, or None if it has none we know."""
    sampler_class = getattr(argus, "_ResourceSampler", None)
    if sampler_class is not None:
        return sampler_class().sample
    try:
        from argus import context  # the upstream package's module
    except ImportError:
        return None
    return getattr(context, "_collect_snapshot", None)


def measure_daemons(url: str, token: Optional[str], samples: int) -> Dict[str, Any]:
    """Cost of one resource sample, and exit latency with all three daemon threads on."""
    import argus

    result: Dict[str, Any] = {}
    sample = _resource_sampler(argus)
    if sample is not None:
        sample()  # the first one sets up (and primes CPU deltas)
        costs = []
        for _ in range(samples):
            time.sleep(0.02)  # real samples are 30 s apart: let the CPU counters move
            t0 = time.perf_counter_ns()
            fields = sample()
            costs.append(time.perf_counter_ns() - t0)
        costs.sort()
        result.update(sample_p50_ns=_percentile(costs, 50), sample_max_ns=costs[-1],
                      sample_keys=sorted(fields))
    reporter = argus.Reporter(batch_prefix="bench", source_project="bench", heartbeat=True,
                              stop_polling=True, resource_snapshot=True, monitor_url=url,
                              token=token)
    reporter.__enter__()
    job = reporter.job("job-1").__enter__()
    for i in range(10):
        job.epoch(i, train_loss=0.5, val_loss=0.6, lr=1e-3)
    time.sleep(0.5)  # the daemons are waiting in their intervals
    t0 = time.perf_counter()
    job.__exit__(None, None, None)
    reporter.__exit__(None, None, None)
    result["daemons_exit_s"] = time.perf_counter() - t0
    result.update(_client_identity(argus))
    return result


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="argus benchmark client")
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("import")
    epoch = sub.add_parser("epoch")
    epoch.add_argument("url")
    epoch.add_argument("--token")
    epoch.add_argument("--calls", type=int, default=20000)
    epoch.add_argument("--amortised-calls", type=int, default=10000)
    epoch.add_argument("--amortised-reps", type=int, default=5)
    burst = sub.add_parser("burst")
    burst.add_argument("url")
    burst.add_argument("--token")
    burst.add_argument("--events", type=int, default=20000)
    daemons = sub.add_parser("daemons")
    daemons.add_argument("url")
    daemons.add_argument("--token")
    daemons.add_argument("--samples", type=int, default=50)
    cpu = sub.add_parser("cpu")
    cpu.add_argument("url")
    cpu.add_argument("--token")
    cpu.add_argument("--events", type=int, default=20000)
    durable = sub.add_parser("durable-epoch")
    durable.add_argument("url")
    durable.add_argument("--token")
    durable.add_argument("--calls", type=int, default=20000)
    durable.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)

    if args.mode == "import":
        result = measure_import()
    elif args.mode == "epoch":
        result = measure_epoch(args.url, args.token, args.calls,
                               args.amortised_calls, args.amortised_reps)
    elif args.mode == "daemons":
        result = measure_daemons(args.url, args.token, args.samples)
    elif args.mode == "cpu":
        result = measure_cpu(args.url, args.token, args.events)
    elif args.mode == "durable-epoch":
        result = measure_durable_epoch(args.url, args.token, args.calls, args.rounds)
    else:
        result = measure_burst(args.url, args.token, args.events)
    _emit_result(result)


if __name__ == "__main__":
    main()
