"""One lifecycle: signals during the exit drain, fork and multiprocessing children, shutdown
entered twice, SIGTERM while ``auto_upload_dirs`` uploads, ``ARGUS_BATCH_ID`` with Reporters
that overlap, and requests that must end by a deadline.

Runs are real subprocesses against ``FakeArgus`` (every event it stores is validated). Each
scenario prints one line (``pytest -s``) with the figures a user would count: emitted,
delivered, on disk, lost, where lost = emitted - delivered - on disk, and it must be 0
wherever the process was not SIGKILLed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import argus
from conftest import (
    GATE_PRELUDE,
    ROOT,
    epochs,
    everywhere,
    hold_artifacts,
    line,
    of_type,
    on_disk,
    wait_until,
    write_png,
)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX processes, signals and fork")

PRELUDE = """
import os, signal, sys, threading, time, warnings
warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork() with threads running
import argus
""" + GATE_PRELUDE


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def start(code: str, env: dict, cwd, sigint: bool = False) -> subprocess.Popen:
    """PRELUDE + code run as ``python train.py`` in ``cwd``; stdout and stderr go to files."""
    full_env = dict(os.environ)
    full_env.update(env)
    full_env["PYTHONPATH"] = str(ROOT)
    full_env["PYTHONDONTWRITEBYTECODE"] = "1"
    cwd = Path(cwd)
    out = open(cwd / "child.out", "w")
    err = open(cwd / "child.err", "w")
    script = cwd / "train.py"  # a script file, as users run them (and a short command line)
    script.write_text(PRELUDE + code)
    try:
        return subprocess.Popen(
            [sys.executable, str(script)],
            env=full_env,
            cwd=str(cwd),
            stdout=out,
            stderr=err,
            # Ctrl-C must raise KeyboardInterrupt in the child even where this process
            # inherited SIGINT ignored (a background job, nohup)
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if sigint else None,
        )
    finally:
        out.close()
        err.close()


def finish(proc: subprocess.Popen, cwd, timeout: float = 60) -> tuple:
    """Wait for the child; return (returncode, stdout, stderr). A child that hangs is killed."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    cwd = Path(cwd)
    return proc.returncode, (cwd / "child.out").read_text(), (cwd / "child.err").read_text()


def run(code: str, env: dict, cwd, timeout: float = 60) -> tuple:
    return finish(start(code, env, cwd), cwd, timeout)


# ---------------------------------------------------------------------------------------
# signals during the exit drain
# ---------------------------------------------------------------------------------------

SIGTERM_DURING_A_JOURNAL = """
with argus.Reporter(batch_id="journal-1", **QUIET) as r:
    sender = r._sender
    real_append, fired = sender.spill.append, []

    def append(lines, **kwargs):  # SIGTERM just after the queue's lines reach the disk
        written = real_append(lines, **kwargs)
        if len(lines) > 1 and not fired:
            fired.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return written

    sender.spill.append = append
    with r.job("train") as job:
        job.epoch(0)
        while sender.worker._inflight is None:  # the first request is in flight (and hangs)
            time.sleep(0.001)
        for i in range(1, 8):
            job.epoch(i)  # the queue (5) fills up: the program's thread writes it to disk
print("not reached", flush=True)
"""


def test_sigterm_while_the_program_writes_the_queue_to_disk_saves_each_event_once(fake, spill_dir, tmp_path):
    """A full queue is written to disk on the program's thread; SIGTERM lands just after
    the write, before the queue lets go of what it wrote. The handler's shutdown wrote the
    same events again under new ids, and a replay stored each of them twice."""
    fake.script = ["hang"]
    env = {"ARGUS_URL": fake.url, "ARGUS_QUEUE_SIZE": "5", "ARGUS_DRAIN_S": "0.5"}
    rc, out, err = run(SIGTERM_DURING_A_JOURNAL, env, tmp_path)
    assert rc in (-signal.SIGTERM, 143) and "not reached" not in out, err[-2000:]
    fake._hang.set()
    replay = argus.ExperimentReporter(fake.url, "replay", batch_id="replay-1")
    assert wait_until(lambda: on_disk(spill_dir) == {}, 15)
    replay.close(5)
    stored = [e["data"]["epoch"] for e in fake.events.values() if e["event_type"] == "job_epoch"]
    assert sorted(stored) == list(range(7)), stored  # each once, under one id (7: the process died in epoch(6))
    assert [e["event_type"] for e in fake.events.values() if e["job_id"] == "train"][-1] == "job_failed"


