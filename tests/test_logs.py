"""Job logs: the traceback of a failed job, argus.LogHandler, and console capture.

Every event here arrives at FakeArgus, which validates it against the event schema. The
order checked is arrival order: one worker sends a process's events in the order they were
made, so a job's log lines arrive before the job_failed that follows them.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap
import threading

import pytest

import argus
from conftest import ROOT, run_script

QUIET = dict(heartbeat=False, stop_polling=False, resource_snapshot=False)


def reporter(fake, **kwargs):
    return argus.Reporter(monitor_url=fake.url, **QUIET, **kwargs)


def job_events(fake, job_id) -> list:
    """(event type, level, line) of one job's events, in arrival order."""
    with fake.lock:
        events = [e for e in fake.events.values() if e.get("job_id") == job_id]
    return [(e["event_type"], e["data"].get("level"), e["data"].get("line")) for e in events]


def log_lines(fake, job_id) -> list:
    return [(level, line) for etype, level, line in job_events(fake, job_id) if etype == "log_line"]


def fail_deep_inside(message):
    def innermost_frame():
        raise ValueError(message)

    innermost_frame()


# --- tracebacks ---------------------------------------------------------------------------


def test_a_failed_job_sends_its_traceback_as_one_error_line_just_before_job_failed(fake):
    with pytest.raises(ValueError):
        with reporter(fake) as r:
            with r.job("ok"):
                pass
            with r.job("bad"):
                fail_deep_inside("boom")

    events = job_events(fake, "bad")
    assert [(etype, level) for etype, level, _ in events] == [
        ("job_start", None),
        ("log_line", "error"),
        ("job_failed", None),
    ]
    line = events[1][2]
    assert line.startswith("Traceback (most recent call last):")
    assert "in fail_deep_inside" in line and "in innermost_frame" in line
    assert line.endswith("ValueError: boom")
    assert log_lines(fake, "ok") == []  # a clean job has no traceback
    assert len(fake.of_type("log_line")) == 1  # and the failed batch sends none of its own


def test_a_batch_failing_outside_any_job_sends_no_log_line(fake):
    # log_line needs a job_id (PROTOCOL.md): the batch's cause is in batch_failed alone.
    with pytest.raises(KeyError):
        with reporter(fake) as r:
            with r.job("done-before"):
                pass
            {}["missing"]  # noqa: B018
    assert fake.of_type("log_line") == []
    assert fake.of_type("batch_failed")[0]["data"]["error"] == "KeyError: 'missing'"


def test_the_traceback_hides_secrets_like_the_command_line_does(fake):
    token = "em_live_Zx81secretTOKEN"
    message = (
        "could not log in: password=hunter2 --api-key AK-123 url=https://bob:s3cret@db.example/x "
        "key %s and plain %s" % (token, "TOKENTOKEN-42")
    )

    def login(password):
        raise PermissionError(message)

    with pytest.raises(PermissionError):
        with reporter(fake, token="TOKENTOKEN-42") as r:
            with r.job("login"):
                login(password="hunter2")

    ((level, line),) = log_lines(fake, "login")
    assert level == "error"
    for secret in ("hunter2", "AK-123", "s3cret", "Zx81secretTOKEN", "TOKENTOKEN-42"):
        assert secret not in line
    assert "password=*** --api-key *** url=https://bob:***@db.example/x" in line
    assert "key em_live_*** and plain ***" in line
    assert "login(password=\"***\")" in line  # the source line of the frame too


def test_a_long_traceback_keeps_its_last_16_kib_with_the_innermost_frames(fake):
    def outer():
        try:
            raise RuntimeError("the first cause " + "x" * 60_000)
        except RuntimeError as cause:
            raise OSError("disk full") from cause

    with pytest.raises(OSError):
        with reporter(fake) as r:
            with r.job("long"):
                outer()

    ((level, line),) = log_lines(fake, "long")
    assert len(line.encode("utf-8")) <= argus.TRACEBACK_MAX_BYTES == 16 * 1024
    assert line.startswith("[argus: this traceback was cut to its last 16 KiB]\n")
    assert "the first cause" not in line  # the outermost part went
    assert "in outer" in line and line.endswith("OSError: disk full")


