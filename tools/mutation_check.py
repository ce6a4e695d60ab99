#!/usr/bin/env python3
"""Does the test suite catch known ways of breaking argus.py?

Copies the repository to a temporary directory, then for each mutation below replaces one
exact string in the copy's argus.py, runs ``python -m pytest -q -x`` there (with a time
limit) and reports whether some test failed: "caught", or "NOT CAUGHT".

Tests that already fail on the unmutated copy cannot tell a mutation from the bug they were
written for, so a baseline run comes first and its failures are deselected (and listed). A
catch is confirmed by running the catching test again on the unmutated copy: a test that
fails there too is flaky here, is deselected, and the mutant runs again without it.

argus.py is being rewritten: edit MUTATIONS when it changes. A pattern that is no longer in
the file (or is there more than once) stops the script before anything runs, naming it;
``--skip-missing`` runs the others anyway.

    python tools/mutation_check.py                  # the working tree as it is
    python tools/mutation_check.py --rev HEAD~3     # the repository as committed then
    python tools/mutation_check.py --rev HEAD~3 --overlay tests/test_lifecycle.py
                                                    # ... with this file from the working tree
    python tools/mutation_check.py --only fsync     # mutations whose name contains "fsync"
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

# (name, exact text in argus.py, what it becomes). Keep each `old` unique in the file.
MUTATIONS = [
    (
        "1 close(): the events in flight when close() gives up are not saved"
        " (0.2.0: _spill_queue() instead of _spill_queue(leftovers))",
        "        inflight = self._inflight if self._inflight and not self._inflight_journaled else ()\n",
        "        inflight = ()  # mutation\n",
    ),
    (
        "2 _read_results(): an event missing from `results` counts as delivered",
        "        return retry + list(pending.items()), None  # absent from the results: not known to be stored\n",
        "        self.delivered += len(pending)  # mutation\n        return retry, None\n",
    ),
    (
        "3 _uninstall_sigterm() does nothing",
        "def _uninstall_sigterm() -> None:\n",
        "def _uninstall_sigterm() -> None:\n    return  # mutation\n",
    ),
    (
        "4a SpillStore.append(): no re-check of the spill cap against the directory",
        "                    self._total = self._dir_bytes()  # others may have replayed meanwhile\n",
        "                    pass  # mutation: the cap is never re-checked\n",
    ),
    (
        "4b SpillStore.claim_next(): no inode check after taking the lock",
        "                if not _lock_nb(fd) or os.fstat(fd).st_ino != os.stat(path).st_ino:\n",
        "                if not _lock_nb(fd):  # mutation\n",
    ),
    (
        "4c SpillStore.rotate(): no fsync before the rename",
        "                os.fsync(fd)  # the file is complete on disk before anyone may claim it\n",
        "                pass  # mutation\n",
    ),
]

ROOT = Path(__file__).resolve().parent.parent
IGNORED = shutil.ignore_patterns(
    ".git", "__pycache__", "*.pyc", ".pytest_cache", ".tox", ".venv", "venv", "*.egg-info", "build", "dist"
)


def run_pytest(workdir: Path, args: list, timeout: float) -> tuple:
    """(returncode or None on timeout, output, seconds)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARGUS_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONPATH"] = str(workdir)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            # the multi-process scenarios take minutes and test pacing, not these mutations
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not scenario"] + args,
            cwd=str(workdir),
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return None, out, time.monotonic() - started
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


