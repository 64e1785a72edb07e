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


# ----------------------------------------------------------------------------------------------------- ablation
def _ablation_module():
    """scripts/nca_reproduce/ablation.py, imported as the package's module (the package lives under scripts/)."""
    import importlib

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        return importlib.import_module("nca_reproduce.ablation")
    finally:
        sys.path.remove(str(REPO / "scripts"))


def test_ablation_interval_and_verdict():
    ab = _ablation_module()
    d = ab.paired_interval([0.01, 0.02, 0.03, 0.04, 0.05])  # mean 0.03, std 0.0158, t(4) = 2.776
    assert d["mean"] == pytest.approx(0.03)
    assert d["ci95"] == pytest.approx([0.03 - 2.776 * 0.0158114 / 5**0.5, 0.03 + 2.776 * 0.0158114 / 5**0.5], abs=1e-5)
    assert ab.verdict(d) == "better"
    assert ab.verdict(ab.paired_interval([-0.02, -0.021, -0.019])) == "worse"
    assert ab.verdict(ab.paired_interval([-0.02, -0.03, -0.01])) == "no detectable difference"  # t(2) = 4.303
    assert ab.verdict(ab.paired_interval([-0.02, 0.03, 0.0])) == "no detectable difference"
    assert ab.paired_interval([0.5])["ci95"] is None and ab.verdict(ab.paired_interval([0.5])) is None


def test_ablation_decisions_follow_the_plan():
    """decide() on synthetic results: dropping ties wins on every seed -> `ties: drop`; reference previous is noise ->
    `initial` stays; an arm better than both main DPO baselines is listed, one better than only one is not."""
    ab = _ablation_module()
    seeds = [0, 1, 2, 3, 4]
    noise = [0.004, -0.003, 0.001, -0.002, 0.0]
    final = {name: 0.70 for name in ab.ARMS}
    per_seed = {}
    for i, s in enumerate(seeds):
        rewards = dict(final)
        for name in ("NCA ties dropped", "InfoNCA ties dropped", "hard: NCA ties dropped", "hard: InfoNCA ties dropped"):
            rewards[name] = 0.75 + noise[i]
        rewards["NCA reference previous"] = 0.70 + 10 * noise[i]
        rewards["DPO beta=1"] = 0.74 + noise[(i + 1) % 5]  # the strong DPO: ties dropped still beat it (0.75)
        per_seed[str(s)] = {"rounds": {n: [{"round": 0, "reward_mean": 0.6}, {"round": 1, "reward_mean": r}]
                                       for n, r in rewards.items()}}
    d = ab.decide(per_seed, seeds)
    assert d["ties"]["verdict"] == "better" and d["ties"]["default"] == "drop"
    assert d["reference"]["verdict"] == "no detectable difference" and d["reference"]["default"] == "initial"
    assert d["all_k_vs_best_vs_worst"]["NCA"]["DPO beta=1"]["verdict"] == "worse"
    assert d["all_k_arms_that_beat_every_dpo_baseline"] == [
        "InfoNCA ties dropped", "NCA ties dropped", "hard: InfoNCA ties dropped", "hard: NCA ties dropped"]
    flat = ab.decide({str(s): {"rounds": {n: [{"round": 0, "reward_mean": 0.6}, {"round": 1, "reward_mean": 0.7 + e}]
                                          for n in ab.ARMS}} for s, e in zip(seeds, noise)}, seeds)
    assert flat["ties"]["default"] == "keep" and flat["all_k_arms_that_beat_every_dpo_baseline"] == []


