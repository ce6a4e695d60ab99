"""Caller-thread cost of argus.LogHandler per record and of console capture per print().

    python benchmarks/bench_logs.py [DIRECTORY_WITH_ARGUS_PY]

A local collector (`argus serve`) runs in its own process and receives what is sent. Each
figure is the median (p50) of 20,000 single calls timed with perf_counter_ns; each is
measured in 5 rounds and the lowest median is printed (the machine is shared and noisy).
This prints figures; it asserts nothing.
"""
import io
import logging
import os
import socket
import shutil
import subprocess
import sys
import tempfile
import time

root = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, root)
import argus  # noqa: E402 - from the directory given

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = subprocess.Popen([sys.executable, os.path.join(root, "argus.py"), "serve", "--port", str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
server.stdout.readline()
os.environ["ARGUS_URL"] = "http://127.0.0.1:%d" % port
spill = tempfile.mkdtemp(prefix="bench-logs-")
os.environ["ARGUS_SPILL_DIR"] = spill  # what a busy collector could not take stays here
Q = dict(heartbeat=False, stop_polling=False, resource_snapshot=False)
N, ROUNDS = 20_000, 5
clock = time.perf_counter_ns


def p50(fn):
    out = []
    for i in range(N):
        t = clock()
        fn(i)
        out.append(clock() - t)
    out.sort()
    return out[N // 2] / 1000


def measure(setup_job, fn, **kw):
    best = []
    for _ in range(ROUNDS):
        with argus.Reporter(batch_prefix="bench", **Q, **kw) as r:
            if setup_job:
                with r.job("j"):
                    best.append(p50(fn))
            else:
                best.append(p50(fn))
    return min(best)


log = logging.getLogger("bench")
log.setLevel(logging.INFO)
log.propagate = False
log.addHandler(logging.NullHandler())  # not lastResort
handler = argus.LogHandler()
record = log.makeRecord("bench", logging.INFO, __file__, 1, "step %d loss %.3f", (7, 0.25), None)

print("python %s, %d CPUs, load %.1f, timer overhead %.2f us"
      % (sys.version.split()[0], os.cpu_count(), os.getloadavg()[0], p50(lambda i: None)))
print("LogHandler.handle(record) alone, job open  p50 %.2f us" % measure(True, lambda i: handler.handle(record)))
print("LogHandler.handle(record) alone, no job    p50 %.2f us" % measure(False, lambda i: handler.handle(record)))


def info(i):
    log.info("step %d loss %.3f", i, 0.25)


base = measure(True, info)
log.addHandler(handler)
with_handler = measure(True, info)
log.removeHandler(handler)
print("logger.info(...), NullHandler only         p50 %.2f us" % base)
print("logger.info(...) + LogHandler, job open    p50 %.2f us  (+%.2f)" % (with_handler, with_handler - base))

sink = io.StringIO()
real = sys.stdout


def print_values(i):
    print("epoch", i, "loss", 0.25)  # 8 writes: 4 values, 3 separators, the newline
    if i % 1000 == 0:
        sink.seek(0)
        sink.truncate()


def print_line(i):
    print("validation done")  # 2 writes: the text, the newline
    if i % 1000 == 0:
        sink.seek(0)
        sink.truncate()


def printing(fn, capture, job, limit=20):
    sys.stdout = sink
    argus.CAPTURE_MAX_LINES_S = limit
    try:
        return measure(job, fn, capture_output=capture)
    finally:
        sys.stdout = real
        argus.CAPTURE_MAX_LINES_S = 20


for title, fn in (('print("epoch", i, "loss", 0.25)', print_values), ('print("validation done")', print_line)):
    plain = printing(fn, False, True)
    print("%-42s p50 %.2f us without capture" % (title, plain))
    for label, capture, job, limit in (
        ("capture on, no job open", True, False, 20),
        ("capture on, job open, past 20 lines/s", True, True, 20),
        ("capture on, job open, every line sent", True, True, 10**9),
    ):
        t = printing(fn, capture, job, limit)
        print("  %-40s p50 %.2f us  (+%.2f)" % (label, t, t - plain))
server.terminate()
shutil.rmtree(spill, ignore_errors=True)
