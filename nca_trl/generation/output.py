"""Where `nca-trl generate` writes: chunk files that make a stopped run resumable, then one merged output file.

    <output>.parts/manifest.json          the settings of the run (a restart with other settings is refused)
    <output>.parts/chunk-00000.jsonl      rows of prompts [0, chunk_size), written to a temporary name, then renamed
    <output>.parts/chunk-00000.stats.json generated tokens, truncated completions, seconds (written before the chunk)
    <output>                              all chunks in prompt order (temporary name, renamed), parts removed
    <output stem>.generation.json         the sidecar: settings, model, number of prompts, statistics, versions

A chunk exists completely or not at all (`os.replace` of a fully written and fsync'ed file), so a restart skips the
chunks that exist and regenerates the others: no prompt is lost or written twice. The merged output is committed by
one rename too; the sidecar is renamed into place just before it, and the parts are removed after it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from glob import escape as glob_escape
from pathlib import Path

from ..runtime.files import json_default, parquet_table, write_atomic

__all__ = ["ChunkStore", "parts_path", "sidecar_path"]


def sidecar_path(output: str | os.PathLike) -> Path:
    """`out/gen.jsonl` -> `out/gen.generation.json`."""
    output = Path(output)
    return output.with_name(output.stem + ".generation.json")


def parts_path(output: str | os.PathLike) -> Path:
    """`out/gen.jsonl` -> `out/gen.jsonl.parts`, the folder of a run's chunks."""
    output = Path(output)
    return output.with_name(output.name + ".parts")