DRAIN_THEN_SIGNAL = """
with argus.Reporter(batch_id="drain-1", **QUIET) as r:
    with r.job("train") as job:
        for i in range(1000):
            job.epoch(i)
    # the signal lands while __exit__ drains the queue against a server that never answers
    threading.Timer(0.3, os.kill, (os.getpid(), signal.%s)).start()
print("after the block", flush=True)
"""


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_during_the_exit_drain_still_puts_the_whole_queue_on_disk(fake, spill_dir, tmp_path, signame):
    """Issue 10: 1,004 events end on disk without the signal and 0 with it (close() marked
    itself closed before draining, so the handler's close() returned at once)."""
    fake.script = ["hang"] * 100  # reads each request, never answers
    proc = start(DRAIN_THEN_SIGNAL % signame, {"ARGUS_URL": fake.url}, tmp_path, sigint=True)
    rc, out, err = finish(proc, tmp_path)
    events = everywhere(fake, spill_dir)
    emitted = 1000 + 4  # batch_start, job_start, 1000 epochs, job_done, batch_done
    kept = len(epochs(events, "train")) + sum(
        1 for t in ("batch_start", "job_start", "job_done", "batch_done") if of_type(events, t, "drain-1")
    )
    line(signame + " during the exit drain", emitted=emitted, delivered=len(fake.events),
         on_disk=len(on_disk(spill_dir)), lost=emitted - kept, rc=rc)
    assert epochs(events, "train") == list(range(1000)), err[-2000:]
    assert kept == emitted
    if signame == "SIGTERM":
        assert rc == -signal.SIGTERM  # the process still ends as SIGTERM ends it
    assert "Traceback" not in err or "KeyboardInterrupt" in err, err[-2000:]


# ---------------------------------------------------------------------------------------
# fork and multiprocessing
# ---------------------------------------------------------------------------------------

FORKED_CHILD_REPORTER = """
with argus.Reporter(batch_id="parent-1", **QUIET) as r:
    with r.job("parent-job") as job:
        job.epoch(0)
        pid = os.fork()
        if pid == 0:
            fd = os.open("child-progress", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with argus.Reporter(batch_id="child-1", **QUIET) as c:
                with c.job("child-job") as cjob:
                    i = 0
                    while True:
                        cjob.epoch(i)
                        os.write(fd, b"%d\\n" % i)
                        i += 1
                        time.sleep(0.005)
            os._exit(0)
        end = time.time() + 30
        while time.time() < end:
            try:
                if len(open("child-progress").read().split()) >= 20:
                    break
            except OSError:
                pass
            time.sleep(0.01)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        print("child signal", os.WTERMSIG(status) if os.WIFSIGNALED(status) else None, flush=True)
        job.epoch(1)
"""


FORK_IDS = """
with argus.Reporter(batch_id="ids-1", **QUIET) as r:
    with r.job("parent") as job:
        job.epoch(0)
        assert r.flush(10)  # the parent has drawn event ids: the rest of its bulk is in memory
        pid = os.fork()
        who = "child" if pid == 0 else "parent"
        for i in range(1, 301):
            r.emit("job_epoch", job_id=who + "-emit", epoch=i)
        if pid == 0:
            os._exit(0 if r.flush(20) else 3)
        _, status = os.waitpid(pid, 0)
        print("child status", os.WEXITSTATUS(status), flush=True)
"""