def test_tracebacks_can_be_switched_off(fake, monkeypatch):
    monkeypatch.setenv("ARGUS_TRACEBACKS", "0")
    with pytest.raises(ValueError):
        with reporter(fake) as r:
            with r.job("bad"):
                fail_deep_inside("boom")
    assert [etype for etype, _, _ in job_events(fake, "bad")] == ["job_start", "job_failed"]


def test_the_integrations_failure_path_sends_the_traceback_too(fake):
    # Lightning's on_exception, Keras's report_failure and the exit hook end in _TrainingRun.fail.
    run = argus._TrainingRun(
        project="demo",
        job_id="fit",
        argus_url=fake.url,
        token=None,
        model=None,
        dataset=None,
        experiment_type=None,
        batch_prefix="fit",
        heartbeat=False,
        stop_polling=False,
        resource_snapshot=False,
        auto_upload_dirs=None,
    )
    run.start()
    try:
        fail_deep_inside("loss exploded")
    except ValueError as exc:
        run.fail(exc)

    events = job_events(fake, "fit")
    assert [(etype, level) for etype, level, _ in events] == [
        ("job_start", None),
        ("log_line", "error"),
        ("job_failed", None),
    ]
    assert "in innermost_frame" in events[1][2] and events[1][2].endswith("ValueError: loss exploded")
    assert fake.of_type("batch_failed")


# --- argus.LogHandler ---------------------------------------------------------------------


@pytest.fixture
def root_handler():
    handler = argus.LogHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    train = logging.getLogger("train")
    train.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    train.setLevel(logging.NOTSET)


def test_log_handler_sends_the_records_of_an_open_job_at_their_levels(fake, root_handler):
    log = logging.getLogger("train")
    logging.addLevelName(25, "NOTICE")
    log.info("before the batch")
    with reporter(fake) as r:
        log.info("in the batch, outside jobs")
        with r.job("j1"):
            log.debug("d %d", 1)
            log.info("i %s", "two")
            log.log(25, "a custom level")
            log.warning("w")
            log.error("e")
            log.critical("c")
        log.info("between jobs")
        with r.job("j2"):
            logging.getLogger("train.data").info("a child logger")
    log.info("after the batch")

    assert log_lines(fake, "j1") == [
        ("debug", "d 1"),
        ("info", "i two"),
        ("info", "a custom level"),
        ("warning", "w"),
        ("error", "e"),
        ("critical", "c"),
    ]
    assert log_lines(fake, "j2") == [("info", "a child logger")]
    assert len(fake.of_type("log_line")) == 7


def test_log_handler_goes_to_the_innermost_open_job(fake, root_handler):
    log = logging.getLogger("train")
    with reporter(fake) as r:
        with r.job("outer"):
            log.info("to outer")
            with r.job("inner"):
                log.info("to inner")
            log.info("outer again")
    assert log_lines(fake, "outer") == [("info", "to outer"), ("info", "outer again")]
    assert log_lines(fake, "inner") == [("info", "to inner")]


def test_log_handler_never_forwards_the_sdks_own_records_or_threads(fake, root_handler):
    log = logging.getLogger("train")
    with reporter(fake) as r:
        with r.job("j"):
            logging.getLogger("argus").warning("the SDK's own warning")
            logging.getLogger("argus.integrations").warning("and its children's")
            # what a library logs on the SDK's threads (urllib3 about the worker's requests)
            thread = threading.Thread(target=log.warning, args=("on argus-worker",), name="argus-worker")
            thread.start()
            thread.join()
            log.info("kept")
    assert log_lines(fake, "j") == [("info", "kept")]


