"""Smoke test: the benchmark script runs end to end on a tiny model and writes well-formed JSON."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, str(REPO / "scripts" / "benchmark.py"), "--size", "tiny", "--steps", "1", "--warmup", "0",
        "--workloads", "long", "--batch", "2", "--max-length", "160", "--context-chars", "300", "--json", str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| d: NCATrainer, K=4, shared-prompt packed |" in proc.stdout
    results = json.loads(out.read_text())
    workload = results["workloads"]["long"]
    assert set(workload["systems"]) == {"a", "b", "c", "d"}
    assert set(workload["ratios"]) == {"b/a", "d/c", "d/a", "c/a"}
    assert set(workload["ratios_median"]) == set(workload["ratios"])
    for metrics in workload["systems"].values():
        for key in ("tokens_per_second", "peak_rss_mb", "mfu", "mfu_8nt", "seconds_per_prompt"):
            assert math.isfinite(metrics[key]) and metrics[key] > 0, key
    # Equal work: c and d see the same plain-layout tokens; d processes fewer (the prompt once, no padding)
    c, d = workload["systems"]["c"], workload["systems"]["d"]
    assert c["plain_tokens_per_step"] == d["plain_tokens_per_step"]
    assert d["processed_tokens_per_step"] < c["processed_tokens_per_step"]


def test_median_ratios_divide_tokens_per_median_step():
    """`ratios_median` are the `ratios` (x over y) with each system's tokens per step over its median step time."""
    systems = {"a": {"tokens_per_second_median": 100.0}, "c": {"tokens_per_second_median": 400.0},
               "d:auto": {"tokens_per_second_median": 1000.0}}
    ratios = {"c/a": 9.0, "d:auto/c": 9.0, "d:auto/a": 9.0}  # mean-step ratios: not used
    assert load_script("benchmark").median_ratios(systems, ratios) == {"c/a": 4.0, "d:auto/c": 2.5, "d:auto/a": 10.0}


def test_7b_width_size_is_mistral_7b():
    """`--size 7b-2l` is Mistral-7B-v0.1's width (recipes/model_configs) with 2 layers."""
    config = json.loads((REPO / "recipes" / "model_configs" / "mistral-7b-v0.1.json").read_text())
    hidden, intermediate, layers, heads, kv_heads = load_script("benchmark").EXTRA_SIZES["7b-2l"]
    assert (hidden, intermediate, heads, kv_heads) == (
        config["hidden_size"], config["intermediate_size"], config["num_attention_heads"], config["num_key_value_heads"]
    )
    assert layers == 2


def test_shared_layout_work_counts_attention_pairs():
    """The benchmark's FLOP count of a shared-prompt batch: per segment, every query sees its prompt's keys and,
    causally, its own."""
    from nca_trl.data import DataCollatorForRatedCompletions

    rows = [{"prompt_ids": [1, 2, 3], "completion_ids": [[4, 5], [6]], "rewards": [1.0, 0.0]}]
    work = load_script("benchmark").batch_work(DataCollatorForRatedCompletions(0, shared_prompt=True)(rows))
    # prefix [1, 2]: 1 + 2 pairs; [3 4 5] after 2 prompt keys: 3 * 2 + 6; [3 6]: 2 * 2 + 3
    assert work["pairs"] == 3 + 12 + 7 and work["tokens"] == 7 and work["scored"] == 3


