"""Job logs: the traceback of a failed job, and argus.LogHandler.

Every event here arrives at FakeArgus, which validates it against the event schema. The
order checked is arrival order: one worker sends a process's events in the order they were
made, so a job's log lines arrive before the job_failed that follows them.
"""

from __future__ import annotations

import logging
import textwrap
import threading

import pytest

import argus
from conftest import run_script

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
