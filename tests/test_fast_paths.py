"""The worker's fast paths give the same result as the careful paths they stand in for.

- A line written by the data template (plain numbers under keys seen before) is, to the
  byte, the line the JSON encoder writes; any other value takes the encoder's path.
- The batch answer read without parsing acknowledges the events only when the server's
  results name each of them, in order, as accepted or deduplicated; anything else is
  parsed and read result by result.
- Event ids made in bulk are version 4 UUIDs, all different.
"""

from __future__ import annotations

import json
import re
import sys
import time
import uuid

import pytest

import argus

BIG = 10**300


def _facade():
    facade = argus.ExperimentReporter.__new__(argus.ExperimentReporter)
    facade._envelopes = {}
    facade._source_json = '{"project":"p%d","command":"python train.py --lr 1e-3"}'
    return facade


def _refuse(name):
    raise ValueError("not strict JSON: %s" % name)


def _without_id(line: str) -> str:
    return line[49:]


NUMBER_DATA = [
    {"epoch": 0, "train_loss": 0.5, "val_loss": 0.6, "lr": 1e-3},
    {"epoch": 7, "train_loss": 0.1 + 0.2, "val_loss": -0.0, "lr": 5e-324},
    {"epoch": 2**63, "train_loss": 1e300, "val_loss": 123456789.125, "lr": 1.0},
    {"epoch": -1, "train_loss": BIG, "val_loss": 2.5e-8, "lr": 0.0},
]
OTHER_DATA = [  # the same keys, values the template must not write
    {"epoch": True, "train_loss": 0.5, "val_loss": 0.6, "lr": 1e-3},
    {"epoch": 1, "train_loss": float("nan"), "val_loss": 0.6, "lr": 1e-3},
    {"epoch": 1, "train_loss": float("inf"), "val_loss": 0.6, "lr": 1e-3},
    {"epoch": 1, "train_loss": 1e308, "val_loss": 1e308, "lr": 1e-3},  # sums to inf: finite values
    {"epoch": 1, "train_loss": "0.5", "val_loss": 0.6, "lr": 1e-3},
    {"epoch": 1, "train_loss": None, "val_loss": 0.6, "lr": 1e-3},
    {"epoch": 1, "train_loss": [0.5], "val_loss": 0.6, "lr": 1e-3},
    {"epoch": 10**5000, "train_loss": 0.5, "val_loss": 0.6, "lr": 1e-3},  # too long for str()
    {"epoch": 10**5000, "train_loss": 0.5, "val_loss": 0.6, "lr": 1.5},  # int + float overflows
]


@pytest.mark.parametrize("keys", [
    ("epoch", "train_loss", "val_loss", "lr"),
    ("epoch", "100%", 'a "quoted" key', "k\u00e9y"),  # % and quotes in a key, non-ASCII
], ids=["plain", "odd-keys"])
def test_the_data_template_writes_what_the_json_encoder_writes(keys):
    facade = _facade()
    envelope_of = ("job_epoch", "batch-%s", "job-%d")  # % in the envelope must stay literal
    now = time.time()
    for data in NUMBER_DATA + OTHER_DATA + NUMBER_DATA:
        data = dict(zip(keys, data.values()))
        record = envelope_of + (now, data, 0)
        careful = facade._encode(record)[1]
        fast = facade._encode_batch([record])[0][1]
        assert _without_id(fast) == _without_id(careful), data
        event = json.loads(fast, parse_constant=_refuse)  # strict JSON, whatever the values
        assert event["event_type"] == "job_epoch" and event["batch_id"] == "batch-%s"
    # Plain numbers really went through a template (not the encoder every time).
    assert tuple(keys) in facade._envelopes[envelope_of][2]


