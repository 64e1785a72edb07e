"""The stages beside training: generate_long (sampling from long prompts), iterate (one `nca-trl iterate` round) and
layouts_median (scripts/gpu_families.py, then scripts/benchmark.py --layouts); the package's docstring says what each
measures."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys

from .common import FAMILIES_LIMIT, REPO, SCRIPTS, SORT_PROMPTS, StageError, run_child
from .measure import long_prompt_rows
from .models import build_digits_reward_model
from .run import Run


def stage_generate_long(run: Run) -> None:
    from nca_trl.generation.benchmark import main as generation_benchmark

    s, res = run.sizes, run.result
    model, shape = run.model("mistral")
    rows, stats = long_prompt_rows(model, s.gen_prompt_tokens, 4 * s.gen_prompt_tokens)
    prompts = run.work / f"prompts-{s.gen_prompt_tokens}.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows[: s.gen_prompts]))
    methods = ("num_return_sequences", "prefill_once_hf", "prefill_once_seeded")
    argv = ["--model_name_or_path", str(model), "--dtype", "bfloat16" if run.gpu else "float32", "--prompts",
            str(prompts), "--num_prompts", str(s.gen_prompts), "--num_completions", str(s.gen_completions),
            "--max_new_tokens", str(s.gen_new_tokens), "--repeats", str(s.gen_repeats), "--methods", ",".join(methods)]
    res["command"] = shlex.join(["python", "-m", "nca_trl.generation.benchmark", *argv])
    res["shape"].update(model=shape, prompts=stats | {"rows": s.gen_prompts})
    res["settings"].update(num_completions=s.gen_completions, max_new_tokens=s.gen_new_tokens,
                           repeats=s.gen_repeats, methods=list(methods), timing="best of the repeats after a warm-up")
    results = generation_benchmark(argv)
    setup = results.pop("_setup")
    res["shape"]["prompts"]["mean_prompt_tokens"] = setup["mean_prompt_tokens"]
    expected = s.gen_prompts * s.gen_completions * s.gen_new_tokens
    wrong = {m: r["tokens"] for m, r in results.items() if r["tokens"] != expected}
    if wrong:
        raise StageError(f"generated tokens {wrong}, expected {expected} per method: a stop token or a cache bug")
    nrs = results["num_return_sequences"]["tokens_per_s"]
    res["numbers"].update(
        methods=results, setup=setup,
        prefill_once_over_num_return_sequences=results["prefill_once_seeded"]["tokens_per_s"] / nrs,
        prefill_once_hf_over_num_return_sequences=results["prefill_once_hf"]["tokens_per_s"] / nrs,
    )


def stage_iterate(run: Run) -> None:
    import yaml

    s, res = run.sizes, run.result
    policy, shape = run.model("digits")
    reward_model = run.work / "model-digits-rm"
    if not (reward_model / "config.json").exists():
        build_digits_reward_model(reward_model)
    out = run.work / "runs" / "iterate"
    shutil.rmtree(out, ignore_errors=True)
    recipe = yaml.safe_load((REPO / "recipes" / "tiny" / "iterate_nca.yaml").read_text())
    recipe.update(model_name_or_path=str(policy), dataset_name=str(SORT_PROMPTS), output_dir=str(out), rounds=1,
                  prompts_per_round=s.iterate_prompts, heldout_prompts=s.iterate_heldout,
                  num_completions=s.iterate_completions, reward_model=str(reward_model),
                  reward_funcs=["nca_trl.scoring.functions:sorted_digits"])
    recipe["training"].update(num_train_epochs=1, disable_tqdm=True)
    recipe["training"].update({"dtype": "bfloat16", "bf16": True} if run.gpu else {"use_cpu": True})
    path = run.work / "runs" / "iterate.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    cmd = [sys.executable, "-m", "nca_trl.cli", "iterate", "--config", str(path)]
    res["command"] = shlex.join(cmd)
    res["shape"].update(model=shape, reward_model="tiny MistralForSequenceClassification, digits vocabulary")
    res["settings"].update({k: recipe[k] for k in ("rounds", "prompts_per_round", "heldout_prompts", "num_completions",
                                                    "reward_funcs", "loss")}, training=recipe["training"])
    seconds = run_child(cmd, run.left(10), "nca-trl iterate")
    status = json.loads((out / "round-1" / "status.json").read_text())
    info = json.loads((out / "round-1" / "model" / "run_info.json").read_text())
    results = json.loads((out / "iterate_results.json").read_text())
    res["numbers"].update(seconds=seconds, round_1_stages=sorted(status), train_device=info["device"],
                          rounds=[{k: r.get(k) for k in ("round", "reward_mean", "reward_best_of_k", "kl_to_initial")}
                                  for r in results["rounds"]])
    if not {"generate", "score", "train", "eval"} <= set(status):
        raise StageError(f"round 1 finished only {sorted(status)}: see the iterate log in gpu_scale.log")
    if [r["round"] for r in results["rounds"]] != [0, 1]:
        raise StageError(f"iterate_results.json holds rounds {[r['round'] for r in results['rounds']]}, not [0, 1]")
    if run.gpu and not str(info["device"]).startswith("cuda"):
        raise StageError(f"round 1 trained on {info['device']}, not the GPU: check `use_cpu` in the recipe")


def family_agreement(run: Run) -> tuple[dict | None, StageError | None]:
    """scripts/gpu_families.py (issue 26's check, where it has landed): per model family, the layout the automatic rule
    takes here and, where it is the shared-prompt one, its bf16 log-probs against the plain layout's and float32.
    Returns (its JSON, or None when the script is absent or wrote nothing; the error when it failed or disagreed)."""
    script = SCRIPTS / "gpu_families.py"
    if not script.exists():
        return None, None
    out = run.work / "runs" / "families.json"
    out.unlink(missing_ok=True)
    # the dry run takes two families (every family on 2 CPU cores would take over a minute)
    cmd = [sys.executable, str(script), "--out", str(out)] + (["--smoke", "--families", "mistral,mixtral"]
                                                              if run.smoke else [])
    run.result["settings"]["family_command"] = shlex.join(cmd)
    error = None
    try:
        run_child(cmd, min(FAMILIES_LIMIT, run.left(60)), "scripts/gpu_families.py")
    except StageError as e:  # it exits 1 when a family disagrees: its JSON says which
        error = e
    return (json.loads(out.read_text()) if out.exists() else None), error


def stage_layouts_median(run: Run) -> None:
    s, res = run.sizes, run.result
    families, families_error = family_agreement(run)
    res["numbers"]["family_agreement"] = families if families is not None else (
        "not run: scripts/gpu_families.py (issue 26) is absent" if families_error is None else None)
    out = run.work / "runs" / "layouts.json"
    out.unlink(missing_ok=True)
    systems = os.environ.get("LAYOUT_SYSTEMS", "a")
    cmd = [sys.executable, str(SCRIPTS / "benchmark.py"), "--layouts", "--systems", systems, *s.layouts, "--json",
           str(out)]
    res["command"] = shlex.join(cmd)
    res["settings"].update(systems=f"{systems} beside c (plain) and d:auto (shared-prompt)", arguments=list(s.layouts))
    error = None
    try:
        run_child(cmd, run.left(5), "scripts/benchmark.py --layouts")
    except StageError as e:  # keep the workloads it finished: the JSON is rewritten after each
        error = e
    if not out.exists():
        raise error or families_error or StageError("scripts/benchmark.py wrote no JSON")
    report = json.loads(out.read_text())
    res["shape"].update(model=report["model"])
    res["settings"].update(machine=report["machine"])
    res["numbers"].update(workloads={
        name: {"ratios": w["ratios"], "ratios_median": w["ratios_median"],
               "systems": {k: {f: v.get(f) for f in ("name", "kernel", "step_seconds_median", "step_seconds_min",
                                                       "step_seconds_max", "tokens_per_second",
                                                       "tokens_per_second_median", "mfu", "peak_gpu_memory_mb")}
                           for k, v in w["systems"].items()}}
        for name, w in report["workloads"].items()})
    wanted = [w for w in s.layouts[s.layouts.index("--workloads") + 1].split(",")]
    missing = [w for w in wanted if w not in report["workloads"]]
    if error or missing:
        raise error or StageError(f"workloads {missing} missing from the benchmark's JSON")
    if families_error:
        raise StageError(f"the family layout agreement failed: {families_error} (numbers.family_agreement says which)")
