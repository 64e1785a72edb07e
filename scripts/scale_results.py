#!/usr/bin/env python
"""The results file of scripts/gpu_scale.sh: one JSON object per stage, merged in as each stage ends, and the verdict.

    python scripts/scale_results.py merge OUT.json STAGE RESULT.json --exit-code RC --timeout S --seconds S
    python scripts/scale_results.py section OUT.json NAME PART.json     # e.g. the environment (probe, versions)
    python scripts/scale_results.py summary OUT.json [--smoke]          # targets, table, exit status
    python scripts/scale_results.py combine OUT.json FIRST.json LATER.json...   # two calls' files in one

`OUT.json` is `{"environment": {...}, "stages": {NAME: {...}}, "targets": {...}}`, rewritten atomically after every
stage, so a stage killed by its time limit keeps what the others measured (a stage that leaves no RESULT.json is
recorded as `ok: false` with the reason: its time limit, or its exit code). Stages already in the file from an
earlier call are kept unless the same stage runs again; `combine` does the same for the files of separate calls (the
device empties its output folder before each): a later file's stages replace the earlier ones of the same name.

Every stage object has `ok` (and `error`, one line, when false), `shape`, `settings` and `numbers`; the merge adds
`exit_code`, `wall_seconds` and `timeout_seconds`. `summary` adds `targets`: the issue's goals, measured against what
the stages hold (met true / false, or null where the stage did not measure it), and exits 0 only when every stage
asked for is ok and every target is met, 1 when a stage failed or is missing, 3 when all ran but a target was missed.
With `--smoke` (a CPU dry run) the targets are listed with `met: null`: a CPU says nothing about them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's nca_trl, not only an installed one

from nca_trl.runtime.files import write_atomic  # noqa: E402

STAGES = ("zero3", "zero3_offload", "mixtral_zero3", "fsdp2", "generate_long", "iterate", "layouts_median")
TIMED_OUT = (124, 137)  # coreutils `timeout`: 124 after its signal, 137 after the KILL that follows (-k)
NOT_RUN = 125  # gpu_scale.sh's exit code of a stage it did not start: the run's time budget was spent
#: PLAN_AGREEMENT: how far the memory planner's per-GPU total may be from the measured peak (|plan / peak - 1|)
PLAN_AGREEMENT = 0.25
#: (target name, stage, number, comparison, bound): the issue's goals, read from the stages' `numbers`
TARGETS = (
    ("zero3_plan_agrees", "zero3", "plan_over_peak", "within", PLAN_AGREEMENT),
    ("zero3_offload_plan_agrees", "zero3_offload", "plan_over_peak", "within", PLAN_AGREEMENT),
    ("mixtral_zero3_plan_agrees", "mixtral_zero3", "plan_over_peak", "within", PLAN_AGREEMENT),
    ("plain_layout_mfu_7b_width", "zero3", "mfu", "above", 0.35),
    ("prefill_once_speedup_1500_token_prompts", "generate_long", "prefill_once_over_num_return_sequences", "at_least",
     1.5),
)


def load(path: str | Path) -> dict:
    """The results file, or an empty one if it does not exist yet."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {}