def test_the_template_and_the_encoder_agree_on_random_numbers():
    import random

    rng = random.Random(7)
    facade = _facade()
    for _ in range(3000):
        data = {"epoch": rng.randrange(-10**20, 10**20), "x": rng.uniform(-1e6, 1e6),
                "y": rng.random() * 10 ** rng.randrange(-300, 300), "z": float(rng.randrange(10**6))}
        record = ("job_epoch", "b", "j", time.time(), data, 0)
        facade._encode(record)  # the first of these keys registers the template
        fast = facade._encode_batch([record])[0][1]
        assert json.loads(fast)["data"] == data
        assert _without_id(fast) == _without_id(facade._encode(record)[1])


@pytest.mark.parametrize("keys", [
    ("epoch", "train_loss", "val_loss", "lr"),
    ("epoch", "100%", 'a "quoted" key', "k\u00e9y"),
], ids=["plain", "odd-keys"])
def test_a_run_of_one_kind_of_event_is_written_as_the_json_encoder_writes_each(keys):
    """_encode_run (a batch of one type, batch, job and key set, in passes over the whole
    run): each line, timestamp included, is the careful path's, and any one event it must
    not write (in OTHER_DATA) sends the whole run to the per-event loop, which writes it
    as the encoder does."""
    facade = _facade()
    envelope_of = ("job_epoch", "batch-%s", "job-%d")
    start = time.time()
    numbers = [dict(zip(keys, data.values())) for data in NUMBER_DATA] * 10
    records = [envelope_of + (start + i * 0.0007, data, 0) for i, data in enumerate(numbers)]
    facade._encode(records[0])  # registers the template for these keys
    assert facade._encode_run(records) is not None  # the run path, not the loop
    lines = [line for _, line in facade._encode_batch(records)]
    assert [_without_id(line) for line in lines] == [_without_id(facade._encode(r)[1]) for r in records]
    ids = [json.loads(line)["event_id"] for line in lines]
    assert len(set(ids)) == len(ids) and all(uuid.UUID(i).version == 4 for i in ids)
    for odd in OTHER_DATA:
        mixed = list(records)
        mixed[17] = envelope_of + (start, dict(zip(keys, odd.values())), 0)
        assert facade._encode_run(mixed) is None, odd
        lines = [line for _, line in facade._encode_batch(mixed)]
        assert [_without_id(line) for line in lines] == [_without_id(facade._encode(r)[1]) for r in mixed]
        for line in lines:
            json.loads(line, parse_constant=_refuse)
    for other in (("job_epoch", "batch-%s", "job-2"), ("log_line", "batch-%s", "job-%d")):
        mixed = list(records)
        mixed[5] = other + records[5][3:]
        facade._encode(mixed[5])
        assert facade._encode_run(mixed) is None
        assert [json.loads(line)["job_id"] for _, line in facade._encode_batch(mixed)] == [
            r[2] for r in mixed]
    # One event with its keys in another order: its line holds the same data (JSON
    # objects have no order), in the template's order.
    mixed = list(records)
    mixed[3] = envelope_of + (start, dict(reversed(list(numbers[3].items()))), 0)
    assert [json.loads(line)["data"] for _, line in facade._encode_batch(mixed)] == [r[4] for r in mixed]
    # Another key set in the run, or one key more: the loop.
    for extra in ({"x": 1.0}, {}):
        mixed = list(records)
        data = dict(numbers[3], **extra)
        if not extra:
            data.pop(keys[1])
        mixed[9] = envelope_of + (start, data, 0)
        assert facade._encode_run(mixed) is None
        assert [json.loads(line)["data"] for _, line in facade._encode_batch(mixed)] == [r[4] for r in mixed]


def _answer(ids, statuses=None, compact=False, **extra):
    statuses = statuses or ["accepted"] * len(ids)
    body = {"accepted": statuses.count("accepted"), "rejected": statuses.count("rejected"),
            "results": [{"event_id": i, "status": s, "db_id": n, "error": None}
                        for n, (i, s) in enumerate(zip(ids, statuses))]}
    body.update(extra)
    return json.dumps(body, separators=(",", ":") if compact else None).encode()


