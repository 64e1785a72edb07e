#!/usr/bin/env python
"""Time the README's quick start and its Python example as a user runs them, and record what they printed.

Runs, in a fresh temporary folder with the repo's `recipes/` and `data/` linked in, the quick start's two commands
(`nca-trl make-tiny-model outputs/tiny-mistral`, `nca-trl train --config recipes/tiny/nca.yaml`) and then the
README's Python example (the `python` block of "Use it like DPOTrainer", as written) as subprocesses, and writes to a
JSON file: the wall time of each, the training's own runtime and steps (from its `run_info.json`), the learning table
the training printed, the metric names it logged and its training log (loss, margins, ranking accuracy, log-probs of
the best completion every `logging_steps`), what the Python example printed, the CPU count, the load average
before and after (other work on the machine slows it), and the versions. With `--install` it first times the
README's install (`pip install torch==2.13.0`, `pip install -e ".[dev]"`) into a fresh virtual environment, apart
from the rest (it is mostly download time: the pip cache's size before it is recorded).

Earlier runs in the file are kept (`earlier_runs`, newest first), each with the load it ran under.
The README and docs cite that file for every figure of these runs (tests/test_figures.py checks that each cited
figure is in it); regenerate it with this command instead of typing a figure in by hand.

Usage:
    python scripts/time_quickstart.py --out results/quickstart_cpu.json --install --below-load 1
    python scripts/time_quickstart.py --out /tmp/q.json --max_steps 2     # a smoke run of the script
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = (["make-tiny-model", "outputs/tiny-mistral"], ["train", "--config", "recipes/tiny/nca.yaml"])
INSTALL = (["install", "torch==2.13.0"], ["install", "-e", f"{REPO}[dev]"])
#: what `train_log` keeps of each training log entry (every `logging_steps`)
TRAIN_LOG = ("loss", "rewards/margins", "rewards/ranking_accuracy", "logps/chosen")


def readme_python_example() -> str:
    """The README's Python example, as written: the `python` block of its "Use it like DPOTrainer" section."""
    section = (REPO / "README.md").read_text(encoding="utf-8").split("## Use it like DPOTrainer", 1)[1]
    return re.search(r"^```python\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL).group(1)


def _run(command: list[str], cwd, env) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - started
    if proc.returncode != 0:
        print(proc.stdout[-2000:] + proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"`{' '.join(command)}` failed (exit {proc.returncode})")
    return proc, round(took, 1)


def _folder_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 1) if path.is_dir() else 0.0


def time_install(env: dict) -> dict:
    """The README's two `pip install` commands into a fresh virtual environment, timed one by one."""
    cache = Path(subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True)
                 .stdout.strip() or Path.home() / ".cache" / "pip")
    sources = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    record = {"pip_cache_mb_before": _folder_mb(cache), "commands": [],
              "pip_sources": [line for line in sources.splitlines() if "index" in line or "find-links" in line]}
    with tempfile.TemporaryDirectory(prefix="nca-trl-install-") as venv:
        _run([sys.executable, "-m", "venv", venv], REPO, env)
        pip = str(Path(venv) / "bin" / "pip")
        for command in INSTALL:
            _, took = _run([pip, *command], REPO, env)
            record["commands"].append({"command": "pip " + " ".join(command).replace(str(REPO), "."), "wall_s": took})
    record["wall_s"] = round(sum(c["wall_s"] for c in record["commands"]), 1)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--max_steps", type=int, default=None, help="cut training short (smoke runs only)")
    parser.add_argument("--install", action="store_true", help="also time the README's install, in a fresh venv")
    parser.add_argument("--below-load", type=float, default=None, metavar="L",
                        help="first wait (up to an hour) until the 1-minute load average is below L: time a quiet "
                        "machine, not other people's jobs")
    args = parser.parse_args(argv)
    if args.below_load is not None:
        deadline = time.time() + 3600
        while os.getloadavg()[0] >= args.below_load and time.time() < deadline:
            time.sleep(15)
    nca_trl = Path(sys.executable).parent / "nca-trl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    record = {"install": time_install(env) if args.install else None, "commands": [], "cpus": os.cpu_count(),
              "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="nca-trl-quickstart-") as work:
        for name in ("recipes", "data"):
            os.symlink(REPO / name, Path(work) / name)
        for command in COMMANDS:
            command = list(command) + (["--max_steps", str(args.max_steps)] if args.max_steps and command[0] == "train"
                                       else [])
            proc, took = _run([str(nca_trl), *command], work, env)
            record["commands"].append({"command": "nca-trl " + " ".join(command), "wall_s": took})
            if command[0] == "train":
                record["table"] = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
        info = json.loads((Path(work) / "outputs" / "tiny-nca" / "run_info.json").read_text())
        proc, took = _run([sys.executable, "-c", readme_python_example()], work, env)
        record["python_example"] = {
            "wall_s": took,
            "printed": [line for line in proc.stdout.splitlines() if line and not line.startswith("step ")],
            "stderr": proc.stderr.splitlines(),
        }
    record.update(
        load_average_after=os.getloadavg(),
        train_steps=info["global_step"],
        train_runtime_s=round(info["train_metrics"]["train_runtime"], 1),
        logged_metrics=sorted({key for entry in info["log_history"] for key in entry}),
        train_log=[{key: entry[key] for key in ("step", *TRAIN_LOG) if key in entry}
                   for entry in info["log_history"] if "loss" in entry],
        versions=info["versions"],
        measured_by=f"python scripts/time_quickstart.py --out {args.out}"
        + (f" --max_steps {args.max_steps}" if args.max_steps else "") + (" --install" if args.install else "")
        + (f" --below-load {args.below_load:g}" if args.below_load is not None else ""),
    )
    out = Path(args.out)
    if out.is_file():  # the runs before this one stay in the file, newest first: what they measured stays citable
        previous = json.loads(out.read_text())
        record["earlier_runs"] = [{k: v for k, v in previous.items() if k != "earlier_runs"},
                                  *previous.get("earlier_runs", [])]
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
