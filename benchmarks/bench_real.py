"""Issue 11's scenarios against a stand-in with the real Argus server's delivery behaviour.

The stand-in (tests/standin.py) commits one event at a time (7 ms each, one writer),
finishes requests whose client gave up, and rate-limits per token (60 requests, then
10/s). This script runs real client processes against it, ours (this checkout's argus.py)
and, with ``--upstream-python``, the upstream argus-reporter from its own interpreter, and
prints the figures next to issue 11's targets. It asserts nothing.

    python benchmarks/bench_real.py --upstream-python /work/upstream-venv/bin/python
    python benchmarks/bench_real.py --quick                  # small sizes, about a minute
    python benchmarks/bench_real.py --procs 200 --scenarios s2 --json s2-200.json

S1  one client, 3,000 epochs emitted evenly over 10 s, 7 ms per event on the server.
S2  N processes (default 50) sharing one token, each 200 epochs at 20/s, with the rate
    limit and no per-event cost (at 7 ms an event the server could store 1,400 of the
    10,000 events in a 10 s run, so no client could reach the in-run target; the rate
    limit is what S2 is about).

Every client process gets its own HOME and ARGUS_SPILL_DIR, ARGUS_URL and ARGUS_TOKEN,
heartbeat, stop polling and resource snapshots off. After the run (our client only),
``argus.py sync`` runs once per spill directory that holds events. The server runs in a
thread of this process; it sleeps rather than computes, so it does not compete with the
clients for the two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))  # standin.py only; this process never imports argus

import standin  # noqa: E402

TARGETS = {
    "s1_lost": "0",
    "s1_twice": "<= 5 %",
    "s1_gave_up": "0",
    "s2_in_run": ">= 80 %",
    "s2_429": "<= 30 %",
    "s2_median": ">= 50",
    "s2_after_sync": "0",
}


def _fmt(value, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        value = ("%.1f" % value) if abs(value) < 1000 else ("%.0f" % value)
    return "%s%s" % (value, unit)


def s1_rows(f: dict) -> list:
    """(label, value, target key) rows of the one-slow-client scenario."""
    if f is None:
        return []
    run = f["run"]
    srv = f["server_after_run"]
    sync = f.get("sync") or {}
    after = sync.get("after")
    total = f["server_total"]
    sizes = srv["events_per_accepted_request"]
    rows = [
        ("emitted epochs", _fmt(run["emitted"]), None),
        ("delivered during the run (before exit)", "%s (%s)" % (run["stored_in_run"], _fmt(run["delivered_in_run_pct"], " %")), None),
        ("  of which by the end of emitting", _fmt(run["stored_by_emit_end"]), None),
        ("stored after the process ended", _fmt(run["stored_late"]), None),
        ("spilled at exit (on disk)", _fmt(run["spilled"]), None),
        ("  of which the server had stored", _fmt(run["spilled_and_stored"]), None),
        ("lost (not stored, not on disk)", _fmt(run["lost"]), "s1_lost"),
        ("events processed twice", "%s (%s)" % (total["processed_twice"], _fmt(total["processed_twice_pct"], " %")), "s1_twice"),
        ("requests given up while the server worked", _fmt(srv["gave_up_ingest"]), "s1_gave_up"),
        ("  client waited before giving up (median)", _fmt(srv["gave_up_after_s"]["median"], " s"), None),
        ("  server work done for nobody", _fmt(srv["worked_after_gave_up_s"], " s"), None),
        ("exit: end of emitting -> last exit handler", _fmt(f["exit_s"]["median"], " s"), None),
        ("requests (ingest) / answered 429", "%s / %s" % (srv["ingest_requests"], srv["rate_limited"]), None),
        ("events per accepted request: median / max", "%s / %s" % (_fmt(sizes["median"]), _fmt(sizes["max"])), None),
    ]
    if after is not None:
        rows += [
            ("one `argus sync`: runs, seconds", "%s, %s s" % (sync["runs"], sync["seconds"]), None),
            ("  missing on the server after it", _fmt(after["missing_on_server"]), None),
            ("  requests given up during sync", _fmt(sync["server"]["gave_up_ingest"]), None),
        ]
    else:
        rows += [("one `argus sync` (ours only)", "n/a", None), ("  missing on the server after it", "n/a", None),
                 ("  requests given up during sync", "n/a", None)]
    return rows


def s2_rows(f: dict) -> list:
    if f is None:
        return []
    run = f["run"]
    srv = f["server_run"]
    sync = f.get("sync") or {}
    after = sync.get("after")
    sizes = srv["events_per_accepted_request"]
    rows = [
        ("processes x epochs", "%s x %s" % (f["procs"], f["epochs_each"]), None),
        ("emitted epochs (clients failed)", "%s (%s)" % (run["emitted"], run["clients_failed"]), None),
        ("delivered during the run", "%s (%s)" % (run["stored_in_run"], _fmt(run["delivered_in_run_pct"], " %")), "s2_in_run"),
        ("requests answered 429", "%s of %s (%s)" % (srv["rate_limited"], srv["requests"], _fmt(srv["rate_limited_pct"], " %")), "s2_429"),
        ("median events per accepted ingest request", _fmt(sizes["median"]), "s2_median"),
        ("  accepted under 50: first / before a 429 / after / exit", _small_requests(f), None),
        ("requests used: sent / accepted / ceiling", "%s / %s / %s" % (
            srv["requests"], srv["ingest_accepted"] + srv["daemon_accepted"], f["request_ceiling"]), None),
        ("  run length (start -> last exit)", _fmt(f["run_length_s"], " s"), None),
        ("spilled at exit (on disk)", _fmt(run["spilled"]), None),
        ("lost before any sync", _fmt(run["lost"]), None),
        ("exit: end of emitting -> last exit handler (median/max)",
         "%s / %s" % (_fmt(f["exit_s"]["median"], " s"), _fmt(f["exit_s"]["max"], " s")), None),
        ("requests given up while the server worked", _fmt(f["server_after_run"]["gave_up_ingest"]), None),
    ]
    if after is not None:
        rows += [
            ("one `argus sync` per spill dir: runs, seconds", "%s, %s s" % (sync["runs"], sync["seconds"]), None),
            ("  missing on the server after it", _fmt(after["missing_on_server"]), "s2_after_sync"),
            ("  lost (nowhere) after it", _fmt(after["lost"]), None),
            ("  429s during sync", _fmt(sync["server"]["rate_limited"]), None),
        ]
    else:
        rows += [("one `argus sync` per spill dir (ours only)", "n/a", None),
                 ("  missing on the server after it", "n/a", "s2_after_sync"), ("  lost (nowhere) after it", "n/a", None),
                 ("  429s during sync", "n/a", None)]
    rows.append(("events processed twice", _fmt(f["server_total"]["processed_twice"]), None))
    return rows


def _small_requests(f: dict) -> str:
    """How many accepted ingest requests carried under 50 events, by when each client sent
    them: its first request, others before its first 429, after it, or from its exit on."""
    log, clients = f.get("request_log"), f.get("clients")
    if not log or not clients:
        return "n/a"
    counts = {"first": 0, "before": 0, "after": 0, "exit": 0}
    seen, limited = set(), set()
    for r in log:
        c = r["client"]
        if c is None or r["route"] not in ("events", "batch"):
            continue
        if r["status"] == 429:
            limited.add(c)
        elif r["status"] == 200:
            emit_end = clients[c]["t_emit_end"]
            if r["events"] < 50:
                kind = ("exit" if emit_end is not None and r["t"] >= emit_end else "first" if c not in seen
                        else "after" if c in limited else "before")
                counts[kind] += 1
            seen.add(c)
    return "%(first)d / %(before)d / %(after)d / %(exit)d" % counts


def print_table(title: str, ours: dict | None, upstream: dict | None, rows_of) -> None:
    ours_rows = rows_of(ours)
    up_rows = rows_of(upstream)
    labels = [r[0] for r in (ours_rows or up_rows)]
    if not labels:
        return
    ours_map = {r[0]: r for r in ours_rows}
    up_map = {r[0]: r for r in up_rows}
    width = max(len(label) for label in labels) + 2
    print("\n" + title)
    print("%-*s %-22s %-22s %s" % (width, "figure", "ours", "upstream 0.1.3", "target"))
    print("-" * (width + 60))
    for label in labels:
        row = ours_map.get(label) or up_map.get(label)
        target = TARGETS.get(row[2], "") if row[2] else ""
        print("%-*s %-22s %-22s %s" % (
            width, label,
            ours_map[label][1] if label in ours_map else "n/a",
            up_map[label][1] if label in up_map else "n/a",
            target,
        ))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream-python", help="interpreter with argus-reporter 0.1.3 installed (its own venv)")
    p.add_argument("--ours-python", default=sys.executable, help="interpreter for our client (default: this one)")
    p.add_argument("--repo", default=REPO, help="checkout whose argus.py is 'ours'")
    p.add_argument("--quick", action="store_true", help="S1 1,500 epochs over 5 s; S2 10 processes, limit 12 then 3/s")
    p.add_argument("--procs", type=int, default=None, help="S2 processes (default 50; issue 11 also asks for 200)")
    p.add_argument("--scenarios", default="s1,s2", help="comma-separated: s1, s2")
    p.add_argument("--clients", default=None, help="comma-separated: ours, upstream (default: both when possible)")
    p.add_argument("--event-ms", type=float, default=7.0, help="S1 per-event cost on the server")
    p.add_argument("--s2-event-ms", type=float, default=0.0, help="S2 per-event cost (default 0, see above)")
    p.add_argument("--bucket", type=float, default=None, help="rate-limit bucket (default 60; --quick: 12)")
    p.add_argument("--refill", type=float, default=None, help="rate-limit refill per s (default 10; --quick: 3)")
    p.add_argument("--locked-prob", type=float, default=0.0, help="chance of 500 'database is locked' per event when writers queue")
    p.add_argument("--wave", type=int, default=25, help="client processes started at a time")
    p.add_argument("--nice", type=int, default=10, help="CPU niceness of the clients (the server keeps priority)")
    p.add_argument("--no-sync", action="store_true", help="skip `argus sync` after the runs")
    p.add_argument("--keep-temp", action="store_true", help="keep every client's folder (HOME, spill, stderr)")
    p.add_argument("--json", help="write every figure (and S1's request log) to this file")
    args = p.parse_args(argv)

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    kinds = [k.strip() for k in (args.clients or "ours,upstream").split(",") if k.strip()]
    pythons = {"ours": args.ours_python, "upstream": args.upstream_python}
    if "upstream" in kinds and not args.upstream_python:
        print("(no --upstream-python: the upstream column is n/a)")
        kinds = [k for k in kinds if k != "upstream"]

    if args.quick:
        s1 = {"epochs": 1500, "seconds": 5.0}
        s2 = {"procs": args.procs or 10, "epochs": 200, "rate": 40.0,
              "bucket": args.bucket or 12, "refill": args.refill or 3.0}
    else:
        s1 = {"epochs": 3000, "seconds": 10.0}
        s2 = {"procs": args.procs or 50, "epochs": 200, "rate": 20.0,
              "bucket": args.bucket or 60, "refill": args.refill or 10.0}

    def log(msg):
        print("  [%s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)

    results = {"s1": {}, "s2": {}, "settings": {"s1": s1, "s2": s2, "event_ms": args.event_ms,
                                                 "s2_event_ms": args.s2_event_ms, "locked_prob": args.locked_prob}}
    for kind in kinds:
        python = pythons[kind]
        if not python or not os.path.exists(python):
            print("(%s: interpreter %r not found: n/a)" % (kind, python))
            continue
        if "s1" in scenarios:
            log("S1 %s: one client, %d epochs over %g s, %g ms per event" % (kind, s1["epochs"], s1["seconds"], args.event_ms))
            results["s1"][kind] = standin.scenario(
                kind, python, procs=1, epochs=s1["epochs"], rate=s1["epochs"] / s1["seconds"],
                event_cost_s=args.event_ms / 1000.0, bucket=args.bucket or 60, refill_per_s=args.refill or 10.0,
                locked_prob=args.locked_prob, sync=not args.no_sync, repo=args.repo, keep=args.keep_temp,
                nice=args.nice, token="em_live_standin_s1_" + kind, log=log,
            )
        if "s2" in scenarios:
            log("S2 %s: %d processes on one token, %d epochs at %g/s each, limit %g then %g/s"
                % (kind, s2["procs"], s2["epochs"], s2["rate"], s2["bucket"], s2["refill"]))
            results["s2"][kind] = standin.scenario(
                kind, python, procs=s2["procs"], epochs=s2["epochs"], rate=s2["rate"],
                event_cost_s=args.s2_event_ms / 1000.0, bucket=s2["bucket"], refill_per_s=s2["refill"],
                locked_prob=args.locked_prob, sync=not args.no_sync, repo=args.repo, keep=args.keep_temp,
                wave=args.wave, nice=args.nice, token="em_live_standin_s2_" + kind, log=log,
            )

    print("\nArgus stand-in: %g ms/event (S1), %g ms/event (S2), rate limit per token; CPUs: %s"
          % (args.event_ms, args.s2_event_ms, os.cpu_count()))
    if "s1" in scenarios:
        print_table("S1: one client, %d epochs over %g s against %g ms per event"
                    % (s1["epochs"], s1["seconds"], args.event_ms),
                    results["s1"].get("ours"), results["s1"].get("upstream"), s1_rows)
    if "s2" in scenarios:
        print_table("S2: %d processes sharing one token (limit %g, then %g/s), %d epochs each at %g/s"
                    % (s2["procs"], s2["bucket"], s2["refill"], s2["epochs"], s2["rate"]),
                    results["s2"].get("ours"), results["s2"].get("upstream"), s2_rows)
    for scen in scenarios:
        for kind, f in results[scen].items():
            lines = f["client_stderr"]
            if lines["lines"]:
                print("\n%s %s: %d stderr line(s) from the clients; distinct (digits as N):" % (scen.upper(), kind, lines["lines"]))
                for line in lines["distinct"]:
                    print("   " + line)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=str)
        print("\nfigures written to %s" % args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