def test_the_unparsed_answer_acknowledges_only_what_the_server_acknowledged():
    ids = [str(uuid.uuid4()) for _ in range(5)]
    pairs = [(i, "{}") for i in ids]
    assert argus._all_acked(_answer(ids), pairs)
    assert argus._all_acked(_answer(ids, compact=True), pairs)  # the real server's layout
    assert argus._all_acked(_answer(ids, ["accepted", "deduplicated"] * 2 + ["accepted"]), pairs)
    refused = [
        _answer(ids, ["accepted"] * 4 + ["rejected"]),  # one rejected
        _answer(ids[:4]),  # one missing
        _answer(ids[1:] + ids[:1]),  # out of order
        _answer(ids[:2] + ids[3:] + [ids[2]]),
        _answer(ids + [str(uuid.uuid4())]),  # one more than sent
        _answer(ids)[:-2],  # not a whole object
        b"<html>" + _answer(ids) + b"</html>",  # a page around it
        json.dumps({"events": [json.loads(argus_line(i)) for i in ids]}).encode(),  # our body, echoed
        _answer(ids).replace(b"accepted", b"queued"),
        b"\xff" + _answer(ids),
    ]
    for body in refused:
        assert not argus._all_acked(body, pairs), body[:80]


def argus_line(event_id: str) -> str:
    return json.dumps({"event_id": event_id, "schema_version": "1.1", "event_type": "job_epoch",
                       "data": {"status": "accepted"}}, separators=(",", ":"))


def test_a_result_with_another_key_order_is_read_by_parsing(monkeypatch):
    """The fast path says no; the careful one still counts every event delivered."""
    ids = [str(uuid.uuid4()) for _ in range(3)]
    pairs = [(i, "{}") for i in ids]
    body = json.dumps({"results": [{"status": "accepted", "event_id": i} for i in ids]}).encode()
    assert not argus._all_acked(body, pairs)
    sender = argus._Sender.__new__(argus._Sender)
    sender.delivered = 0
    assert sender._read_results(pairs, body, False) == ([], None)
    assert sender.delivered == 3


def test_event_ids_made_in_bulk_are_distinct_version_4_uuids():
    pattern = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
    del argus._ids[:]
    made = [argus._uuid4() for _ in range(3 * argus._ID_BULK + 5)]
    assert len(set(made)) == len(made)
    for event_id in made:
        assert pattern.match(event_id), event_id
        parsed = uuid.UUID(event_id)
        assert str(parsed) == event_id and parsed.version == 4
    # Every hex digit position takes many values: no column is copied from a fixed place.
    for column in range(36):
        if column in (8, 13, 14, 18, 23):
            continue
        assert len({event_id[column] for event_id in made}) >= 8 if column != 19 else 4, column


def test_a_batch_over_the_byte_cap_leaves_in_two_requests_and_loses_nothing(fake, spill_dir):
    """600 epochs of about 5 KB each: the first request is cut at MAX_BATCH_BYTES (under
    500 events), and what it left goes back to the queue and out, each event once."""
    extra = {"m%03d" % k: 0.123456789 + k for k in range(250)}
    with argus.Reporter(monitor_url=fake.url, heartbeat=False, stop_polling=False,
                        resource_snapshot=False, batch_id="cut-1") as r:
        with r.job("j") as job:
            for i in range(600):
                job.epoch(i, train_loss=0.5, **extra)
    stored = [e for e in fake.events.values() if e["event_type"] == "job_epoch"]
    assert sorted(e["data"]["epoch"] for e in stored) == list(range(600))
    assert fake.duplicates == 0
    sizes = [n for method, path, n in fake.requests if path == "/api/events/batch"]
    line = len(json.dumps(stored[0], separators=(",", ":")))  # about the size of each on the wire
    assert 0.9 * argus.MAX_BATCH_BYTES / line < max(sizes) < 1.1 * argus.MAX_BATCH_BYTES / line < 500, sizes
    print("emitted 600 / delivered %d / on disk 0 / lost 0; requests %s" % (len(stored), sizes))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
