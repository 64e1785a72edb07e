"""Smoke test of `scripts/reproduce.py --quick`: every experiment runs end to end and writes well-formed outputs.

Also: the entry point is thin over the package `scripts/nca_reproduce/` (one module per experiment), which imports
`nca_trl` as an installed package, with no sys.path edit."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "reproduce.py"
PACKAGE = REPO / "scripts" / "nca_reproduce"
METHODS = ("DPO", "InfoNCA", "NCA")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def numbers(obj, path="$"):
    """Every (path, number) in a JSON tree."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numbers(v, f"{path}[{i}]")


def run_script(*args, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_layout_thin_entry_point_no_path_hack():
    modules = sorted(PACKAGE.glob("*.py"))
    names = {m.name for m in modules}
    assert {"identity.py", "trend.py", "ground_truth.py", "common.py", "cli.py"} <= names, names
    assert len(SCRIPT.read_text().splitlines()) < 40
    for path in [SCRIPT, *modules]:
        text = path.read_text()
        assert len(text.splitlines()) < 500, path.name
        assert "sys.path" not in text, path.name


def test_help_and_unknown_setting():
    proc = run_script("--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--out", "--quick", "--experiments", "--seeds", "--threads", "--set", "--work-dir"):
        assert flag in proc.stdout
    proc = run_script("--set", "trend.no_such_knob=1", "--out", str(REPO / "outputs" / "never-written"))
    assert proc.returncode == 2 and "unknown setting 'trend.no_such_knob'" in proc.stderr


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    proc = run_script("--quick", "--out", str(out), "--work-dir", str(out / "work"), timeout=900)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return out, proc.stdout


@pytest.mark.slow
def test_outputs_exist_and_are_pngs(quick_run):
    out, _ = quick_run
    for name in ("likelihood_trend.png", "ground_truth_reward.png"):  # --quick runs one lr: no extra trend figure
        path = out / name
        assert path.exists(), name
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5_000, name
        import matplotlib.image

        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300
    assert "Likelihood trend" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_results_json_well_formed(quick_run):
    out, stdout = quick_run
    results = json.loads((out / "results.json").read_text())
    for key in ("command", "settings", "versions", "seconds", "identity", "trend", "reward", "iterative"):
        assert key in results, key
    bad = [(p, v) for p, v in numbers(results) if not math.isfinite(v)]
    assert not bad, bad

    # Identity: InfoNCA(K=2, alpha=0) is DPO, to float32 rounding
    identity = results["identity"]
    assert "vicuna" in identity["sources"]
    for source in identity["sources"]:
        r = identity[source]
        for level in r["loss_level"].values():
            assert level["max_abs_loss_diff"] < 1e-6 and level["max_abs_grad_diff"] < 1e-6
        padded = r["trainer_level"]["padded"]
        assert padded["max_abs_loss_diff"] < 1e-6 and padded["max_rel_grad_diff"] < 1e-5
        assert r["trainer_level"]["shared_prompt"]["max_abs_loss_diff"] < 1e-3
        assert len(padded["per_example"]) == r["num_pairs"] > 0

    # Likelihood trend: one curve per lr, method and seed, all starting at the same SFT checkpoint
    trend = results["trend"]
    seeds = [str(s) for s in results["seeds"]]
    assert trend["main_lr"] in trend["by_lr"]
    for entry in trend["by_lr"].values():
        for method in METHODS:
            assert set(entry["runs"][method]) == set(seeds)
            for seed in seeds:
                run = entry["runs"][method][seed]
                assert run["steps"][0] == 0 and run["steps"] == sorted(run["steps"]) and len(run["steps"]) >= 2
                for name in ("heldout", "train"):
                    curve = run[name]
                    assert len(curve["chosen"]) == len(curve["rejected"]) == len(run["steps"])
                    assert all(v < 0 for v in curve["chosen"] + curve["rejected"])  # log-likelihoods
                    start = entry["runs"]["DPO"][seed][name]["chosen"][0]
                    assert curve["chosen"][0] == pytest.approx(start, abs=1e-3)
                    assert run[f"{name}_chosen_change"] == pytest.approx(curve["chosen"][-1] - curve["chosen"][0])
            summary = entry["summary"][method]
            assert len(summary["heldout_chosen_change"]["values"]) == len(seeds)
            assert set(summary) == {f"{n}_{k}_change" for n in ("heldout", "train") for k in ("chosen", "rejected")}

    # Ground-truth reward task: SFT and every method evaluated, rewards and exact match in [0, 1]
    reward = results["reward"]
    for name in ("SFT", *METHODS):
        for metric in ("reward", "exact_match"):
            s = reward["summary"][name][metric]
            assert 0.0 <= s["mean"] <= 1.0 and s["std"] >= 0.0 and len(s["values"]) == len(seeds)
    assert reward["main_setting"] in reward["grid_summary"]
    for seed in seeds:
        samples = reward["per_seed"][seed]["samples"]
        assert 0 < samples["num_used"] <= samples["num_prompts"]
        assert samples["mean_worst_reward"] <= samples["mean_sample_reward"] <= samples["mean_best_reward"]
    assert "[identity]" in stdout and "[trend]" in stdout and "[reward]" in stdout

    # Iterative training through `nca-trl iterate`: every method starts at the same SFT evaluation (round 0); the
    # iterative ones run every round on their own slices, the offline one a single round on all of them
    iterative = results["iterative"]
    rounds = results["settings"]["iterative"]["rounds"]
    for seed in seeds:
        runs = iterative["per_seed"][seed]["rounds"]
        assert len({json.dumps(run[0], sort_keys=True) for run in runs.values()}) == 1
        for name, run in runs.items():
            assert [r["round"] for r in run] == list(range(2 if name == "NCA offline" else rounds + 1))
            assert all(0 <= r["reward_mean"] <= r["reward_best_of_k"] <= 1 for r in run)
            assert run[0]["kl_to_initial"] == 0 and run[-1]["kl_to_initial"] != 0
        assert runs["NCA offline"][1]["train_prompts"] == sum(r["train_prompts"] for r in runs["NCA"])
    assert set(iterative["paired_final_vs_DPO"]) == {"InfoNCA", "NCA", "NCA offline"}
    assert "[iterative]" in stdout and "Iterative training" in (out / "summary.md").read_text()
    assert (out / "iterative_reward.png").read_bytes()[:8] == PNG_MAGIC