def test_a_forked_child_never_draws_the_parents_event_ids(fake, spill_dir, tmp_path):
    """Event ids are made in bulk ahead of use: a forked child that kept the parent's unused
    ones would send the same ids as the parent, and the server would drop one of each pair
    as a duplicate."""
    rc, out, err = run(FORK_IDS, {"ARGUS_URL": fake.url}, tmp_path)
    assert rc == 0 and "child status 0" in out, err[-2000:]
    events = everywhere(fake, spill_dir)
    line("fork and event ids", parent=len(epochs(events, "parent-emit")), child=len(epochs(events, "child-emit")),
         duplicates_seen_by_server=fake.duplicates)
    assert fake.duplicates == 0
    assert epochs(events, "parent-emit") == list(range(1, 301))
    assert epochs(events, "child-emit") == list(range(1, 301))


def test_a_forked_child_with_its_own_reporter_handles_sigterm(fake, spill_dir, tmp_path):
    """Issue 10: a forked child that opens its own Reporter ignored SIGTERM: its job and batch
    stayed RUNNING and its queue was lost."""
    rc, out, err = run(FORKED_CHILD_REPORTER, {"ARGUS_URL": fake.url}, tmp_path)
    assert rc == 0, err[-2000:]
    returned = [int(x) for x in (tmp_path / "child-progress").read_text().split()]
    events = everywhere(fake, spill_dir)
    got = epochs(events, "child-job")
    failed = of_type(events, "batch_failed", "child-1") + of_type(events, "job_failed")
    line("SIGTERM in a forked child's Reporter", emitted=len(returned), delivered_or_on_disk=len(got),
         lost=len(set(returned) - set(got)), failed_events=len(failed))
    assert [e["job_id"] for e in of_type(events, "job_failed")] == ["child-job"]
    reasons = [e["data"].get("error") or e["data"].get("reason") for e in of_type(events, "batch_failed", "child-1")]
    assert len(reasons) == 1 and "SIGTERM" in reasons[0]
    assert not of_type(events, "batch_done", "child-1")
    assert "child signal %d" % signal.SIGTERM in out  # it still ends as SIGTERM ends a process
    assert set(returned) <= set(got)  # every epoch the child's calls returned for is kept
    # the parent's batch is untouched and ends normally
    assert len(of_type(events, "batch_done", "parent-1")) == 1 and not of_type(events, "batch_failed", "parent-1")
    assert epochs(events, "parent-job") == [0, 1]


MULTIPROCESSING_CHILDREN = """
import multiprocessing


def work(k):
    for i in range(20):
        argus.emit("job_epoch", job_id="worker-%d" % k, epoch=i)
    # returns: multiprocessing ends the child with os._exit(), no atexit, no flush by hand


if __name__ == "__main__":
    ctx = multiprocessing.get_context("fork")
    with argus.Reporter(batch_id="mp-1", **QUIET) as r:
        procs = [ctx.Process(target=work, args=(k,)) for k in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        print("exitcodes", [p.exitcode for p in procs], flush=True)
"""


def test_multiprocessing_fork_children_deliver_what_they_emit(fake, spill_dir, tmp_path):
    """Issue 10: 0 of 80 events of multiprocessing children were stored, 0 spilled."""
    rc, out, err = run(MULTIPROCESSING_CHILDREN, {"ARGUS_URL": fake.url}, tmp_path)
    assert rc == 0, err[-2000:]
    assert "exitcodes [0, 0, 0, 0]" in out, out + err[-2000:]
    events = everywhere(fake, spill_dir)
    kept = sum(len(epochs(events, "worker-%d" % k)) for k in range(4))
    line("multiprocessing children", emitted=80, delivered=sum(
        1 for e in fake.events.values() if (e.get("job_id") or "").startswith("worker-")),
        on_disk=len(on_disk(spill_dir)), lost=80 - kept)
    for k in range(4):
        assert epochs(events, "worker-%d" % k) == list(range(20)), "worker-%d" % k
    assert len(of_type(events, "batch_start", "mp-1")) == 1 and len(of_type(events, "batch_done", "mp-1")) == 1