def test_log_handler_skips_records_outside_jobs_with_one_debug_note(fake, root_handler, caplog):
    argus._logged_once.discard("loghandler-outside")
    caplog.set_level(logging.DEBUG, logger="argus")
    with reporter(fake):
        logging.getLogger("train").info("no job open")
        logging.getLogger("train").info("still none")
    notes = [r for r in caplog.records if r.name == "argus" and "outside a job" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelname == "DEBUG"
    assert fake.of_type("log_line") == []


def test_log_handler_job_id_takes_the_records_outside_jobs(fake):
    handler = argus.LogHandler(job_id="setup")
    log = logging.getLogger("setup-test")
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    log.propagate = False
    try:
        with reporter(fake, batch_id="with-setup") as r:
            log.info("loading data")
            with r.job("train"):
                log.info("training")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    assert log_lines(fake, "setup") == [("info", "loading data")]
    assert log_lines(fake, "train") == [("info", "training")]
    assert {e["batch_id"] for e in fake.of_type("log_line")} == {"with-setup"}


def test_log_handler_job_id_outside_a_reporter_uses_the_published_batch(fake):
    code = textwrap.dedent(
        """
        import logging, argus
        log = logging.getLogger("prep")
        log.addHandler(argus.LogHandler(job_id="prep"))
        log.warning("no batch anywhere: skipped")
        argus.set_batch_id("published-9")
        log.warning("preparing %d files", 3)
        argus._sender_for_emit().close()
        """
    )
    out = run_script(code, {"ARGUS_URL": fake.url})
    assert out.returncode == 0, out.stderr
    (event,) = fake.of_type("log_line")
    assert (event["batch_id"], event["job_id"]) == ("published-9", "prep")
    assert event["data"] == {"line": "preparing 3 files", "level": "warning"}


def test_log_handler_formats_records_and_hides_secrets_in_their_tracebacks(fake, root_handler):
    root_handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
    log = logging.getLogger("train")
    with reporter(fake) as r:
        with r.job("j"):
            try:
                raise ConnectionError("login with password=hunter2 refused")
            except ConnectionError:
                log.exception("upload failed")
    ((level, line),) = log_lines(fake, "j")
    assert level == "error"
    assert line.startswith("train ERROR: upload failed\nTraceback (most recent call last):")
    assert line.endswith("ConnectionError: login with password=*** refused")
    assert "hunter2" not in line


def test_log_handler_is_thread_safe(fake, root_handler):
    log = logging.getLogger("train")

    def work(n):
        for i in range(50):
            log.info("thread %d record %d", n, i)

    with reporter(fake) as r:
        with r.job("j"):
            threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    lines = [line for _, line in log_lines(fake, "j")]
    assert sorted(lines) == sorted("thread %d record %d" % (n, i) for n in range(8) for i in range(50))
    for n in range(8):  # each thread's records keep their order
        mine = [line for line in lines if line.startswith("thread %d " % n)]
        assert mine == ["thread %d record %d" % (n, i) for i in range(50)]


def test_log_handler_is_a_logging_handler_made_without_importing_logging_at_import():
    code = textwrap.dedent(
        """
        import sys, argus
        print("logging" in sys.modules)
        import logging, pickle
        class Mine(argus.LogHandler):
            pass
        from argus import LogHandler
        print(LogHandler is argus.LogHandler, isinstance(Mine(), logging.Handler))
        print(LogHandler.__module__, LogHandler.__name__, pickle.loads(pickle.dumps(LogHandler)) is LogHandler)
        print("LogHandler" in dir(argus), "LogHandler" in argus.__all__)
        """
    )
    out = run_script(code, {})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:4] == ["False", "True True", "argus LogHandler True", "True True"]


# --- console capture ----------------------------------------------------------------------

