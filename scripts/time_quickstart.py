#!/usr/bin/env python
"""Time the README's quick start as a user runs it, and record the result with the machine it ran on.

Runs, in a fresh temporary folder with the repo's `recipes/` and `data/` linked in, the quick start's two commands
(`nca-trl make-tiny-model outputs/tiny-mistral`, `nca-trl train --config recipes/tiny/nca.yaml`) as subprocesses,
and writes the wall time of each, the training's own runtime and steps (from its `run_info.json`), the CPU count, the
load average before and after (other work on the machine slows it), and the versions, to a JSON file. The README's
quick start cites that file; regenerate it with this command instead of typing a time in by hand.

Usage:
    python scripts/time_quickstart.py --out results/quickstart_cpu.json
    python scripts/time_quickstart.py --out /tmp/q.json --max_steps 2     # a smoke run of the script
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = (["make-tiny-model", "outputs/tiny-mistral"], ["train", "--config", "recipes/tiny/nca.yaml"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--max_steps", type=int, default=None, help="cut training short (smoke runs only)")
    args = parser.parse_args(argv)
    nca_trl = Path(sys.executable).parent / "nca-trl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    record = {"commands": [], "cpus": os.cpu_count(), "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="nca-trl-quickstart-") as work:
        for name in ("recipes", "data"):
            os.symlink(REPO / name, Path(work) / name)
        for command in COMMANDS:
            command = list(command) + (["--max_steps", str(args.max_steps)] if args.max_steps and command[0] == "train"
                                       else [])
            started = time.perf_counter()
            proc = subprocess.run([str(nca_trl), *command], cwd=work, env=env, capture_output=True, text=True)
            took = time.perf_counter() - started
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"`nca-trl {' '.join(command)}` failed (exit {proc.returncode})")
            record["commands"].append({"command": "nca-trl " + " ".join(command), "wall_s": round(took, 1)})
        info = json.loads((Path(work) / "outputs" / "tiny-nca" / "run_info.json").read_text())
    record.update(
        load_average_after=os.getloadavg(),
        train_steps=info["global_step"],
        train_runtime_s=round(info["train_metrics"]["train_runtime"], 1),
        versions=info["versions"],
        measured_by=f"python scripts/time_quickstart.py --out {args.out}"
        + (f" --max_steps {args.max_steps}" if args.max_steps else ""),
    )
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
