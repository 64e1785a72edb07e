"""`nca-trl score`: read {prompt, completions} rows, score them, write rated rows and the sidecar."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from ..runtime.environment import versions
from ..runtime.errors import DataError, SettingsError
from ..runtime.files import json_default, parquet_table, write_atomic
from ..runtime.paths import check_output_file, check_path_settings, recorded_output_name
from .arguments import PATH_SETTINGS, ScoreArguments, parse_score_args
from .combine import _log, score_rows
from .sources import load_sources

__all__ = ["load_rows", "score", "scoring_sidecar_path", "write_rows"]


def scoring_sidecar_path(output: str | os.PathLike) -> Path:
    """`out/rated.jsonl` -> `out/rated.scoring.json`."""
    output = Path(output)
    return output.with_name(output.stem + ".scoring.json")


def _refuse_a_generate_output(output: Path) -> None:
    """An `output` that a generate run wrote (its record `<stem>.generation.json` names it): the rated rows replaced
    those samples, and a rerun of generate then took the file for its own, done (rows of other prompts, exit 0)."""
    from ..generation.output import sidecar_path

    record = sidecar_path(output)
    if output.is_file() and recorded_output_name(record) == output.name:
        raise SettingsError(f"{output} is the output of an `nca-trl generate` run (its record {record.name}): the "
                            "rated rows would replace those samples. Write them to another file (`output`).")


def load_rows(args: ScoreArguments) -> list[dict]:
    """The rows to score: split `dataset_split` of `dataset_name` (read as `train` and `generate` read data), its
    first `max_rows` rows."""
    from ..data.loading import load_split
    from ..runtime.paths import check_data_folder, check_path

    check_path(args.dataset_name, "dataset_name", "dataset")  # not the Hub's error for a missing file
    check_data_folder(args.dataset_name, "dataset_name")
    dataset = load_split(args, limit=args.max_rows)
    missing = [c for c in ("prompt", "completions") if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"{args.dataset_name} has no {' and no '.join(f'`{c}`' for c in missing)} column (it has "
            f"{dataset.column_names}): `nca-trl score` reads {{prompt, completions}} rows, as `nca-trl generate` "
            "writes them. For a folder written by generate, pass the output file itself."
        )
    return dataset.to_list()


def write_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write rows to a `.jsonl` or `.parquet` file atomically (a temporary file renamed into place), as `nca-trl
    generate` writes its output."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            pq.write_table(parquet_table(rows, str(path)), tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False, default=json_default) + "\n" for row in rows))


def _check_single_process(environ=None) -> None:
    environ = os.environ if environ is None else environ
    if int(environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise RuntimeError(
            "`nca-trl score` runs as one process (each launched process would score every row and write the same "
            "file): run it without `accelerate launch` / torchrun."
        )


def score(argv: list[str] | None = None) -> dict:
    """`nca-trl score`: returns the sidecar written to `<output stem>.scoring.json`. Raises (never exits) on errors."""
    args = parse_score_args(argv)
    _check_single_process()
    return score_file(args)


def score_file(args: ScoreArguments) -> dict:
    """Score `args.dataset_name` into `args.output` in this process (`score` without its one-process check: the main
    process of an `nca-trl iterate` launch scores while the others wait). Returns the sidecar."""
    started = time.time()
    check_path_settings([], PATH_SETTINGS, vars(args))  # before any row is read or model loaded
    check_output_file(args.output, "output", scoring_sidecar_path(args.output))
    if Path(args.dataset_name).exists() and Path(args.output).exists() \
            and Path(args.output).resolve() == Path(args.dataset_name).resolve():
        raise SettingsError(f"`output` is `dataset_name` ({args.output}): the rated rows would replace the rows "
                            "they were scored from (generate's samples, which a rerun of generate then took as done). "
                            "Write them to another file.")
    _refuse_a_generate_output(Path(args.output))
    rows = load_rows(args)
    if str(args.output).lower().endswith(".parquet"):  # the carried columns fit one Parquet file, before scoring
        parquet_table(rows, f"{args.dataset_name} (for the Parquet output {args.output})")
    _log(f"{len(rows)} rows from {args.dataset_name} (split {args.dataset_split})")
    sources = load_sources(args.reward_model, args.reward_funcs, revision=args.reward_model_revision,
                           batch_size=args.batch_size, max_length=args.max_length, dtype=args.dtype,
                           trust_remote_code=args.trust_remote_code,
                           conversational=any(isinstance(row.get("prompt"), list) for row in rows))
    weights = args.weights
    _log("reward = " + " + ".join(f"{w:g} x {name}" for name, w in zip(sources, weights)))
    scored, stats = score_rows(rows, sources, weights, chunk_size=args.chunk_size, evaluation=args.evaluation)
    described = []
    for (name, source), weight in zip(sources.items(), weights):
        entry = {"name": name, "kind": "reward_model" if hasattr(source, "describe") else "reward_function",
                 "weight": weight}
        if hasattr(source, "describe"):
            entry.update(source.describe())
            if source.truncated:
                _log(f"warning: {source.truncated} of {source.sequences} reward-model sequence(s) were longer than "
                     f"max_length={source.max_length} tokens and truncated (their start: the reward is read at the end); "
                     "raise `max_length` to score them whole")
        described.append(entry)
    if not scored:
        raise DataError(
            f"Every row was dropped ({stats['rows_in']} rows: {stats['dropped']}; None by source: "
            f"{stats['none_by_source']}), nothing to write to {args.output}. Check that the reward functions fit "
            f"these rows (a None drops a completion; a row needs {1 if args.evaluation else 2} completion(s) left)."
        )

    sidecar = {
        "output": str(args.output),
        "dataset_name": args.dataset_name,
        "dataset_split": args.dataset_split,
        "sources": described,
        "weights": weights,
        "stats": stats,
        "arguments": asdict(args),
        "seconds": round(time.time() - started, 3),
        "versions": versions(),
    }
    sidecar_file = scoring_sidecar_path(args.output)
    write_rows(args.output, scored)  # the rows first: a sidecar says that its output was written
    write_atomic(sidecar_file, json.dumps(sidecar, indent=2, default=json_default) + "\n")
    use = ("an evaluation's scores, not training data" if args.evaluation
           else f"train on it: `nca-trl train --config RECIPE.yaml --dataset_name {args.output}`, e.g. the recipe "
                f"tiny/nca.yaml, or `--model_name_or_path MODEL`")
    _log(f"{len(scored)} rated rows -> {args.output} ({use}); settings and statistics in {sidecar_file}")
    return sidecar