CAPTURE_SCRIPT = r"""
import os, sys, time, threading, argus
from tqdm import tqdm

# What the delivery core did, step by step: printed with a failed order check.
trace, t00 = [], time.monotonic()
def traced(cls, name, what):
    inner = getattr(cls, name)
    def wrapper(self, *args, **kwargs):
        worker = getattr(self, "worker", None) or self
        before = (worker._disk_mode, len(worker.facade._queue))
        result = inner(self, *args, **kwargs)
        trace.append("%.3f %s %s %s -> %s mode %s->%s queue %d->%d" % (
            time.monotonic() - t00, threading.current_thread().name, name, what(args, kwargs), str(result)[:60],
            before[0], worker._disk_mode, before[1], len(worker.facade._queue)))
        return result
    setattr(cls, name, wrapper)
traced(argus._Worker, "_journal_locked", lambda a, k: "")
traced(argus._Worker, "_queue_to_disk", lambda a, k: "")
traced(argus._Worker, "_disk_step", lambda a, k: "")
traced(argus._Worker, "_deliver", lambda a, k: "%d events" % len(a[0]))
traced(argus._Replayer, "_replay_once", lambda a, k: repr(sorted(k)))
traced(argus._Worker, "_take", lambda a, k: "")
imports = argus._worker_imports
def timed_imports(url):
    trace.append("%.3f worker imports start" % (time.monotonic() - t00))
    imports(url)
    trace.append("%.3f worker imports end" % (time.monotonic() - t00))
argus._worker_imports = timed_imports

batch_id, elapsed_file = sys.argv[1], sys.argv[2]
print("before the batch")
with argus.Reporter(batch_id=batch_id, heartbeat=False, stop_polling=False, resource_snapshot=False) as r:
    print("in the batch, outside jobs")
    with r.job("train"):
        print("epoch", 1, "loss", 0.5)
        print("h\u00e9llo w\u00f6rld \u2713", flush=True)
        sys.stderr.write("a warning\n")
        print("part one, ", end="")
        print("part two")
        sys.stdout.writelines(["w1\n", "w2\n"])
        t0 = time.monotonic()
        for _ in tqdm(range(10000), file=sys.stderr, mininterval=0, miniters=1, ncols=60,
                      bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}"):
            pass
        elapsed = time.monotonic() - t0
        print("no newline at the end", end="")
    print()
    print("between jobs")
    with r.job("quiet"):
        pass
with open(elapsed_file, "w") as f:
    f.write(repr(elapsed))
with open(elapsed_file + ".diag", "w") as f:  # for a failed order check: which path was taken
    store = r._sender.spill
    f.write("spilled %d, failures %d, delivered %d, lost %d, files left %r" % (
        store.spilled, store.failures, r._sender.delivered, r._sender.lost, sorted(os.listdir(store.directory)) if os.path.isdir(store.directory) else []))
    f.write("\n" + "\n".join(trace))
print("after the batch")
"""


def run_capture_script(fake, tmp_path, batch_id, capture) -> tuple:
    pytest.importorskip("tqdm")
    script = tmp_path / "train.py"
    script.write_text(CAPTURE_SCRIPT, encoding="utf-8")
    elapsed = tmp_path / ("elapsed-%s" % batch_id)
    env = dict(os.environ, ARGUS_URL=fake.url, ARGUS_CAPTURE_OUTPUT=capture, PYTHONPATH=str(ROOT))
    env.pop("PYTHONIOENCODING", None)
    out = subprocess.run(
        [sys.executable, str(script), batch_id, str(elapsed)], env=env, capture_output=True, timeout=120
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-3000:]
    return out, float(elapsed.read_text())


def test_console_capture_is_a_tee_the_output_is_byte_identical(fake, tmp_path):
    off, _ = run_capture_script(fake, tmp_path, "capture-off", "0")
    on, _ = run_capture_script(fake, tmp_path, "capture-on", "1")
    assert on.stdout == off.stdout and on.stderr == off.stderr
    assert on.stdout.startswith(b"before the batch\n") and "\u2713".encode() in on.stdout
    assert on.stderr.count(b"\r") > 10000  # the bar was drawn at every step both times
    lines = [e for e in fake.of_type("log_line")]
    assert {e["batch_id"] for e in lines} == {"capture-on"}  # capture off sends nothing


def capture_story(fake, out, diag_file=None) -> str:
    """What arrived, request by request, and what argus said: for a failed order check."""
    with fake.lock:
        events = [(e["batch_id"], e["job_id"], e["event_type"], e["data"].get("line")) for e in fake.events.values()]
        requests = list(fake.requests)
    said = [ln for ln in out.stderr.decode(errors="replace").replace("\r", "\n").split("\n") if "argus" in ln]
    shown = [e for e in events if not (e[3] and "/10000" in e[3])]
    diag = open(diag_file).read() if diag_file and os.path.exists(diag_file) else "?"
    return "events (bar states left out): %r\nrequests: %r\nargus on stderr: %r\nthe run's spill store: %s" % (
        shown, requests, said[-20:], diag)


