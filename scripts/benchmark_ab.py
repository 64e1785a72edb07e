#!/usr/bin/env python
"""Speed of two versions of nca-trl side by side, in one run on one machine: `scripts/benchmark.py` with the same
arguments at a BEFORE version and an AFTER version (default: this checkout as it is), back to back, `--rounds` times
alternating (before, after, before, after, ...), so that the machine's drift shows as a difference between the rounds
of one version rather than hiding in the comparison.

Each version runs its own `scripts/benchmark.py` with its own `nca_trl` first on the path (PYTHONPATH), in this
interpreter (the same torch, transformers and trl). A commit is checked out as a detached git worktree in a temporary
folder, removed at the end; a folder is taken as it is.

Written to `--json`: the command, each run's full benchmark JSON, and per workload and system the median over rounds
of `tokens_per_second_median` for each version with `after / before`, and the same for the layout ratios
(`ratios_median`, e.g. `d/c`). Exit 1 if any benchmark run failed (what finished is still written).

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


def check_version(version: str) -> tuple[str, str]:
    """`("folder", absolute path)` for an existing folder holding scripts/benchmark.py, `("commit", sha)` for a commit of
    this repository; a ValueError naming what is wrong otherwise. Nothing is written."""
    folder = Path(version)
    if folder.is_dir():
        if not (folder / "scripts" / "benchmark.py").is_file():
            raise ValueError(f"{version}: a folder without scripts/benchmark.py")
        return "folder", str(folder.resolve())
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{version}^{{commit}}"],
                         capture_output=True, text=True)
    if sha.returncode != 0:
        raise ValueError(f"{version}: neither a folder nor a commit of {REPO}")
    return "commit", sha.stdout.strip()


def run_benchmark(folder: Path, args: list[str], out: Path, log: Path) -> dict | None:
    """One `scripts/benchmark.py ARGS --json OUT` run of the version in `folder`; its JSON, or None if it failed."""
    path = [str(folder), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    with open(log, "w") as handle:
        proc = subprocess.run([sys.executable, "scripts/benchmark.py", *args, "--json", str(out)], cwd=folder,
                              env=env, stdout=handle, stderr=subprocess.STDOUT)
    return json.loads(out.read_text()) if proc.returncode == 0 and out.is_file() else None


def compare(before: list[dict], after: list[dict]) -> dict:
    """Per workload: each system's median (over runs) tokens/s on median steps for both versions with after / before,
    and the same for each median-step layout ratio."""
    def median_of(runs, workload, pick):
        values = [pick(run["workloads"][workload]) for run in runs if workload in run["workloads"]]
        return statistics.median(values) if values else None

    def entry(b, a):
        return {"before": b, "after": a, "after_over_before": a / b if a is not None and b else None}

    out = {}
    for workload in before[0]["workloads"] if before else []:
        systems = before[0]["workloads"][workload]["systems"]
        ratios = before[0]["workloads"][workload].get("ratios_median", {})
        out[workload] = {
            "tokens_per_second_median": {key: entry(
                median_of(before, workload, lambda w, k=key: w["systems"][k]["tokens_per_second_median"]),
                median_of(after, workload, lambda w, k=key: w["systems"][k]["tokens_per_second_median"]),
            ) for key in systems},
            "ratios_median": {name: entry(median_of(before, workload, lambda w, n=name: w["ratios_median"][n]),
                                          median_of(after, workload, lambda w, n=name: w["ratios_median"][n]))
                              for name in ratios},
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
    work = Path(tempfile.mkdtemp(prefix="nca-ab-"))
    worktrees = []
    try:
        versions, folders = {}, {}
        for name, (kind, where) in checked.items():
            folders[name] = Path(where) if kind == "folder" else work / name
            if kind == "commit":  # a detached worktree of the commit, removed at the end
                subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(folders[name]),
                                where], check=True)
                worktrees.append(folders[name])
            versions[name] = {"version": f"{kind} {where}", "runs": [], "failed": []}
        for round_ in range(args.rounds):
            for name, version in versions.items():
                print(f"[round {round_ + 1}/{args.rounds}] {name}: {version['version']}", flush=True)
                log = work / f"{name}-{round_}.log"
                result = run_benchmark(folders[name], bench_args, work / f"{name}-{round_}.json", log)
                if result is None:
                    version["failed"].append({"round": round_, "log_tail": log.read_text()[-3000:]})
                    print(f"  failed: the end of its log:\n{log.read_text()[-3000:]}", flush=True)
                else:
                    version["runs"].append(result)
        report = {"command": " ".join(["python", "scripts/benchmark_ab.py", *(argv if argv is not None else
                                                                              sys.argv[1:])]),
                  **versions, "comparison": compare(versions["before"]["runs"], versions["after"]["runs"])}
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