# The worker's first import on its own thread is slowed down, and that import brings in
# `logging` (as `requests` does through urllib3): logging registers its at-fork hooks then. A
# fork that waits for the worker's imports lets logging register them while the fork's
# "before" hooks are running, and the parent prints "cannot release un-acquired lock".
SLOW_FIRST_WORKER_IMPORT = """
import importlib.abc

fired = threading.Event()


class SlowFirstImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if fired.is_set() or threading.current_thread() is threading.main_thread():
            return None
        fired.set()
        time.sleep(0.3)
        import logging  # noqa: F401
        return None


assert "logging" not in sys.modules
sys.meta_path.insert(0, SlowFirstImport())
with argus.Reporter(batch_id="fork-imports-1", **QUIET) as r:
    with r.job("parent") as job:
        job.epoch(0)
        fired.wait(1.0)  # (a worker that imports nothing on its thread is fine too)
        pid = os.fork()
        if pid == 0:
            r.emit("job_epoch", job_id="child", epoch=0)
            os._exit(0 if r.flush(10) else 3)
        _, status = os.waitpid(pid, 0)
        print("child status", os.WEXITSTATUS(status), flush=True)
"""


def test_a_fork_while_the_worker_imports_prints_no_lock_error_and_both_sides_deliver(fake, spill_dir, tmp_path):
    """Issue 10: _before_fork waited while the worker imported, and logging's at-fork hook
    then printed `cannot release un-acquired lock` (5 of 5 runs)."""
    rc, out, err = run(SLOW_FIRST_WORKER_IMPORT, {"ARGUS_URL": fake.url}, tmp_path)
    events = everywhere(fake, spill_dir)
    line("fork during worker imports", emitted=6, delivered=len(fake.events),
         lock_errors=err.count("un-acquired lock"))
    assert rc == 0, err[-2000:]
    assert "cannot release un-acquired lock" not in err, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert "child status 0" in out, out + err[-2000:]
    assert epochs(events, "child") == [0] and epochs(events, "parent") == [0]
    assert len(fake.events) == 6  # batch_start, job_start, 2 epochs, job_done, batch_done


# ---------------------------------------------------------------------------------------
# shutdown entered twice, and the program's handlers afterwards
# ---------------------------------------------------------------------------------------


def _inside(thread: threading.Thread, function: str) -> bool:
    """True while ``thread`` runs ``function`` of the argus module (seen from its stack)."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == function and frame.f_globals.get("__name__") == "argus":
            return True
        frame = frame.f_back
    return False


def test_a_second_close_while_the_first_drains_waits_for_it_instead_of_skipping_it(fake, spill_dir):
    """Issue 10: shutdown marked itself done before the work it guards; a second entry
    returned at once, with the queue still in memory."""
    fake.script = ["hang"] * 10
    sender = argus.ExperimentReporter(fake.url, "idem", batch_id="idem-1")
    for i in range(100):
        sender.job_epoch("train", i)
    first = threading.Thread(target=sender.close, args=(1.5,), name="first-close")
    first.start()
    try:
        assert wait_until(lambda: _inside(first, "close") or not first.is_alive(), 10)
        sender.close(10.0)  # a second entry: SIGTERM, atexit or the program itself
        # counted the moment the second close returned
        events, waiting, delivered = everywhere(fake, spill_dir), len(on_disk(spill_dir)), len(fake.events)
    finally:
        first.join(15)
    line("close() entered twice", emitted=100, delivered=delivered, on_disk=waiting,
         lost=100 - len(epochs(events, "train")))
    assert epochs(events, "train") == list(range(100))


def test_the_programs_signal_handlers_are_back_once_the_block_ends(fake, spill_dir):
    """SIGTERM (and SIGINT, if the SDK handles it) are the program's own again after the
    Reporter block; a later SIGTERM is the program's business alone."""

    def own_term(signum, frame):  # pragma: no cover - never called
        pass

    before_int = signal.getsignal(signal.SIGINT)
    previous = signal.signal(signal.SIGTERM, own_term)
    try:
        with argus.Reporter(monitor_url=fake.url, heartbeat=False, stop_polling=False, resource_snapshot=False):
            during = signal.getsignal(signal.SIGTERM)
        after_term = signal.getsignal(signal.SIGTERM)
        after_int = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, before_int)
    assert during is not own_term  # the SDK's handler sat in front while the batch ran
    assert after_term is own_term
    assert after_int is before_int
    assert len(fake.events) == 2