def test_console_capture_sends_the_jobs_lines_and_a_bars_final_state(fake, tmp_path):
    out, elapsed = run_capture_script(fake, tmp_path, "capture-lines", "1")
    lines = log_lines(fake, "train")
    bar = [(level, line) for level, line in lines if "|" in line and "/10000" in line]
    assert [pair for pair in lines if pair not in bar] == [
        ("info", "epoch 1 loss 0.5"),
        ("info", "h\u00e9llo w\u00f6rld \u2713"),
        ("warning", "a warning"),  # stderr
        ("info", "part one, part two"),
        ("info", "w1"),
        ("info", "w2"),
        ("info", "no newline at the end"),  # the unfinished line, at the end of the job
    ], capture_story(fake, out, tmp_path / "elapsed-capture-lines.diag")
    # 10,000 redraws of the bar: its state at most once a second, then its final state.
    assert 1 <= len(bar) <= int(elapsed) + 2, (len(bar), elapsed)
    assert bar[-1] == ("warning", "100%|" + bar[-1][1][5:]) and bar[-1][1].endswith("| 10000/10000")
    assert all(level == "warning" and "\r" not in line for level, line in bar)
    assert [t for t, _, _ in job_events(fake, "train")][-1] == "job_done"
    assert log_lines(fake, "quiet") == []  # nothing printed while it was open


def test_a_carriage_return_line_sends_its_state_once_a_second_then_its_final_state(fake, monkeypatch):
    now = [0.0]
    with reporter(fake, capture_output=True) as r:
        with r.job("bar"):
            r.flush()
            monkeypatch.setattr(argus, "_mono", lambda: now[0])  # the capture's clock, by hand
            for step in range(14):  # a redraw every 0.25 s, from 0 s to 3.25 s
                sys.stderr.write("\rstep %2d/13" % step)
                now[0] += 0.25
            sys.stderr.write("\n")
            sys.stderr.write("\rsettled")
            now[0] += 1.5
            sys.stderr.write("\rsettled")  # 1.5 s after the line began: sent
            sys.stderr.write("\n")  # the final state is the one sent: not again
            monkeypatch.undo()
    assert log_lines(fake, "bar") == [
        ("warning", "step  4/13"),  # 1 s after the line began
        ("warning", "step  8/13"),
        ("warning", "step 12/13"),
        ("warning", "step 13/13"),  # the newline: the final state
        ("warning", "settled"),
    ]


def test_console_lines_and_traceback_arrive_in_order_before_job_failed(fake):
    with pytest.raises(ValueError):
        with reporter(fake, capture_output=True) as r:
            with r.job("bad"):
                print("step 1")
                print("step 2, unfinished", end="")
                fail_deep_inside("boom")
    events = job_events(fake, "bad")
    assert [(etype, level, line) for etype, level, line in events[:3]] == [
        ("job_start", None, None),
        ("log_line", "info", "step 1"),
        ("log_line", "info", "step 2, unfinished"),
    ]
    assert events[3][:2] == ("log_line", "error") and events[3][2].endswith("ValueError: boom")
    assert [etype for etype, _, _ in events[4:]] == ["job_failed"]


def test_console_capture_sends_20_lines_a_second_and_counts_the_rest(fake):
    with reporter(fake, capture_output=True) as r:
        with r.job("chatty"):
            for i in range(100):
                print("line", i)
    lines = log_lines(fake, "chatty")
    sent = [line for level, line in lines if level == "info"]
    notes = [line for level, line in lines if level == "warning"]
    # The 100 prints take far less than a second: the first 20 go, one note counts the rest
    # (a slower machine would only send more lines and smaller counts).
    assert sent[: argus.CAPTURE_MAX_LINES_S] == ["line %d" % i for i in range(20)]
    not_sent = sum(int(note.split()[1]) for note in notes)
    assert notes and len(sent) + not_sent == 100
    assert notes[-1] == "[argus: %d console line(s) not sent: more than 20 lines/s]" % not_sent


