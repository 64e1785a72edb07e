"""The command line: `python scripts/reproduce.py [--out DIR] [--quick] [--experiments ...] [--set EXP.KEY=VALUE ...]`.

Runs the chosen experiments in order (identity, trend, reward, iterative; the pre-registered `ablation` only when named),
then writes results.json, summary.md and the figures to `--out`."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import __doc__ as OVERVIEW
from .ablation import run_ablation
from .common import quiet_libraries
from .ground_truth import run_reward
from .identity import run_identity
from .iterative import run_iterative
from .report import (
    plot_ablation,
    plot_iterative,
    plot_reward,
    plot_reward_grid,
    plot_trend,
    summary_markdown,
)
from .settings import load_settings
from .trend import run_trend

EXPERIMENTS = {"identity": run_identity, "trend": run_trend, "reward": run_reward, "iterative": run_iterative,
               "ablation": run_ablation}
DEFAULT = ["identity", "trend", "reward", "iterative"]  # `ablation` (5 seeds, about an hour) runs when named


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="reproduce.py", description=OVERVIEW.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--out", default="results", help="output folder (created)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, few steps, one seed (~1 min)")
    parser.add_argument("--experiments", nargs="+", choices=list(EXPERIMENTS), default=DEFAULT,
                        help=f"default: {' '.join(DEFAULT)}")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="override the seeds (default: 0 1 2, --quick: 0; ablation: 0-4, --quick: 0 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: results do not depend on the core count)")
    parser.add_argument("--set", nargs="+", default=[], metavar="EXP.KEY=VALUE",
                        help="override a setting, e.g. --set trend.beta=0.1 reward.alpha=0 (value parsed as JSON)")
    parser.add_argument("--work-dir", help="where checkpoints go (default: a temporary folder, deleted at the end)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.quick, args.set)
    except KeyError as e:
        parser.error(e.args[0])
    return args, settings


def loadavg():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def main(argv=None):
    args, settings = parse_args(argv)

    import torch
    import transformers
    import trl

    torch.set_num_threads(args.threads)
    quiet_libraries()
    seeds = args.seeds if args.seeds else settings["seeds"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="nca-reproduce-"))
    work.mkdir(parents=True, exist_ok=True)

    results = {
        "command": "python scripts/reproduce.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "seeds": seeds,
        "settings": {k: v for k, v in settings.items() if k in (*args.experiments, "seeds")},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                     "python": platform.python_version()},
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "loadavg_start": loadavg()},
        "seconds": {},
        "seeds_by_experiment": {},
    }
    start = time.time()
    try:
        for name, run in EXPERIMENTS.items():
            if name not in args.experiments:
                continue
            t0 = time.time()
            own = args.seeds if args.seeds else settings[name].get("seeds", seeds)  # the ablation's plan: 5 seeds
            results[name] = run(settings[name], own, work)
            results["seeds_by_experiment"][name] = own
            results["seconds"][name] = time.time() - t0
            print(f"[{name}] done in {results['seconds'][name]:.0f}s", flush=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    results["seconds"]["total"] = time.time() - start
    results["seeds"] = sorted({s for used in results["seeds_by_experiment"].values() for s in used})
    results["machine"]["loadavg_end"] = loadavg()

    if "trend" in results:
        for lr in settings["trend"]["grid_lr"]:
            main = lr == settings["trend"]["lr"]
            plot_trend(results["trend"], settings["trend"], lr,
                       out / ("likelihood_trend.png" if main else f"likelihood_trend_lr{lr:g}.png"))
    if "reward" in results:
        plot_reward(results["reward"], settings["reward"], out / "ground_truth_reward.png")
        plot_reward_grid(results["reward"], out / "ground_truth_sensitivity.png")
    if "iterative" in results:
        plot_iterative(results["iterative"], out / "iterative_reward.png")
    if "ablation" in results:
        plot_ablation(results["ablation"], out / "ablation_reward.png")
    (out / "summary.md").write_text(summary_markdown(results))
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    print(summary_markdown(results))
    print(f"wrote {out}/ in {results['seconds']['total']:.0f}s")
    return results