class ChunkStore:
    """The chunk files of one output. `settings` (JSON-able) identify the run: a restart must match them."""

    def __init__(self, output: str | os.PathLike, settings: dict, num_prompts: int, chunk_size: int):
        self.output = Path(output)
        self.parts = parts_path(self.output)
        self.sidecar = sidecar_path(self.output)
        self.settings = settings
        self.num_prompts = num_prompts
        self.chunk_size = chunk_size
        self.num_chunks = -(-num_prompts // chunk_size)
        self._digits = max(5, len(str(max(self.num_chunks - 1, 0))))

    def chunk_range(self, chunk: int) -> range:
        return range(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, self.num_prompts))

    def chunk_path(self, chunk: int) -> Path:
        return self.parts / f"chunk-{chunk:0{self._digits}d}.jsonl"

    def _stats_path(self, chunk: int) -> Path:
        return self.parts / f"chunk-{chunk:0{self._digits}d}.stats.json"

    # ------------------------------------------------------------------------------------------------ lifecycle
    def open(self, overwrite: bool = False) -> str:
        """Prepare the parts folder (main process only, before any chunk is written).

        Returns `"done"` when the output already holds this run (stale parts are removed), `"merge"` when every
        chunk of this run exists (a run stopped during its merge: merged again), `"resume"` when some chunks of this
        run exist, `"new"` otherwise. Raises a `FinishedRunError` when the output or the parts belong to other
        settings, unless `overwrite` (`--overwrite_output true`), which removes them first.
        """
        manifest = self._read_json(self.parts / "manifest.json") if self.parts.exists() else None
        if manifest is not None and not self._same(manifest):
            self._refuse_or_remove(self.parts, "the chunks of an unfinished generate run", manifest, overwrite)
            manifest = None
        if manifest is not None:  # this run's chunks: one that is not whole (changed after its commit) is sampled again
            for chunk in self.done_chunks():
                problem = self.chunk_problem(chunk)
                if problem:
                    print(f"[nca-trl generate] {self.chunk_path(chunk)}: {problem}; removed, to be sampled again")
                    self.chunk_path(chunk).unlink()
                    self._stats_path(chunk).unlink(missing_ok=True)
        complete = manifest is not None and not self.missing_chunks()
        if self.output.exists() and not complete:
            record = self._read_json(self.sidecar) or {}
            # A sidecar of another output of the same stem (`out.jsonl` beside `out.parquet`) records nothing of this
            recorded = record.get("settings") if Path(str(record.get("output", self.output))).name == self.output.name \
                else None
            if not self._same(recorded):
                self._refuse_or_remove(self.output, "a finished generate run", recorded, overwrite)
            else:
                if self.parts.exists():
                    shutil.rmtree(self.parts)
                return "done"
        if self.parts.exists():
            for stale in self.parts.glob(".*.tmp-*"):  # files being written when the run stopped
                stale.unlink()
        for name in (self.output.name, self.sidecar.name):  # a merge stopped before its rename: a full-size copy
            for stale in self.output.parent.glob(f".{glob_escape(name)}.tmp-*"):
                stale.unlink()
        self.parts.mkdir(parents=True, exist_ok=True)
        write_atomic(self.parts / "manifest.json", json.dumps(self.settings, indent=2, sort_keys=True))
        if complete:
            return "merge"
        return "resume" if self.done_chunks() else "new"

    def _same(self, recorded) -> bool:
        """Whether `recorded` settings are this run's. Those of an nca-trl that did not record the carried columns
        (`carried_sha256`) are compared without them."""
        if isinstance(recorded, dict) and "carried_sha256" not in recorded:
            return recorded == {k: v for k, v in self.settings.items() if k != "carried_sha256"}
        return recorded == self.settings

    def _refuse_or_remove(self, where: Path, what: str, recorded, overwrite: bool) -> None:
        from ..runtime.output_dir import FinishedRunError, finished_run_message

        if not overwrite:
            raise FinishedRunError(finished_run_message(
                str(where), what, self._differences(recorded), "--overwrite_output",
                "`output`; or rerun with the same settings to continue it"))
        print(f"[nca-trl generate] --overwrite_output: removing {where} ({'; '.join(self._differences(recorded)[:3])})")
        self.remove()

    def _differences(self, recorded) -> list[str]:
        from ..runtime.output_dir import changed_settings

        if not isinstance(recorded, dict):
            return [f"no settings recorded in {self.sidecar.name}"]
        return changed_settings(recorded, self.settings)

    def remove(self) -> None:
        """Remove the output, its sidecar and its parts (`--overwrite_output true`)."""
        if self.parts.exists():
            shutil.rmtree(self.parts)
        for path in (self.output, self.sidecar):
            path.unlink(missing_ok=True)

    @staticmethod
    def _read_json(path: Path):
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def chunk_problem(self, chunk: int) -> str | None:
        """What is wrong with a committed chunk file (None: whole): its rows must be one JSON object a line with a
        `prompt`, as many as its prompts. A chunk is committed whole by a rename; one edited, truncated or cut short
        by a failing disk after that was merged as it was (rows lost, or a torn line glued to the next chunk's)."""
        try:
            text = self.chunk_path(chunk).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            return f"unreadable ({error})"
        lines = text.split("\n")
        if lines[-1] != "":
            return "its last line is cut short"
        expected = len(self.chunk_range(chunk))
        if len(lines) - 1 != expected:
            return f"{len(lines) - 1} rows, expected {expected}"
        for number, line in enumerate(lines[:-1], 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or "prompt" not in row:
                return f"line {number} is not a row of prompt and completions"
        return None

    def done_chunks(self) -> list[int]:
        return [c for c in range(self.num_chunks) if self.chunk_path(c).exists()]

    def missing_chunks(self) -> list[int]:
        return [c for c in range(self.num_chunks) if not self.chunk_path(c).exists()]

    def write_chunk(self, chunk: int, rows: list[dict], stats: dict) -> None:
        """Commit one chunk: its statistics, then its rows (the rename of the rows file is the commit)."""
        expected = len(self.chunk_range(chunk))
        if len(rows) != expected:
            raise RuntimeError(f"chunk {chunk} has {len(rows)} rows, expected {expected}")
        write_atomic(self._stats_path(chunk), json.dumps(stats))
        text = "".join(json.dumps(row, ensure_ascii=False, default=json_default) + "\n" for row in rows)
        write_atomic(self.chunk_path(chunk), text)

    def wait_for_chunks(self, poll_s: float = 2.0, log=None) -> None:
        """Block until every chunk exists (other processes write theirs). Files, not a collective: no timeout."""
        last = None
        while missing := self.missing_chunks():
            if log is not None and len(missing) != last:
                log(f"waiting for {len(missing)} chunk(s) from other processes")
                last = len(missing)
            time.sleep(poll_s)

    def stats(self) -> dict:
        """The chunks' statistics summed, and how many chunks each process wrote (`chunks_per_process`)."""
        total: dict = {}
        per_process: dict = {}
        for chunk in range(self.num_chunks):
            stats = self._read_json(self._stats_path(chunk)) or {}
            process = stats.pop("process_index", None)
            per_process[str(process)] = per_process.get(str(process), 0) + 1
            for key, value in stats.items():
                total[key] = total.get(key, 0) + value
        if "seconds" in total:
            total["seconds"] = round(total["seconds"], 3)
        return {**total, "chunks_per_process": per_process}

    def merge(self, sidecar: dict) -> None:
        """Concatenate the chunks in prompt order into the output, write the sidecar, remove the parts. A chunk that
        is not whole (`chunk_problem`) stops it before anything is written."""
        for chunk in range(self.num_chunks):
            problem = self.chunk_problem(chunk)
            if problem:
                raise RuntimeError(f"{self.chunk_path(chunk)}: {problem}, so the output was not written. Rerun the same "
                                   "command: it samples that chunk again.")
        tmp = self.output.with_name(f".{self.output.name}.tmp-{os.getpid()}")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        if self.output.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            rows = []
            for chunk in range(self.num_chunks):
                with open(self.chunk_path(chunk), encoding="utf-8") as f:
                    rows.extend(json.loads(line) for line in f)
            pq.write_table(parquet_table(rows, str(self.output)), tmp)
        else:
            with open(tmp, "wb") as out:
                for chunk in range(self.num_chunks):
                    with open(self.chunk_path(chunk), "rb") as f:
                        shutil.copyfileobj(f, out)
                out.flush()
                os.fsync(out.fileno())
        write_atomic(self.sidecar, json.dumps(sidecar, indent=2, default=json_default) + "\n")
        os.replace(tmp, self.output)
        shutil.rmtree(self.parts)