def test_console_capture_restores_the_streams_when_the_block_raises(fake):
    before = sys.stdout, sys.stderr
    with pytest.raises(RuntimeError):
        with reporter(fake, capture_output=True) as r:
            assert isinstance(sys.stdout, argus._Tee) and isinstance(sys.stderr, argus._Tee)
            with r.job("j"):
                raise RuntimeError("x")
    assert (sys.stdout, sys.stderr) == before


def test_console_capture_leaves_a_stream_someone_else_installed(fake):
    before = sys.stdout
    theirs = io.StringIO()
    try:
        with reporter(fake, capture_output=True) as r:
            ours = sys.stdout
            with r.job("j"):
                print("captured")
                sys.stdout = theirs
                print("to their stream")
        assert sys.stdout is theirs  # not clobbered on restore
        ours.write("our wrapper only writes through now\n")
    finally:
        sys.stdout = before
    assert theirs.getvalue() == "to their stream\n"
    assert log_lines(fake, "j") == [("info", "captured")]


def test_console_capture_is_opt_in_by_argument_or_environment(fake, monkeypatch):
    with reporter(fake):
        assert not isinstance(sys.stdout, argus._Tee)
    monkeypatch.setenv("ARGUS_CAPTURE_OUTPUT", "1")
    with reporter(fake):
        assert isinstance(sys.stdout, argus._Tee)
    with reporter(fake, capture_output=False):
        assert not isinstance(sys.stdout, argus._Tee)


def test_console_capture_works_over_a_stream_that_is_not_a_file(fake):
    class NotebookStream:  # like Jupyter's OutStream: no fileno, no buffer
        def __init__(self):
            self.parts, self.flushes = [], 0

        def write(self, text):
            self.parts.append(text)
            return len(text)

        def flush(self):
            self.flushes += 1

    before = sys.stdout
    notebook = sys.stdout = NotebookStream()
    try:
        with reporter(fake, capture_output=True) as r:
            with r.job("cell"):
                print("from a cell", flush=True)
                assert not hasattr(sys.stdout, "fileno") and not hasattr(sys.stdout, "buffer")
                sys.stdout.flushes_seen = notebook.flushes  # attributes land on the stream itself
    finally:
        sys.stdout = before
    assert "".join(notebook.parts) == "from a cell\n" and notebook.flushes == 1
    assert notebook.flushes_seen == 1
    assert log_lines(fake, "cell") == [("info", "from a cell")]


def test_the_wrapped_streams_answer_like_the_originals(fake, tmp_path):
    code = textwrap.dedent(
        """
        import sys, argus

        def describe():
            return [(s.fileno(), s.isatty(), s.encoding, s.errors, type(s.buffer).__name__,
                     s.line_buffering, s.writable()) for s in (sys.stdout, sys.stderr)]

        plain = describe()
        with argus.Reporter(capture_output=True, heartbeat=False, stop_polling=False,
                            resource_snapshot=False) as r:
            with r.job("j"):
                print(type(sys.stdout).__name__, describe() == plain, flush=True)
        print(type(sys.stdout).__name__, plain)
        """
    )
    out = run_script(code, {"ARGUS_URL": fake.url})
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first == "_Tee True"
    assert second.startswith("TextIOWrapper [(1, False,")


def test_sigterm_restores_the_streams_before_the_programs_handler_runs(fake):
    code = textwrap.dedent(
        """
        import os, signal, sys, time, argus

        def handler(signum, frame):
            print("handler sees", type(sys.stdout).__name__, type(sys.stderr).__name__, flush=True)
            sys.exit(3)

        signal.signal(signal.SIGTERM, handler)
        with argus.Reporter(capture_output=True, heartbeat=False, stop_polling=False,
                            resource_snapshot=False) as r:
            with r.job("long"):
                print("working", flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)
        """
    )
    out = run_script(code, {"ARGUS_URL": fake.url})
    assert out.returncode == 3, out.stderr
    assert out.stdout == "working\nhandler sees TextIOWrapper TextIOWrapper\n"
    assert [(t, level) for t, level, _ in job_events(fake, "long")] == [
        ("job_start", None),
        ("log_line", "info"),
        ("job_failed", None),
    ]
    assert fake.of_type("job_failed")[0]["data"]["error"] == "terminated by SIGTERM"