@pytest.mark.slow
def test_ablation_quick_mode(tmp_path):
    """`--experiments ablation --quick`: every arm of the plan and both seeds in results.json, the same SFT start per
    task and seed, ties dropped only where asked, DPO matched steps taking NCA's steps, the table and the figure.
    One round per online arm (`--quick` runs two; the iterate tests cover later rounds), which halves the suite's
    longest test."""
    ab = _ablation_module()
    proc = run_script("--quick", "--experiments", "ablation", "--out", str(tmp_path), "--work-dir",
                      str(tmp_path / "work"), "--set", "ablation.rounds=1", timeout=900)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) >= ["command"] and "iterative" not in results and results["seeds"] == [0, 1]
    out = results["ablation"]
    assert set(out["per_seed"]) == {"0", "1"}
    bad = [(p, v) for p, v in numbers(results) if not math.isfinite(v)]
    assert not bad, bad
    for seed, entry in out["per_seed"].items():
        runs = entry["rounds"]
        assert set(runs) == set(ab.ARMS)
        for task in ("main", "hard"):
            starts = {json.dumps(run[0]) for name, run in runs.items() if ab.ARMS[name][0] == task}
            assert len(starts) == 1, (seed, task, starts)
        cfg = results["settings"]["ablation"]
        assert runs["DPO matched steps"][1]["train_steps"] == cfg["epochs"] * math.ceil(
            cfg["prompts_per_round"] / cfg["batch_size"]) == runs["NCA"][1]["train_steps"]
        for name, run in runs.items():
            assert len(run) == (2 if ab.ARMS[name][2] else cfg["rounds"] + 1), name
            if "ties dropped" not in name and ab.ARMS[name][1] != "dpo":
                assert all(r["ties_dropped"] == 0 for r in run), name
    assert set(out["paired_vs_DPO"]) == set(ab.ARMS) - {"DPO", "hard: DPO"}
    assert all(row["ci95"] is not None for rows in out["paired_vs_DPO"].values() for row in rows)
    assert out["decisions"]["ties"]["default"] in ("keep", "drop")
    summary = (tmp_path / "summary.md").read_text()
    assert "Ablation (pre-registered" in summary and "Decisions" in summary and "hard: InfoNCA ties dropped" in summary
    assert (tmp_path / "ablation_reward.png").read_bytes()[:8] == PNG_MAGIC


def test_defaults_are_the_ablations_decisions():
    """The defaults of `ties` (train) and `reference` (iterate) are what the committed, pre-registered ablation
    decided (results/ablation/results.json); rerunning it with another outcome fails here until the default follows."""
    import dataclasses

    from nca_trl import InfoNCAConfig, NCAConfig
    from nca_trl.iterate.arguments import IterateArguments

    decisions = json.loads((REPO / "results" / "ablation" / "results.json").read_text())["ablation"]["decisions"]
    defaults = {f.name: f.default for f in dataclasses.fields(IterateArguments)}
    assert defaults["reference"] == decisions["reference"]["default"]
    for config in (NCAConfig, InfoNCAConfig):
        assert {f.name: f.default for f in dataclasses.fields(config)}["ties"] == decisions["ties"]["default"]
    plan = (REPO / "results" / "ablation" / "PLAN.md").read_text()
    assert "Written and committed before any of its results were run" in plan


def test_the_identity_experiment_reads_hh_in_a_fresh_clone(tmp_path):
    """`python scripts/reproduce.py` (the README's command) read Anthropic HH from `../shared` only: in a fresh clone
    it dropped the HH source, and its results.json lacked the committed `identity.hh` block. It falls back to the rows
    tests/data ships, which give the same 16 pairs as the full split."""
    import shutil

    clone = tmp_path / "clone"  # no `shared` beside it
    shutil.copytree(PACKAGE, clone / "scripts" / "nca_reproduce")
    (clone / "tests" / "data").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "data" / "hh_helpful_test.jsonl", clone / "tests" / "data")
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from nca_reproduce import identity; "
            "print(json.dumps(identity.real_pairs('hh', 16) if identity.HH.exists() else None))")
    out = subprocess.run([sys.executable, "-c", code, str(clone / "scripts")], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    pairs = json.loads(out.splitlines()[-1])
    assert pairs is not None and len(pairs) == 16 and all(p["chosen"] != p["rejected"] for p in pairs)
    shared = REPO.parent / "shared" / "data" / "hh_helpful_test.jsonl"
    if shared.exists():  # the full split gives the same pairs (the shortest of its first 64 rows)
        sys.path.insert(0, str(REPO / "scripts"))
        try:
            import importlib

            identity = importlib.import_module("nca_reproduce.identity")
        finally:
            sys.path.remove(str(REPO / "scripts"))
        assert identity.HH == shared and identity.real_pairs("hh", 16) == pairs