def failed_ids(junit: Path, workdir: Path) -> list:
    """Node ids of the tests that failed or errored, from a junit XML report."""
    failed = []
    for case in ET.parse(str(junit)).getroot().iter("testcase"):
        if case.find("failure") is None and case.find("error") is None:
            continue
        parts = case.get("classname", "").split(".")
        # classname is the module path (plus a class name, if any): find where the file ends
        for cut in range(len(parts), 0, -1):
            path = Path(*parts[:cut]).with_suffix(".py")
            if (workdir / path).is_file():
                failed.append("::".join([path.as_posix()] + parts[cut:] + [case.get("name")]))
                break
    return failed


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line[:200]
    match = re.search(r"^(E .*)$", output, re.M)
    return match.group(1)[:200] if match else output.strip().splitlines()[-1][:200] if output.strip() else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", help="copy the repository as of this git revision instead of the working tree")
    parser.add_argument("--overlay", action="append", default=[], metavar="PATH",
                        help="with --rev: take this file from the working tree (repeatable)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run (default 900)")
    parser.add_argument("--only", help="run only the mutations whose name contains this text")
    parser.add_argument("--skip-missing", action="store_true", help="run the mutations whose pattern is found")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline run (nothing deselected)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    parser.add_argument("tests", nargs="*", default=["tests"], help="what pytest runs (default: tests)")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="argus-mutation-"))
    try:
        if args.rev:
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.rev], capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(workdir)], input=archive.stdout, check=True)
            for path in args.overlay:
                (workdir / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(str(ROOT / path), str(workdir / path))
        else:
            shutil.copytree(str(ROOT), str(workdir), ignore=IGNORED, dirs_exist_ok=True)
        target = workdir / "argus.py"
        original = target.read_text()
        print("repository: %s%s (argus.py %d lines); tests: %s; copy in %s" % (
            "git %s" % args.rev if args.rev else "working tree",
            "".join(" + %s" % p for p in args.overlay), original.count("\n"), " ".join(args.tests), workdir))

        chosen = [m for m in MUTATIONS if not args.only or args.only in m[0]]
        problems = []
        for name, old, _new in chosen:
            count = original.count(old)
            if count != 1:
                problems.append((name, count, old))
        for name, count, old in problems:
            print("PATTERN %s: %s\n    %s" % ("NOT FOUND" if count == 0 else "FOUND %d TIMES" % count, name,
                                             old.strip().splitlines()[0]), file=sys.stderr)
        if problems and not args.skip_missing:
            print("mutation_check: %d pattern(s) do not match argus.py; update MUTATIONS in %s"
                  % (len(problems), Path(__file__).name), file=sys.stderr)
            return 2
        chosen = [m for m in chosen if m[0] not in {p[0] for p in problems}]

        deselect = []
        if not args.no_baseline:
            junit = workdir / "baseline.xml"
            rc, out, seconds = run_pytest(workdir, ["--junitxml", str(junit)] + args.tests, args.timeout)
            if rc is None:
                print("baseline: timed out after %.0f s; every mutation run would too" % seconds, file=sys.stderr)
                return 2
            deselect = failed_ids(junit, workdir) if junit.exists() else []
            print("baseline: %s in %.0f s" % (out.strip().splitlines()[-1] if out.strip() else "rc=%s" % rc, seconds))
            for node in deselect:
                print("  deselected (fails without any mutation): %s" % node)

        results = []
        flaky = []  # tests seen failing on the unmutated copy too: they cannot tell
        for name, old, new in chosen:
            seconds = 0.0
            for _attempt in range(4):
                target.write_text(original.replace(old, new, 1))
                junit = workdir / "mutant.xml"
                if junit.exists():
                    junit.unlink()
                skip = deselect + flaky
                pytest_args = ["-x", "--junitxml", str(junit)] + [a for n in skip for a in ("--deselect", n)]
                rc, out, took = run_pytest(workdir, pytest_args + args.tests, args.timeout)
                seconds += took
                target.write_text(original)
                if rc is None:
                    verdict, why = "caught (timed out)", "no result within %.0f s" % args.timeout
                    break
                if rc == 0 or rc == 5:
                    verdict, why = "NOT CAUGHT", out.strip().splitlines()[-1] if out.strip() else ""
                    break
                verdict, why = "caught", first_failure(out)
                catchers = failed_ids(junit, workdir) if junit.exists() else []
                if not catchers:
                    break  # a collection error or a crash: the mutation broke the module
                # Confirm the catch: the same test must pass on the unmutated copy.
                rc2, _out2, took2 = run_pytest(workdir, catchers, args.timeout)
                seconds += took2
                if rc2 == 0:
                    break
                flaky.extend(catchers)
                print("  (%s also fails without the mutation: flaky here; run again without it)"
                      % ", ".join(catchers), flush=True)
            results.append((name, verdict, why, seconds))
            print("%-12s %5.0fs  %s\n               %s" % (verdict, seconds, name, why), flush=True)

        print("\nsummary:")
        for name, verdict, _why, seconds in results:
            print("  %-20s %4.0fs  %s" % (verdict, seconds, name))
        missed = [r for r in results if r[1] == "NOT CAUGHT"]
        if problems:
            print("  %d mutation(s) not run: pattern not found" % len(problems))
        for node in flaky:
            print("  flaky (failed once without any mutation, then deselected): %s" % node)
        return 1 if missed or problems else 0
    finally:
        if args.keep:
            print("kept: %s" % workdir)
        else:
            shutil.rmtree(str(workdir), ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
