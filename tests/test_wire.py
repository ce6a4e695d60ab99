"""The wire details the real Argus server reads (issue 11): failure causes in `data.error`,
uploads refused for the token kept for `argus sync`, the hint for the server's 500 on a job
id used in two batches, and heartbeats that carry a real sample."""

from __future__ import annotations

import json
import logging

import pytest

import argus
from conftest import serve_ingest


def quiet(url, **kwargs):
    return argus.Reporter(monitor_url=url, heartbeat=False, stop_polling=False, resource_snapshot=False, **kwargs)


def argus_lines(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.name == "argus"]


def test_failure_causes_travel_in_data_error_with_reason_beside_it(fake):
    def train():
        return 1 / 0

    with pytest.raises(ZeroDivisionError):
        with quiet(fake.url, batch_id="cause-1") as r:
            with r.job("j"):
                train()
    (job_failed,) = fake.of_type("job_failed")
    (batch_failed,) = fake.of_type("batch_failed")
    for event in (job_failed, batch_failed):
        assert event["data"]["error"] == "ZeroDivisionError: division by zero"  # what the server shows
        assert event["data"]["reason"] == event["data"]["error"]
    sender = argus.ExperimentReporter(fake.url, "p", batch_id="cause-2")
    sender.emit("job_failed", job_id="k", reason="killed by the OOM killer")
    sender.close()
    emitted = [e for e in fake.of_type("job_failed") if e["batch_id"] == "cause-2"]
    assert emitted[0]["data"]["error"] == "killed by the OOM killer"


def test_an_upload_refused_for_the_token_is_kept_and_sent_by_sync_once_the_token_works(
    httpserver, tmp_path, spill_dir, caplog, monkeypatch
):
    from werkzeug.wrappers import Response

    url = serve_ingest(httpserver)
    stored = []
    token_ok = {"now": False}

    def artifacts(request):
        if not token_ok["now"]:
            return Response(json.dumps({"detail": "Invalid or expired API token"}), 401)
        stored.append(request.files["file"].filename)
        return Response(json.dumps({"id": len(stored)}), 201)

    httpserver.expect_request("/api/jobs/train/artifacts", method="POST").respond_with_handler(artifacts)
    plot = tmp_path / "loss.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n")
    caplog.set_level(logging.WARNING, logger="argus")
    with quiet(url, batch_id="refused-1", token="em_live_wrong") as r:
        with r.job("train") as job:
            assert job.upload(plot) == 0
    assert any("refused (401" in m and "recorded for `python3 -m argus sync`" in m for m in argus_lines(caplog))
    (entry,) = [json.loads(x) for x in (spill_dir / "pending-uploads.jsonl").read_text().splitlines()]
    assert (entry["path"], entry["route"], entry["why"]) == (str(plot), "/api/jobs/train/artifacts", "refused (401)")
    assert "em_live_wrong" not in json.dumps(entry)  # a fingerprint, never the token
    token_ok["now"] = True
    assert argus.main(["sync", "--url", url, "--token", "em_live_wrong"]) == 0
    assert stored == ["loss.png"] and not (spill_dir / "pending-uploads.jsonl").exists()


def test_a_500_on_a_job_upload_names_the_servers_job_id_bug_once(httpserver, tmp_path, caplog, monkeypatch):
    from werkzeug.wrappers import Response

    monkeypatch.setattr(argus, "RETRY_BASE_S", 0.001)
    monkeypatch.setattr(argus, "_logged_once", set())
    url = serve_ingest(httpserver)
    httpserver.expect_request("/api/jobs/shared-id/artifacts", method="POST").respond_with_handler(
        lambda request: Response(json.dumps({"detail": "Internal Server Error"}), 500)
    )
    plot = tmp_path / "p.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n")
    caplog.set_level(logging.WARNING, logger="argus")
    with quiet(url, batch_id="bug-1") as r:
        with r.job("shared-id") as job:
            assert job.upload(plot) == 0
            assert job.upload(plot) == 0
    hints = [m for m in argus_lines(caplog) if "also exists in another batch" in m]
    assert len(hints) == 1  # once, however many uploads fail
    assert len([m for m in argus_lines(caplog) if m.startswith("argus: upload of %s failed: HTTP 500" % plot)]) == 2
