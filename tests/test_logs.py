"""Job logs: the traceback of a failed job.

Every event here arrives at FakeArgus, which validates it against the event schema. The
order checked is arrival order: one worker sends a process's events in the order they were
made, so a job's log lines arrive before the job_failed that follows them.
"""

from __future__ import annotations

import pytest

import argus

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