def save(path: str | Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


def stage_object(result: dict | None, exit_code: int, timeout_s: float, wall_s: float, name: str = "") -> dict:
    """What a stage ended with: its own object (RESULT.json), or, when it wrote none, `ok: false` and why."""
    if result is None:
        if exit_code == NOT_RUN:
            error = (f"not run: the run's time budget (GPU_SCALE_BUDGET) was spent before it; run it alone with "
                     f"STAGES={name or 'NAME'}")
        elif exit_code in TIMED_OUT:
            error = (f"timed out after {timeout_s:g} s (its time limit) before writing its result; its output is in "
                     "gpu_scale.log: raise its limit or shrink it")
        else:
            error = f"exited with code {exit_code} before writing its result: its traceback is in gpu_scale.log"
        obj = {"ok": False, "error": error, "shape": {}, "settings": {}, "numbers": {}}
    else:
        obj = dict(result)
        if exit_code != 0 and obj.get("ok"):
            obj["ok"] = False
            obj["error"] = f"wrote an ok result but exited with code {exit_code}: see gpu_scale.log"
    obj.update(exit_code=exit_code, wall_seconds=round(wall_s, 1), timeout_seconds=timeout_s)
    return obj


def read_result(path: str | Path) -> dict | None:
    """A stage's RESULT.json, or None if it is missing or not a JSON object (a stage killed while writing)."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


def merge_stage(path: str | Path, name: str, result_path: str | Path, exit_code: int, timeout_s: float,
                wall_s: float) -> dict:
    """Put stage `name`'s object into the results file at `path` (rewritten atomically); returns the object."""
    data = load(path)
    obj = stage_object(read_result(result_path), exit_code, timeout_s, wall_s, name)
    data.setdefault("stages", {})[name] = obj
    save(path, data)
    return obj


def merge_section(path: str | Path, name: str, part: dict) -> None:
    """Update the top-level object `name` of the results file with `part` (e.g. the environment's probe)."""
    data = load(path)
    data.setdefault(name, {}).update(part)
    save(path, data)


def combine(out: str | Path, paths: list[str | Path]) -> dict:
    """One results file from several calls' (in order): stages of a later file replace those of the same name; the
    environment is the first file's, with every file's device and versions under `environment["calls"]`."""
    data: dict = {"environment": {}, "stages": {}}
    calls = []
    for path in paths:
        part = load(path)
        if not part:
            raise FileNotFoundError(f"{path}: no such results file")
        env = part.get("environment", {})
        data["environment"] = data["environment"] or dict(env)
        calls.append({"file": str(path), **{k: env.get(k) for k in ("device", "torch", "transformers", "deepspeed")},
                      "stages": list(part.get("stages", {}))})
        data["stages"].update(part.get("stages", {}))
    data["environment"]["calls"] = calls
    save(out, data)
    return data


def _met(value, comparison: str, bound: float) -> bool | None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if comparison == "within":
        return abs(value - 1) <= bound
    if comparison == "above":
        return value > bound
    return value >= bound  # at_least


def targets(data: dict, smoke: bool = False) -> dict:
    """{target: {"stage", "number", "value", "goal", "met"}} of `TARGETS` over the stages in `data`."""
    goals = {"within": "within {:.0%} of 1", "above": "> {:g}", "at_least": ">= {:g}"}
    out = {}
    for name, stage, number, comparison, bound in TARGETS:
        value = data.get("stages", {}).get(stage, {}).get("numbers", {}).get(number)
        out[name] = {"stage": stage, "number": number, "value": value, "goal": goals[comparison].format(bound),
                     "met": None if smoke else _met(value, comparison, bound)}
    return out


def summarize(path: str | Path, smoke: bool = False, stages: tuple[str, ...] = STAGES) -> int:
    """Add `targets` to the results file, print one line per stage and target; the exit status (module docstring)."""
    data = load(path)
    data["targets"] = targets(data, smoke)
    save(path, data)
    ran = data.get("stages", {})
    for name in stages:
        obj = ran.get(name)
        state = "missing" if obj is None else "ok" if obj.get("ok") else "FAILED"
        detail = "" if obj is None or obj.get("ok") else f": {obj.get('error')}"
        print(f"  {name:<16} {state}{detail}")
    for name, t in data["targets"].items():
        met = {True: "met", False: "MISSED", None: "not judged on a CPU dry run" if smoke else "not measured"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        print(f"  target {name}: {value} (goal {t['goal']}): {met}")
    if any(ran.get(name) is None or not ran[name].get("ok") for name in stages):
        return 1
    return 3 if any(t["met"] is False for t in data["targets"].values()) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge one stage's RESULT.json")
    m.add_argument("out")
    m.add_argument("stage", choices=STAGES)
    m.add_argument("result")
    m.add_argument("--exit-code", type=int, required=True)
    m.add_argument("--timeout", type=float, required=True)
    m.add_argument("--seconds", type=float, required=True)
    s = sub.add_parser("section", help="merge a JSON object as a top-level section")
    s.add_argument("out")
    s.add_argument("name")
    s.add_argument("part")
    c = sub.add_parser("combine", help="several calls' results files in one (later stages win)")
    c.add_argument("out")
    c.add_argument("inputs", nargs="+")
    v = sub.add_parser("summary", help="targets, one line per stage, exit status")
    v.add_argument("out")
    v.add_argument("--smoke", action="store_true")
    v.add_argument("--stages", default=" ".join(STAGES), help="the stages this call ran (space-separated)")
    ns = parser.parse_args(argv)
    if ns.command == "merge":
        obj = merge_stage(ns.out, ns.stage, ns.result, ns.exit_code, ns.timeout, ns.seconds)
        print(f"[gpu_scale] {ns.stage}: {'ok' if obj['ok'] else 'FAILED: ' + str(obj.get('error'))} "
              f"({obj['wall_seconds']} s)")
        return 0
    if ns.command == "combine":
        data = combine(ns.out, ns.inputs)
        print(f"{ns.out}: stages {', '.join(data['stages'])}")
        return 0
    if ns.command == "section":
        part = read_result(ns.part)
        merge_section(ns.out, ns.name, part if part is not None else {"error": f"{ns.part} missing or not JSON"})
        return 0
    return summarize(ns.out, ns.smoke, tuple(ns.stages.split()))


if __name__ == "__main__":
    sys.exit(main())
