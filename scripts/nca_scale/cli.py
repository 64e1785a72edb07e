"""The command line of one stage (or `environment`, or `build` of a model): runs it and writes its RESULT.json, `ok`
or the one-line error with what was measured before it; exit status 0 when ok, 1 otherwise."""

from __future__ import annotations

import argparse
import json
import signal
import traceback
from pathlib import Path

from . import __doc__ as OVERVIEW
from .common import StageError, kill_children
from .environment import environment
from .models import build
from .other_stages import stage_generate_long, stage_iterate, stage_layouts_median
from .run import Run
from .training_stages import stage_fsdp2, stage_mixtral_zero3, stage_zero3, stage_zero3_offload

STAGES = {
    "zero3": stage_zero3,
    "zero3_offload": stage_zero3_offload,
    "mixtral_zero3": stage_mixtral_zero3,
    "fsdp2": stage_fsdp2,
    "generate_long": stage_generate_long,
    "iterate": stage_iterate,
    "layouts_median": stage_layouts_median,
}


def _one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}" if not isinstance(error, StageError) else str(error)
    return " ".join(text.split())[:600]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=OVERVIEW.split("\n\n")[0])
    parser.add_argument("stage", choices=[*STAGES, "environment", "build"])
    parser.add_argument("--work", required=True, type=Path, help="shared models, data and runs (kept across stages)")
    parser.add_argument("--result", type=Path, help="where the stage's JSON object goes")
    parser.add_argument("--results", type=Path, help="OUT_DIR/gpu_scale.json (its environment's measured peak)")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds this stage may take (its time limit)")
    parser.add_argument("--arch", choices=("mistral", "mixtral", "digits"), help="build: which model")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device (the CPU dry run)")
    ns = parser.parse_args(argv)
    ns.work.mkdir(parents=True, exist_ok=True)
    if ns.stage == "build":
        build(ns.work, ns.arch, ns.smoke)
        return 0
    if ns.result is None:
        parser.error("--result is required")
    if ns.stage == "environment":
        ns.result.write_text(json.dumps(environment(ns.work, ns.smoke), indent=1))
        return 0
    signal.signal(signal.SIGTERM, kill_children)
    run = None
    try:
        run = Run(ns.work, ns.smoke, ns.budget - 5, ns.results)
        run.result["settings"]["sizes"] = "smoke" if ns.smoke else "full"
        STAGES[ns.stage](run)
        result = {"ok": True, **run.result}
    except BaseException as e:  # noqa: BLE001 - every failure is recorded, with what was measured before it
        traceback.print_exc()
        partial = run.result if run is not None else {"shape": {}, "settings": {}, "numbers": {}}
        result = {"ok": False, "error": _one_line(e), **partial, "traceback": traceback.format_exc()[-3000:]}
    ns.result.parent.mkdir(parents=True, exist_ok=True)
    ns.result.write_text(json.dumps(result, indent=1, default=str, allow_nan=True))
    print(f"[gpu_scale] {ns.stage}: {'ok' if result['ok'] else 'FAILED: ' + result['error']}", flush=True)
    return 0 if result["ok"] else 1