# ---------------------------------------------------------------------------------------
# auto_upload_dirs
# ---------------------------------------------------------------------------------------

AUTO_UPLOAD = """
with argus.Reporter(batch_id="auto-1", auto_upload_dirs=["plots"], **QUIET) as r:
    with r.job("train") as job:
        for i in range(10):
            job.epoch(i)
print("after the block", flush=True)
"""


def test_sigterm_while_auto_upload_dirs_uploads_still_ends_the_batch(fake, spill_dir, tmp_path, monkeypatch):
    """Issue 10: SIGTERM during auto_upload_dirs ended the batch with neither batch_done nor
    batch_failed: the job shows DONE and the batch RUNNING forever."""
    write_png(tmp_path / "plots" / "loss.png")
    arrived, release = hold_artifacts(fake, monkeypatch)
    proc = start(AUTO_UPLOAD, {"ARGUS_URL": fake.url}, tmp_path)
    try:
        assert arrived.wait(30), (tmp_path / "child.err").read_text()[-2000:]
        proc.send_signal(signal.SIGTERM)
        rc, out, err = finish(proc, tmp_path)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
    events = everywhere(fake, spill_dir)
    ends = of_type(events, "batch_done", "auto-1") + of_type(events, "batch_failed", "auto-1")
    line("SIGTERM during auto_upload_dirs", emitted=14, delivered=len(fake.events),
         on_disk=len(on_disk(spill_dir)), batch_ends=len(ends), rc=rc)
    assert rc == -signal.SIGTERM
    assert epochs(events, "train") == list(range(10))
    assert len(of_type(events, "job_done")) == 1
    assert [e["event_type"] for e in ends] in (["batch_done"], ["batch_failed"]), ends


BYTES_AUTO_UPLOAD = """
with argus.Reporter(batch_id="bytes-1", auto_upload_dirs=os.fsencode("plots"), **QUIET) as r:
    pass
print("after the block", flush=True)
"""


def test_auto_upload_dirs_given_as_bytes_uploads_and_raises_nothing(fake, spill_dir, tmp_path):
    """Issue 10: `auto_upload_dirs=b"..."` raised out of __exit__ (a bytes path is a path)."""
    write_png(tmp_path / "plots" / "loss.png")
    rc, out, err = run(BYTES_AUTO_UPLOAD, {"ARGUS_URL": fake.url}, tmp_path)
    line("auto_upload_dirs=b'plots'", rc=rc, events=len(fake.events), artifacts=len(fake.artifacts))
    assert rc == 0 and "after the block" in out, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert [e["event_type"] for e in fake.events.values()] == ["batch_start", "batch_done"]
    assert [(a["kind"], a["id"], a["filename"]) for a in fake.artifacts] == [("batches", "bytes-1", "loss.png")]


# ---------------------------------------------------------------------------------------
# ARGUS_BATCH_ID and other threads
# ---------------------------------------------------------------------------------------

OVERLAPPING = """
def show(step):
    print(step, os.environ.get("ARGUS_BATCH_ID"), argus.get_batch_id(), flush=True)


a = argus.Reporter(batch_id="env-a", **QUIET)
b = argus.Reporter(batch_id="env-b", **QUIET)
a.__enter__()
show("a-open")
b.__enter__()
show("both-open")
a.__exit__(None, None, None)  # not the innermost one first: a sweep's workers end in any order
show("b-open")
b.__exit__(None, None, None)
show("none-open")
argus.emit("log_line", job_id="late", line="after both batches ended")
"""


