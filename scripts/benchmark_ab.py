#!/usr/bin/env python
"""Speed of two versions of nca-trl side by side, in one run on one machine: `scripts/benchmark.py` with the same
arguments at a BEFORE version and an AFTER version (default: this checkout as it is), back to back, `--rounds` times
alternating (before, after, before, after, ...), so that the machine's drift shows as a difference between the rounds
of one version rather than hiding in the comparison.

Each version runs its own `scripts/benchmark.py` with its own `nca_trl` first on the path (PYTHONPATH), in this
interpreter (the same torch, transformers and trl). A commit is checked out as a detached git worktree in a temporary
folder, removed at the end; a folder is taken as it is.

Written to `--json` after every run (`"complete": false` until the end): the command, each run's full benchmark
JSON, and at the end, per workload and system, the median over rounds of the tokens per second on median steps for
each version with `after / before`, and the same for the layout ratios (e.g. `d/c`). A benchmark.py from before
`tokens_per_second_median` is compared on the same quantity, from its step times. Exit 1 if any benchmark run failed
(what finished is still written).

Usage:
    python scripts/benchmark_ab.py --before 37e3b60 --json results/ab.json -- --systems c,d --steps 3 --warmup 1
    python scripts/benchmark_ab.py --before v0.1.0 --after main --rounds 2 -- --size tiny --steps 1 --warmup 0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def check_version(version: str) -> tuple[str, str, str]:
    """`("folder", absolute path, description)` for an existing folder holding scripts/benchmark.py (the description
    adds its git commit, and whether it has uncommitted changes, where it is a checkout), `("commit", sha, description)`
    for a commit of this repository; a ValueError naming what is wrong otherwise. Nothing is written."""
    folder = Path(version)
    if folder.is_dir():
        if not (folder / "scripts" / "benchmark.py").is_file():
            raise ValueError(f"{version}: a folder without scripts/benchmark.py")
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        at = "" if head.returncode else f" (git {head.stdout.strip()}{', with uncommitted changes' if dirty else ''})"
        return "folder", str(folder.resolve()), f"folder {folder.resolve()}{at}"
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{version}^{{commit}}"],
                         capture_output=True, text=True)
    if sha.returncode != 0:
        raise ValueError(f"{version}: neither a folder nor a commit of {REPO}")
    return "commit", sha.stdout.strip(), f"commit {sha.stdout.strip()}"


def run_benchmark(folder: Path, args: list[str], out: Path, log: Path) -> dict | None:
    """One `scripts/benchmark.py ARGS --json OUT` run of the version in `folder`; its JSON, or None if it failed."""
    path = [str(folder), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    with open(log, "w") as handle:
        proc = subprocess.run([sys.executable, "scripts/benchmark.py", *args, "--json", str(out)], cwd=folder,
                              env=env, stdout=handle, stderr=subprocess.STDOUT)
    return json.loads(out.read_text()) if proc.returncode == 0 and out.is_file() else None


def median_step_tps(system: dict) -> float:
    """Tokens per second on the median step: `tokens_per_second_median`, or, from a benchmark.py older than that key,
    the same quantity from the keys it has (plain-layout tokens per step over the median step time)."""
    if "tokens_per_second_median" in system:
        return system["tokens_per_second_median"]
    return system["plain_tokens_per_step"] / system["step_seconds_median"]


def compare(before: list[dict], after: list[dict]) -> dict:
    """Per workload: each system's median (over runs) tokens/s on median steps for both versions with after / before,
    and the same for each layout ratio (`ratios`' names, e.g. `d/c`) on median steps."""
    def median_of(runs, workload, pick):
        values = [pick(run["workloads"][workload]) for run in runs if workload in run["workloads"]]
        return statistics.median(values) if values else None

    def ratio(workload, name):
        x, y = name.split("/")
        return median_step_tps(workload["systems"][x]) / median_step_tps(workload["systems"][y])

    def entry(b, a):
        return {"before": b, "after": a, "after_over_before": a / b if a is not None and b else None}

    out = {}
    for workload, first in (before or after or [{"workloads": {}}])[0]["workloads"].items():
        out[workload] = {
            "tokens_per_second_median": {key: entry(
                median_of(before, workload, lambda w, k=key: median_step_tps(w["systems"][k])),
                median_of(after, workload, lambda w, k=key: median_step_tps(w["systems"][k])),
            ) for key in first["systems"]},
            "ratios_median": {name: entry(median_of(before, workload, lambda w, n=name: ratio(w, n)),
                                          median_of(after, workload, lambda w, n=name: ratio(w, n)))
                              for name in first.get("ratios", {})},
        }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="a commit (or a folder holding scripts/benchmark.py)")
    parser.add_argument("--after", default=str(REPO), help="a commit or a folder (default: this checkout as it is)")
    parser.add_argument("--rounds", type=int, default=1, help="before/after pairs, alternating (default 1)")
    parser.add_argument("--json", required=True, help="write the comparison here")
    parser.add_argument("benchmark_args", nargs=argparse.REMAINDER, help="after `--`: scripts/benchmark.py's arguments")
    args = parser.parse_args(argv)
    bench_args = args.benchmark_args[1:] if args.benchmark_args[:1] == ["--"] else args.benchmark_args
    if "--json" in bench_args:
        parser.error("--json after `--`: this script writes each run's JSON itself")
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    out = Path(args.json)
    if not out.parent.is_dir():
        parser.error(f"--json {args.json}: no such folder {out.parent}")
    checked = {}
    for name in ("before", "after"):
        try:
            checked[name] = check_version(getattr(args, name))
        except ValueError as error:
            parser.error(f"--{name} {error}")
    command = " ".join(["python", "scripts/benchmark_ab.py", *(argv if argv is not None else sys.argv[1:])])
    work = Path(tempfile.mkdtemp(prefix="nca-ab-"))
    worktrees = []
    try:
        versions, folders = {}, {}
        report = {"command": command, "complete": False}
        for name, (kind, where, description) in checked.items():
            folders[name] = Path(where) if kind == "folder" else work / name
            if kind == "commit":  # a detached worktree of the commit, removed at the end
                subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(folders[name]),
                                where], check=True)
                worktrees.append(folders[name])
            versions[name] = {"version": description, "runs": [], "failed": []}
        for round_ in range(args.rounds):
            for name, version in versions.items():
                print(f"[round {round_ + 1}/{args.rounds}] {name}: {version['version']}", flush=True)
                log = work / f"{name}-{round_}.log"
                result = run_benchmark(folders[name], bench_args, work / f"{name}-{round_}.json", log)
                if result is None:
                    tail = log.read_text()[-3000:]
                    version["failed"].append({"round": round_, "log_tail": tail})
                    print(f"  failed: the end of its log:\n{tail}", flush=True)
                else:
                    version["runs"].append(result)
                # Every finished run is in --json as soon as it ends: a later failure or a kill loses none
                out.write_text(json.dumps({**report, **versions}, indent=1) + "\n")
        report.update(versions, complete=True,
                      comparison=compare(versions["before"]["runs"], versions["after"]["runs"]))
        out.write_text(json.dumps(report, indent=1) + "\n")
        for workload, numbers in report["comparison"].items():
            for kind, rows in numbers.items():
                for key, row in rows.items():
                    ratio = row["after_over_before"]
                    print(f"{workload} {kind} {key}: before {row['before']:.4g}, after {row['after']:.4g}, "
                          f"after/before {ratio:.3f}" if ratio is not None else f"{workload} {kind} {key}: {row}")
        print(f"Wrote {out}")
        return 1 if any(v["failed"] for v in versions.values()) else 0
    finally:
        for folder in worktrees:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder)],
                           capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
