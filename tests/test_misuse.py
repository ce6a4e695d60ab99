"""API misuse gets one clear message, and the training run goes on.

Each case: the message a user sees (once), what reaches the server, and that the code after
the mistake still runs and still reports.
"""

from __future__ import annotations

import logging

import argus
from conftest import spilled_events


def quiet_reporter(fake, **kwargs):
    kwargs.setdefault("heartbeat", False)
    kwargs.setdefault("stop_polling", False)
    kwargs.setdefault("resource_snapshot", False)
    return argus.Reporter(monitor_url=fake.url, **kwargs)


def argus_warnings(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.name == "argus" and r.levelno >= logging.WARNING]


def test_job_calls_after_the_job_ended_warn_once_and_send_nothing(fake, caplog, spill_dir, monkeypatch):
    monkeypatch.setattr(argus, "_logged_once", set())
    with quiet_reporter(fake) as r:
        with r.job("early") as job:
            job.epoch(0, train_loss=1.0)
        job.epoch(1, train_loss=0.5)  # after job_done: refused
        job.log("late line")
        job.upload(spill_dir)  # a directory: refused before it is even looked at
        job.metrics({"MSE": 1.0})
        with r.job("next") as nxt:  # the run goes on
            nxt.epoch(0, train_loss=0.1)
    messages = [m for m in argus_warnings(caplog) if "after its `with` block ended" in m]
    assert len(messages) == 1 and "'early'" in messages[0] and "job.epoch()" in messages[0]
    early = [e for e in fake.events.values() if e.get("job_id") == "early"]
    assert sorted(e["event_type"] for e in early) == ["job_done", "job_epoch", "job_start"]
    assert [e["data"]["epoch"] for e in early if e["event_type"] == "job_epoch"] == [0]
    assert len(fake.of_type("job_epoch")) == 2 and fake.of_type("batch_done")
    assert spilled_events(spill_dir) == []


def test_a_later_job_at_a_reused_address_is_still_told_once(fake, caplog, spill_dir, monkeypatch):
    """The once-only lines are said once per object. Keyed by id(), a job made later at
    the address of an ended one (CPython reuses freed memory at once) was never told that
    its late call was not sent. Here every object seems to have one address (id() is
    replaced in argus), as two objects at the same address would."""
    monkeypatch.setattr(argus, "_logged_once", set())
    monkeypatch.setattr(argus, "id", lambda obj: 4096, raising=False)
    with quiet_reporter(fake) as r:
        with r.job("first") as job:
            job.epoch(0, train_loss=1.0)
        job.epoch(1, train_loss=0.5)  # said: the first job has ended
        with r.job("later") as later:
            later.epoch(0, train_loss=1.0)
        later.epoch(1, train_loss=0.5)  # said too: another job
        later.epoch(2, train_loss=0.5)  # (once)
    messages = [m for m in argus_warnings(caplog) if "after its `with` block ended" in m]
    assert len(messages) == 2 and "'first'" in messages[0] and "'later'" in messages[1], messages


def test_calls_after_the_reporter_closed_warn_once_and_are_not_saved(fake, caplog, spill_dir, monkeypatch):
    monkeypatch.setattr(argus, "_logged_once", set())
    with quiet_reporter(fake) as r:
        pass
    r.emit("log_line", job_id="late", line="x")
    r.emit("resource_snapshot", cpu_util_pct=1.0)
    assert r.flush() is True
    messages = [m for m in argus_warnings(caplog) if "was closed is not sent" in m]
    assert len(messages) == 1 and r.batch_id in messages[0]
    assert not [m for m in argus_warnings(caplog) if "could not be delivered" in m]
    assert spilled_events(spill_dir) == []  # a later `argus sync` cannot put it in the finished batch
    assert {e["event_type"] for e in fake.events.values()} == {"batch_start", "batch_done"}
    with quiet_reporter(fake) as r2:  # a new Reporter works as before
        r2.emit("resource_snapshot", cpu_util_pct=2.0)
    assert len(fake.of_type("resource_snapshot")) == 1


