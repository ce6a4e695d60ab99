"""Where the CPU of bench.py's "CPU per event" run goes, thread by thread (our client only).

    python benchmarks/profile_cpu.py [--events 20000] [--repo DIR] [--top 25] [--empty]

Starts bench_server.py, then runs, in this process, what bench_client.py's ``cpu`` mode
runs (one Reporter, one job, ``--events`` epochs, both ``with`` blocks exiting) with a
cProfile profiler in every thread the SDK starts (the delivery worker, the spill guard)
and one on the calling thread. The profilers time with ``time.thread_time`` (each
thread's own CPU clock), so waits cost nothing and each thread's total is its CPU.
Prints the process CPU of the run (getrusage, all threads), each thread's CPU and its
top functions by own CPU time.
Profiling slows Python code down by about two, and by more where calls are many and
small, so read the shares, not the absolute times. ARGUS_* variables in the environment
are honoured (e.g. ARGUS_DURABLE=1). Standard library only. It asserts nothing.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--repo", type=Path, default=HERE.parent,
                        help="directory holding the argus.py to profile")
    parser.add_argument("--top", type=int, default=25, help="functions listed per thread")
    parser.add_argument("--empty", action="store_true", help="also profile an empty run first")
    opts = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="argus-profile-"))
    os.environ.setdefault("ARGUS_SPILL_DIR", str(tmp / "spill"))
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    sys.path.insert(0, str(opts.repo.resolve()))
    import argus  # noqa: E402  (the one under --repo)

    profiles: Dict[str, List[cProfile.Profile]] = {}
    lock = threading.Lock()
    original_run = threading.Thread.run

    def profiled_run(thread: threading.Thread) -> None:
        profile = cProfile.Profile(time.thread_time)
        with lock:
            profiles.setdefault(thread.name, []).append(profile)
        profile.enable()
        try:
            original_run(thread)
        finally:
            profile.disable()

    threading.Thread.run = profiled_run  # every thread started from now on

    server = subprocess.Popen([sys.executable, str(HERE / "bench_server.py")],
                              stdout=subprocess.PIPE, universal_newlines=True)
    try:
        url = "http://127.0.0.1:%d" % int(server.stdout.readline().split()[1])

        def one_run(events: int) -> float:
            before = _cpu_s()
            main_profile = cProfile.Profile(time.thread_time)
            profiles.setdefault("caller", []).append(main_profile)
            main_profile.enable()
            reporter = argus.Reporter(batch_prefix="bench", source_project="bench",
                                      heartbeat=False, stop_polling=False,
                                      resource_snapshot=False, monitor_url=url,
                                      token="em_live_benchmark")
            with reporter:
                with reporter.job("job-1") as job:
                    for i in range(events):
                        job.epoch(i, train_loss=0.5, val_loss=0.6, lr=1e-3)
            main_profile.disable()
            return _cpu_s() - before

        if opts.empty:
            empty_s = one_run(0)
            print("empty run: process CPU %.1f ms (profiled)" % (empty_s * 1e3))
            report(profiles, opts.top)
            profiles.clear()
        full_s = one_run(opts.events)
        print("\nrun of %d epochs: process CPU %.1f ms, %.1f us per event (profiled, all"
              " threads, empty run not subtracted)"
              % (opts.events, full_s * 1e3, full_s / opts.events * 1e6))
        report(profiles, opts.top)
    finally:
        threading.Thread.run = original_run
        server.terminate()
        server.wait()
    return 0


def report(profiles: Dict[str, List[cProfile.Profile]], top: int) -> None:
    totals = {}
    merged = {}
    for name, items in profiles.items():
        stats = None
        for profile in items:
            if stats is None:
                stats = pstats.Stats(profile, stream=io.StringIO())
            else:
                stats.add(profile)
        if stats is not None:
            merged[name] = stats
            totals[name] = stats.total_tt
    grand = sum(totals.values()) or 1.0
    for name in sorted(merged, key=lambda n: -totals[n]):
        stats = merged[name]
        print("\n== thread %s: %.1f ms CPU profiled (%.0f %% of all threads)"
              % (name, totals[name] * 1e3, 100.0 * totals[name] / grand))
        rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
        print("  own CPU ms  share   calls  cum ms  function")
        for (filename, line, func), (_cc, nc, tt, ct, _callers) in rows:
            print("     %7.1f  %4.1f%%  %6d  %6.1f  %s:%d(%s)" % (
                tt * 1e3, 100.0 * tt / totals[name] if totals[name] else 0.0, nc, ct * 1e3,
                os.path.basename(filename), line, func))


if __name__ == "__main__":
    sys.exit(main())
