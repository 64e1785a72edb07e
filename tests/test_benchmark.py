"""Smoke test: the benchmark script runs end to end on a tiny model and writes well-formed JSON."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert set(workload["ratios"]) == {"b/a", "d/c", "d/a"}
    for metrics in workload["systems"].values():
        for key in ("tokens_per_second", "peak_rss_mb", "mfu", "mfu_8nt", "seconds_per_prompt"):
            assert math.isfinite(metrics[key]) and metrics[key] > 0, key
    # Equal work: c and d see the same plain-layout tokens; d processes fewer (the prompt once, no padding)
    c, d = workload["systems"]["c"], workload["systems"]["d"]
    assert c["plain_tokens_per_step"] == d["plain_tokens_per_step"]
    assert d["processed_tokens_per_step"] < c["processed_tokens_per_step"]