@pytest.mark.slow
def test_layout_report_names_the_kernels(tmp_path):
    """`--layouts`: the plain layout against the shared-prompt layout with each kernel asked for, which the JSON names,
    with the command that made it; at a tiny size with one layer (the 7B width runs the same code on a GPU)."""
    out = tmp_path / "layouts.json"
    cmd = [
        sys.executable, str(REPO / "scripts" / "benchmark.py"), "--layouts", "--size", "tiny", "--layers", "1",
        "--kernels", "auto,padded", "--steps", "1", "--warmup", "0", "--batch", "2", "--max-length", "160",
        "--context-chars", "300", "--json", str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["command"].startswith("python scripts/benchmark.py --layouts --size tiny --layers 1")
    assert results["model"]["shape"]["layers"] == 1 and results["settings"]["context_answers"] == 3
    systems = results["workloads"]["long"]["systems"]
    assert set(systems) == {"c", "d:auto", "d:padded"}
    assert systems["c"]["kernel"] is None
    assert systems["d:auto"]["kernel"].startswith("reference_varlen")  # the CPU default
    assert systems["d:padded"]["kernel"].startswith("padded_varlen")
    assert set(results["workloads"]["long"]["ratios"]) == {"d:auto/c", "d:padded/c"}


# ----------------------------------------------------------------------------- scripts/benchmark_ab.py
def _bench(tps: dict) -> dict:
    return {"workloads": {"vicuna": {"systems": {k: {"tokens_per_second_median": v} for k, v in tps.items()},
                                     "ratios": {"d/c": 0.0}}}}


def test_ab_compare_takes_the_median_over_rounds_per_version():
    ab = load_script("benchmark_ab")
    before = [_bench({"c": 100, "d": 130}), _bench({"c": 90, "d": 120}), _bench({"c": 200, "d": 260})]
    after = [_bench({"c": 100, "d": 140})]
    got = ab.compare(before, after)["vicuna"]
    assert got["tokens_per_second_median"]["c"] == {"before": 100, "after": 100, "after_over_before": 1.0}
    assert got["tokens_per_second_median"]["d"]["before"] == 130
    assert math.isclose(got["tokens_per_second_median"]["d"]["after_over_before"], 140 / 130)
    # Ratios on median steps, per run, then the median over runs: 1.3, 1.333, 1.3 -> 1.3
    assert math.isclose(got["ratios_median"]["d/c"]["before"], 1.3) and got["ratios_median"]["d/c"]["after"] == 1.4
    # A version whose every run failed compares to nothing, not to zero
    assert ab.compare(before, [])["vicuna"]["ratios_median"]["d/c"]["after_over_before"] is None


def test_ab_compares_a_benchmark_older_than_the_median_keys():
    """benchmark.py before tokens_per_second_median (e.g. 37e3b60): the same quantity from its step times."""
    ab = load_script("benchmark_ab")
    old = {"workloads": {"long": {"systems": {
        "c": {"plain_tokens_per_step": 8000.0, "step_seconds_median": 40.0, "tokens_per_second": 190.0},
        "d": {"plain_tokens_per_step": 8000.0, "step_seconds_median": 16.0, "tokens_per_second": 480.0}},
        "ratios": {"d/c": 2.53}}}}
    new = {"workloads": {"long": {"systems": {"c": {"tokens_per_second_median": 210.0},
                                              "d": {"tokens_per_second_median": 525.0}}, "ratios": {"d/c": 2.5}}}}
    got = ab.compare([old], [new])["long"]
    assert got["tokens_per_second_median"]["c"]["before"] == 200.0 and got["ratios_median"]["d/c"]["before"] == 2.5
    assert got["tokens_per_second_median"]["c"]["after_over_before"] == 1.05
    assert got["ratios_median"]["d/c"]["after_over_before"] == 1.0


@pytest.mark.parametrize("argv, message", [
    (["--json", "x.json"], "the following arguments are required: --before"),
    (["--before", "no-such-commit-or-folder", "--json", "x.json"], "neither a folder nor a commit"),
    (["--before", "HEAD", "--json", "missing/x.json"], "no such folder"),
    (["--before", "HEAD", "--json", "x.json", "--", "--json", "y.json"], "--json after `--`"),
], ids=["no-before", "unknown-version", "json-folder", "json-twice"])
def test_ab_refuses_bad_settings_before_running_anything(argv, message, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_ab.py"), *argv], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_ab_runs_both_versions_and_leaves_no_worktree(tmp_path):
    """HEAD (a detached worktree) against this checkout, one round, the smallest benchmark: both runs' JSON, the
    comparison per system, and the worktree gone afterwards."""
    out = tmp_path / "ab.json"
    before = subprocess.run(["git", "worktree", "list"], cwd=REPO, capture_output=True, text=True).stdout
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_ab.py"), "--before", "HEAD", "--json",
                           str(out), "--", "--size", "tiny", "--steps", "1", "--warmup", "0", "--workloads", "vicuna",
                           "--systems", "c,d", "--batch", "2", "--max-length", "96"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["complete"] and report["before"]["version"].startswith("commit ")
    assert report["after"]["version"].startswith(f"folder {REPO}")
    assert len(report["before"]["runs"]) == len(report["after"]["runs"]) == 1
    rows = report["comparison"]["vicuna"]["tokens_per_second_median"]
    assert set(rows) == {"c", "d"} and all(r["after_over_before"] > 0 for r in rows.values())
    assert set(report["comparison"]["vicuna"]["ratios_median"]) == {"d/c"}
    assert subprocess.run(["git", "worktree", "list"], cwd=REPO, capture_output=True, text=True).stdout == before