def test_a_repeated_job_id_is_recorded_under_a_new_id_with_a_warning(fake, caplog):
    with quiet_reporter(fake) as r:
        with r.job("train") as first:
            first.epoch(0, train_loss=1.0)
        with r.job("train") as second:
            second.epoch(0, train_loss=2.0)
        with r.job("train") as third:
            third.epoch(0, train_loss=3.0)
    assert (first.job_id, second.job_id, third.job_id) == ("train", "train-2", "train-3")
    messages = [m for m in argus_warnings(caplog) if "was already used" in m]
    assert len(messages) == 2 and "'train-2'" in messages[0]
    epochs = {e["job_id"]: e["data"]["train_loss"] for e in fake.of_type("job_epoch")}
    assert epochs == {"train": 1.0, "train-2": 2.0, "train-3": 3.0}  # three rows, not one merged
    assert fake.of_type("batch_done")[0]["data"]["n_done"] == 3


def test_a_job_id_with_a_slash_warns_and_skips_uploads(fake, caplog, tmp_path, monkeypatch):
    monkeypatch.setattr(argus, "_logged_once", set())
    plot = tmp_path / "loss.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n")
    with quiet_reporter(fake) as r:
        with r.job("etth1/dlinear") as job:
            job.epoch(0, train_loss=1.0)
            assert job.upload(plot) == 0
    warnings = argus_warnings(caplog)
    assert len([m for m in warnings if "contains '/'" in m and "its uploads are skipped" in m]) == 1
    assert any("upload of" in m and "skipped" in m for m in warnings)
    assert [e["job_id"] for e in fake.of_type("job_epoch")] == ["etth1/dlinear"]
    assert fake.of_type("job_done") and not fake.artifacts


def test_a_url_without_a_scheme_gets_one_line_and_the_run_goes_on(caplog, monkeypatch):
    monkeypatch.setattr(argus, "_logged_once", set())  # "once per process": start afresh
    with argus.Reporter(monitor_url="argus.example.org:8000", heartbeat=False) as r:
        with r.job("j") as job:
            job.epoch(0, train_loss=1.0)
        ran_to_the_end = True
    lines = argus_warnings(caplog)
    assert len(lines) == 1, lines
    assert "has no scheme" in lines[0] and "http://host:port" in lines[0]
    assert ran_to_the_end


def test_a_wrong_callback_keyword_names_the_callback_not_an_internal_helper():
    """The Lightning and Keras callbacks share one constructor; a misspelt keyword's
    TypeError named `_callback_init.<locals>._ArgusCallbackInit.__init__()`."""
    import sys

    import pytest

    class Base:
        def _reset_epoch_state(self):
            pass

    class ArgusCallback(argus._callback_init("keras", ("loss",), ("val_loss",)), Base):
        pass

    with pytest.raises(TypeError) as info:
        ArgusCallback(project="p", job_id="j", val_loss_key="v")
    assert "_callback_init" not in str(info.value) and "val_loss_key" in str(info.value)
    if sys.version_info >= (3, 10):  # older versions name the function only
        assert str(info.value).startswith("ArgusCallback.__init__()")


def test_emit_with_a_batch_id_field_sends_into_the_open_batch_and_says_so_once(fake, caplog, spill_dir, monkeypatch):
    """Reporter.emit and argus.emit pass batch_id themselves: a field of that name raised
    TypeError ("multiple values for keyword argument") into the training loop."""
    monkeypatch.setattr(argus, "_logged_once", set())
    with quiet_reporter(fake, batch_id="open-1") as r:
        r.emit("resource_snapshot", batch_id="other", gpu=1)
        r.emit("resource_snapshot", batch_id="other", gpu=2)
        argus.emit("resource_snapshot", batch_id="other", gpu=3)
    snapshots = fake.of_type("resource_snapshot")
    assert [(e["batch_id"], e["data"]["gpu"]) for e in snapshots] == [("open-1", 1), ("open-1", 2), ("open-1", 3)]
    said = [m for m in argus_warnings(caplog) if "batch_id=... argument is left out" in m]
    assert len(said) == 2 and "Reporter.emit" in said[0] and "argus.emit" in said[1]