def test_argus_batch_id_names_the_innermost_open_batch_and_is_cleared_after_the_last(fake, spill_dir, tmp_path):
    """Issue 10: after two overlapping Reporters closed, ARGUS_BATCH_ID named a finished
    batch, and `emit` landed there."""
    rc, out, err = run(OVERLAPPING, {"ARGUS_URL": fake.url}, tmp_path)
    assert rc == 0, err[-2000:]
    steps = dict((ln.split(" ", 1)[0], ln.split(" ", 1)[1]) for ln in out.splitlines())
    late = [e for e in fake.events.values() if e["event_type"] == "log_line"]
    line("overlapping Reporters", steps=json.dumps(steps), late_events=len(late))
    assert steps == {
        "a-open": "env-a env-a",
        "both-open": "env-b env-b",
        "b-open": "env-b env-b",  # a closed; b is still open: children must land in b
        "none-open": "None None",
    }
    assert late == []  # nothing lands in a batch that ended
    assert sorted(e["event_type"] for e in fake.events.values()) == ["batch_done"] * 2 + ["batch_start"] * 2


POLLER_AND_CHURN = """
sys.setswitchinterval(1e-6)  # threads interleave at every few bytecodes: races show at once
done = threading.Event()


def churn():
    # a program thread that sets and removes environment variables, as overlapping
    # Reporters do with ARGUS_BATCH_ID (and launchers with CUDA_VISIBLE_DEVICES)
    while not done.is_set():
        os.environ["TRAIN_PHASE"] = "warmup"
        del os.environ["TRAIN_PHASE"]


with argus.Reporter(batch_id="poll-1", heartbeat=False, resource_snapshot=False, stop_polling=0.02) as r:
    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    time.sleep(2.0)  # two seconds of the program's warm-up, polled every 20 ms meanwhile
    done.set()
    churner.join()
    gate("warmed-up", 20)  # the user presses Stop now
    end = time.time() + 10
    while not r.stopped and time.time() < end:
        time.sleep(0.01)
    print("stopped", r.stopped, flush=True)
"""


