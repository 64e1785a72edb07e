"""Where `nca-trl iterate` writes, and what tells a restarted run which stages are done.

    output_dir/iterate.json                   settings of the run (a restart with other settings is refused)
    output_dir/heldout_prompts.jsonl          the held-out prompts (the last `heldout_prompts` of the split)
    output_dir/round-0/eval/                  the initial model's evaluation
    output_dir/round-r/prompts.jsonl          round r's slice of the prompts
    output_dir/round-r/samples.jsonl          K completions per prompt from round r-1's policy (`nca-trl generate`)
    output_dir/round-r/rated.jsonl            the same with rewards (`nca-trl score`)
    output_dir/round-r/model/                 round r's policy (`nca-trl train`, or trl.DPOTrainer for `loss: dpo`)
    output_dir/round-r/eval/                  its held-out samples, their rewards, metrics.json
    output_dir/round-r/status.json            the stages of round r that are done (written after each one)
    output_dir/iterate_results.json, iterate_curves.png   the table and the plot, rewritten after each round

Every file is written to a temporary name and renamed, so it exists whole or not at all; a stage counts as done only
once `status.json` says so (the stage's own outputs may exist from a run killed before that: the stage is rerun, and
`generate` and `train` continue from their chunks and checkpoints).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..runtime.files import json_default, write_atomic

__all__ = ["RunLayout", "log", "read_jsonl", "write_json", "write_jsonl"]


def log(message: str) -> None:
    """Print on the main process of a launch (`RANK` 0) only."""
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"[nca-trl iterate] {message}", flush=True)


def write_json(path: str | os.PathLike, value) -> None:
    write_atomic(path, json.dumps(value, indent=1, ensure_ascii=False, default=json_default, allow_nan=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False, default=json_default) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class RunLayout:
    """The paths of one `nca-trl iterate` run (see the module docstring)."""

    def __init__(self, output_dir: str | os.PathLike):
        self.root = Path(output_dir)
        self.manifest = self.root / "iterate.json"
        self.heldout = self.root / "heldout_prompts.jsonl"
        self.results = self.root / "iterate_results.json"
        self.curves = self.root / "iterate_curves.png"
        # While `--overwrite_output_dir` removes a run: what is left beside it is not a run (`loop._remove_run`)
        self.removing = self.root / "iterate.removing"

    def round_dir(self, r: int) -> Path:
        return self.root / f"round-{r}"

    def prompts(self, r: int) -> Path:
        return self.round_dir(r) / "prompts.jsonl"

    def samples(self, r: int) -> Path:
        return self.round_dir(r) / "samples.jsonl"

    def rated(self, r: int) -> Path:
        return self.round_dir(r) / "rated.jsonl"

    def model(self, r: int) -> Path:
        return self.round_dir(r) / "model"

    def eval_dir(self, r: int) -> Path:
        return self.round_dir(r) / "eval"

    def status_file(self, r: int) -> Path:
        return self.round_dir(r) / "status.json"

    def status(self, r: int) -> dict:
        path = self.status_file(r)
        return json.loads(path.read_text()) if path.exists() else {}

    def mark_done(self, r: int, stage: str, info: dict) -> None:
        status = self.status(r)
        status[stage] = info
        write_json(self.status_file(r), status)