def test_the_stop_poller_survives_a_program_that_changes_the_environment(fake, spill_dir, tmp_path):
    """Issue 10: the stop poller died of a KeyError raised while another thread removed an
    environment variable (`requests` reads os.environ on every request), and Stop never
    fired for the rest of the run."""
    fake.stop = False
    env = {"ARGUS_URL": fake.url}
    env.update(("CLUSTER_SETTING_%03d" % i, "x" * 40) for i in range(300))  # an HPC-sized environment
    proc = start(POLLER_AND_CHURN, env, tmp_path)
    try:
        assert wait_until(lambda: (tmp_path / "warmed-up.ready").exists(), 30)
        during = sum(1 for m, path, n in list(fake.requests) if m == "GET")
        fake.stop = True  # the user presses Stop
        (tmp_path / "warmed-up.go").touch()
        rc, out, err = finish(proc, tmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()
    line("stop poller vs environment churn", polls_answered_during_churn=during, rc=rc, out=out.strip())
    assert rc == 0, err[-2000:]
    assert "stopped True" in out, err[-2000:]
    assert "stop poller stopped" not in err


# ---------------------------------------------------------------------------------------
# every request has a deadline
# ---------------------------------------------------------------------------------------


SENDERS_AGAINST_SLOWLORIS = """
for k in range(5):
    sender = argus.ExperimentReporter(os.environ["SLOW_URL"], "slow", timeout=1.0, batch_id="slow-%d" % k)
    sender.job_epoch("train", 0)
    sender.close(0.5)


def alive():
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    sockets = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            sockets += os.readlink("/proc/self/fd/" + fd).startswith("socket:")
        except OSError:
            pass
    return threads, sockets


end = time.time() + 6  # 1 s per request, plus a generous margin for a loaded machine
while time.time() < end and any(alive()):
    time.sleep(0.05)
threads, sockets = alive()
print("threads", len(threads), "sockets", sockets, threads, flush=True)
"""


def test_events_in_flight_when_close_gives_up_on_the_server_are_kept_on_disk(slowloris, spill_dir):
    """close() stops waiting for a server that trickles its answer: the events of the
    request in flight were never acknowledged, so they are on disk when close() returns."""
    sender = argus.ExperimentReporter(slowloris.url, "inflight", batch_id="inflight-1")
    for i in range(10):
        sender.job_epoch("train", i)
    assert wait_until(lambda: slowloris.accepted >= 1, 10)  # the request is on its way
    sender.close(0.5)
    kept = on_disk(spill_dir)  # counted the moment close() returned
    line("in flight at close", emitted=10, delivered=0, on_disk=len(kept), lost=10 - len(kept))
    assert epochs(kept, "train") == list(range(10))


def test_the_guard_cuts_only_the_late_request_never_the_next_one(fake, spill_dir, monkeypatch):
    """The guard reads a request's deadline, then aborts its socket. If the late request
    ended between the two steps and the next one began on the same connection, the abort
    cut that next one, which then had to be sent again. Here the late request ends, and
    the next is sent, at exactly that moment: the abort must still be the late one's."""
    facade = argus.ExperimentReporter(fake.url, "late", batch_id="late-1", _worker=False)
    sender = facade.sender
    started = [threading.Event(), threading.Event()]
    release = [threading.Event(), threading.Event()]
    aborted = []

    class Transport:  # each request waits to be released, as a slow server's would
        name = "scripted"
        calls = 0

        def request(self, method, path, body=None, headers=None, timeout=10.0):
            n, Transport.calls = Transport.calls, Transport.calls + 1
            started[n].set()
            release[n].wait(10)
            return 200, {}, b'{"accepted": true, "event_id": %d, "deduplicated": false}' % n

        def abort(self):
            aborted.append(Transport.calls)  # how many requests had begun by then

        def close(self):
            pass

    sender._transport = Transport()
    pairs = [(argus._uuid4(), "{}") for _ in range(2)]
    unsent = []
    sending = threading.Thread(target=lambda: unsent.extend(sender._send([p], 1) for p in pairs))
    sending.start()
    assert started[0].wait(10)  # the first request is in flight, its deadline set
    real_mono, once = argus._mono, []

    def mono():  # the guard's clock, read between its look at the deadline and the abort
        if threading.current_thread() is guard and not once:
            once.append(1)
            release[0].set()  # the late request ends now...
            started[1].wait(0.5)  # ...and the next one begins, unless the guard holds it off
            return real_mono() + 1e6  # past any deadline
        return real_mono()

    monkeypatch.setattr(argus, "_mono", mono)
    guard = threading.Thread(target=facade.worker._guard_tick)
    guard.start()
    guard.join(10)
    release[1].set()
    sending.join(10)
    monkeypatch.undo()
    facade.close(1)
    assert once and aborted == [1], aborted  # the abort reached the late request only
    assert unsent == [[], []] and sender.delivered == 2


def test_an_event_whose_call_overlaps_close_from_another_thread_is_saved_and_said(fake, spill_dir, caplog, monkeypatch):
    """A logging thread's job_epoch converts its value (a tensor's item(), an array's
    tolist(): slow) while the program closes the run. The call had passed the check for
    a closed sender, so its event landed in the queue after close() saved it: never sent,
    never saved, not counted, not said."""
    caplog.set_level("WARNING", logger="argus")
    monkeypatch.setattr(argus, "_logged_once", set())  # (said once per sender: start with none said)
    facade = argus.ExperimentReporter(fake.url, "late", batch_id="late-1")
    inside, go = threading.Event(), threading.Event()

    class Loss:  # a value whose conversion takes a while
        def __float__(self):
            inside.set()
            go.wait(10)
            return 0.25

    facade.job_start("j")
    facade.job_epoch("j", 0, train_loss=0.5)
    logging_thread = threading.Thread(target=lambda: facade.job_epoch("j", 1, train_loss=Loss()))
    logging_thread.start()
    assert inside.wait(5)
    facade.close(3)  # the program ends the run meanwhile
    go.set()
    logging_thread.join(5)
    kept = on_disk(spill_dir)
    assert epochs(kept, "j") == [1] and kept[next(iter(kept))]["data"]["train_loss"] == 0.25
    assert epochs(fake.events, "j") == [0] and facade.lost == 0
    assert "1 event(s) emitted by another thread while the Reporter of batch late-1 was closing" in caplog.text


def test_the_guard_writes_events_that_wait_behind_an_upload_or_flush_to_disk(fake, spill_dir):
    """The worker is busy (a long request, an upload); a flush marker heads the queue and
    events wait behind it. The guard looked only at the queue's head, so those events
    stayed in memory only, however old: a SIGKILL lost them."""
    facade = argus.ExperimentReporter(fake.url, "behind", batch_id="behind-1", _worker=False)
    marker = argus._Flush()
    facade._queue.append(marker)
    facade._queue.append(("job_epoch", "behind-1", "train", time.time() - 2.0, {"epoch": 3}, 0))
    facade.worker._guard_tick()
    assert epochs(on_disk(spill_dir), "train") == [3]
    assert list(facade._queue) == [marker]  # the flush keeps its place for the worker
    facade.close(1)


def test_events_queued_while_the_guard_writes_the_queue_to_disk_follow_it_there(fake, spill_dir, monkeypatch):
    """The worker saw disk mode off and waited for the lock; the guard held it, wrote the
    queue to disk (disk mode on) and let go; the program queued one more event meanwhile.
    That event must follow the others through disk. Taken live, it reached the server
    before them (CI saw a job's lines stored after its job_done this way)."""
    facade = argus.ExperimentReporter(fake.url, "race", batch_id="race-1")
    worker = facade.worker
    real_take, raced = argus._Worker._take, []

    def take(self):
        if self is worker and not raced and self.facade._queue:
            raced.append(1)

            def guard_writes():  # as _guard_tick does, for an event a second old
                with worker._lock:
                    worker._journal_locked()

            guard = threading.Thread(target=guard_writes)
            guard.start()
            guard.join(10)
            facade.job_epoch("train", 5, train_loss=0.5)  # the program, meanwhile
        return real_take(self)

    monkeypatch.setattr(argus._Worker, "_take", take)
    for i in range(5):
        facade.job_epoch("train", i, train_loss=0.5)
    assert wait_until(lambda: raced, 10)
    facade.close(10)
    arrived = [e["data"]["epoch"] for e in fake.events.values() if e["event_type"] == "job_epoch"]
    assert arrived == [0, 1, 2, 3, 4, 5], (arrived, fake.requests)
    assert facade.spill.spilled == 6 and on_disk(spill_dir) == {}  # all six went through disk


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts sockets in /proc")
def test_a_slowloris_server_leaves_no_thread_or_socket_behind_after_the_deadline(slowloris, spill_dir, tmp_path):
    """Issue 10: no request had an overall deadline; a server trickling its answer left 7-9
    worker threads and sockets alive after 10 Reporters."""
    rc, out, err = run(SENDERS_AGAINST_SLOWLORIS, {"SLOW_URL": slowloris.url}, tmp_path)
    assert rc == 0, err[-2000:]
    threads = int(out.split("threads ")[1].split()[0])
    sockets = int(out.split("sockets ")[1].split()[0])
    events = on_disk(spill_dir)
    line("5 senders vs slowloris", threads_alive=threads, sockets_open=sockets,
         connections=slowloris.accepted, emitted=5, on_disk=len(events))
    assert (threads, sockets) == (0, 0), out
    assert len(events) == 5  # what the trickling server never acknowledged is kept
