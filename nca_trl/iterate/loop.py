"""`nca-trl iterate`: R rounds of generate -> score -> train from your own prompts, keeping all K rated completions.

```bash
nca-trl make-tiny-model outputs/tiny-digits --vocab digits
nca-trl iterate --config recipes/tiny/iterate_nca.yaml              # 3 rounds, on a CPU too
nca-trl iterate --config recipes/tiny/iterate_nca.yaml --rounds 4   # the same run, one more round
```

Round r: sample K completions for each prompt of round r's slice from round r-1's policy, score them, train round
r-1's policy on them (reference: round r-1's policy, the default, or with `reference: initial` the initial model) into
`round-r/model`, then evaluate it on the held-out prompts. The files are listed in `nca_trl.iterate.layout`; a killed
run restarted with the same command skips the stages `round-r/status.json` lists as done and continues the stage it
was in (`generate` from its chunks, `train` from its last complete checkpoint).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from types import SimpleNamespace

from ..runtime.errors import SettingsError
from ..runtime.files import WEIGHT_SUFFIXES, files_digest, json_digest
from ..runtime.paths import check_path_settings
from .arguments import PATH_SETTINGS, IterateArguments, parse_iterate_args
from .layout import RunLayout, log, read_jsonl, write_json, write_jsonl
from .stages import run_generate, run_score, run_train

__all__ = ["iterate", "plan_rounds"]

# Settings a restart may change: they change no sample, reward or update (`output_dir`: where the run is, which the
# manifest is in, however it is spelled)
_RESTARTABLE = ("rounds", "generation_batch_size", "scoring_batch_size", "eval_batch_size", "overwrite_output_dir",
                "output_dir")
#: Settings that only some stages read, and those stages (`round-r/status.json`'s names): they may change while none of
#: those stages has finished
_READ_BY = {"training": {"train"}, "reward_model": {"score", "eval"}, "reward_funcs": {"score", "eval"},
            "reward_weights": {"score", "eval"}, "reward_model_files_digest": {"score", "eval"},
            "reward_funcs_files_digest": {"score", "eval"}}
#: What the run's inputs held (`_input_digests`), compared on a restart; a run recorded without one is compared
#: without it
_DIGESTS = ("prompts_sha256", "model_files_digest", "reward_model_files_digest", "reward_funcs_files_digest")


def plan_rounds(num_prompts: int, args: IterateArguments) -> tuple[int, range]:
    """(prompts per round, the rows of the held-out prompts); refuses a split too small for the rounds asked."""
    train_pool = num_prompts - args.heldout_prompts
    if train_pool < 1:
        raise SettingsError(f"{args.dataset_name} has {num_prompts} prompts: none left for training after "
                         f"`heldout_prompts={args.heldout_prompts}`.")
    per_round = args.prompts_per_round or train_pool // args.rounds
    if per_round < 1 or per_round * args.rounds > train_pool:
        raise SettingsError(
            f"{args.rounds} rounds x {per_round} prompts need {args.rounds * max(per_round, 1)} training prompts, but "
            f"{args.dataset_name} has {num_prompts} prompts, {args.heldout_prompts} of them held out "
            f"(`heldout_prompts`): lower `rounds`, `prompts_per_round` or `heldout_prompts`, or add prompts."
        )
    return per_round, range(num_prompts - args.heldout_prompts, num_prompts)


def _check_manifest(layout: RunLayout, settings: dict, overwrite: bool = False) -> None:
    """First run: write the settings. Restart: they must match, except the ones in `_RESTARTABLE`; with `overwrite`
    (`--overwrite_output_dir true`) a run of other settings is removed first (its rounds, results and settings)."""
    from ..runtime.output_dir import FinishedRunError, changed_settings, finished_run_message

    if layout.removing.exists():
        log(f"finishing the removal of the run in {layout.root} that a stopped --overwrite_output_dir began")
        _remove_run(layout)
    if not layout.manifest.exists():
        write_json(layout.manifest, settings)
        return
    recorded = json.loads(layout.manifest.read_text())
    # The prompts' content (a run of an nca-trl that did not record it is compared without it): the same file name
    # with its lines moved put held-out prompts into later rounds' training slices
    # Likewise the files of the initial model and the reward sources: the same path overwritten (`make-tiny-model
    # --overwrite`, a retrained model) gave later rounds another reference and initial model than the earlier ones'
    old = tuple(key for key in _DIGESTS if key not in recorded)
    changed = changed_settings(*(_same_paths(d) for d in (recorded, settings)), ignore=_RESTARTABLE + old)
    # Settings that only stages none of which has finished read may change: `training:` before a round trained (e.g.
    # round 1's training refused a `max_length`), the reward sources before a score or an evaluation (round 0's
    # evaluation failed on a reward function that returned None for every completion)
    done = {stage for r in _rounds(layout) for stage in layout.status(r)}
    free = {name for name, stages in _READ_BY.items() if not done & stages}
    if changed and all(c.split(":", 1)[0] in free for c in changed):
        log(f"no stage that reads them has finished: taking the changed settings ({'; '.join(changed)})")
        if any(c.startswith("training:") for c in changed):  # no round has trained: a model folder is checkpoints
            for model in [layout.model(r) for r in _rounds(layout) if layout.model(r).exists()]:
                log(f"removing {model}: checkpoints of the earlier `training:` settings, which a resume would continue")
                shutil.rmtree(model)
        changed = []
    # Fewer rounds than the run has finished: its results file would be written without the later rounds (and name
    # an earlier policy as the final one), the finished rounds left behind in `output_dir`
    finished = [r for r in _rounds(layout) if r > settings.get("rounds", r) and _done(layout.status(r), "eval")]
    if finished:
        changed.append(f"rounds: {max(finished)} finished -> {settings['rounds']}")
    if changed and not overwrite:
        raise FinishedRunError(finished_run_message(
            str(layout.root), "an iterate run (iterate.json)", changed, "--overwrite_output_dir",
            "`output_dir`; or restart with the same settings (only `rounds`, not below the rounds finished, and "
            "batch sizes may change) to continue it"))
    if changed:
        log(f"--overwrite_output_dir: removing the run of other settings in {layout.root} ({'; '.join(changed[:3])})")
        _remove_run(layout)
    write_json(layout.manifest, settings)


def _input_digests(args: IterateArguments) -> dict:
    """`files_digest` (16 hex digits) of the local initial model and reward model, and of the reward functions' files
    (`path/file.py:function`, or a top-level module found on the path without importing it); None where not local."""
    import importlib.util

    def short(path) -> str | None:  # a model folder by its weights and config (a model card, a chat template added
        digest = files_digest(path, names=_model_input) if path else None  # to fix round 0, are the same model)
        return digest[:16] if digest else None

    funcs = {}
    for spec in args.reward_funcs or []:
        source, _, _ = spec.rpartition(":") if ":" in spec else spec.rpartition(".")
        if source.endswith(".py"):
            funcs[spec] = short(source)
        elif source and "." not in source:
            try:
                found = importlib.util.find_spec(source)
            except (ImportError, ValueError):
                found = None
            origin = getattr(found, "origin", None)
            funcs[spec] = short(origin) if origin and origin not in ("built-in", "frozen") else None
    return {"model_files_digest": short(args.model_name_or_path), "reward_model_files_digest": short(args.reward_model),
            "reward_funcs_files_digest": funcs}


def _model_input(name: str) -> bool:
    """The files of a model folder its digest reads: weights, their index, the config."""
    return name == "config.json" or name.endswith(WEIGHT_SUFFIXES)


def _remove_run(layout: RunLayout) -> None:
    """The run's rounds, results and settings removed (other files kept), behind a marker written first and removed
    last: a run stopped mid-way leaves the marker, and the next start finishes the removal before it reads anything,
    so that what is left of the run (some rounds, its settings) is never taken for a run to continue."""
    layout.removing.touch()
    # The run's `round-<r>` folders only: a `round-notes.md` of the user's beside them is kept
    for path in [*map(layout.round_dir, _rounds(layout)), layout.heldout, layout.results, layout.curves,
                 layout.manifest]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    layout.removing.unlink()


def _same_paths(settings: dict) -> dict:
    """`settings` with each local path setting as its real path: `./prompts.jsonl` and its absolute spelling are the
    same file."""
    import os

    return {key: os.path.realpath(value) if key in PATH_SETTINGS and isinstance(value, str) and os.path.exists(value)
            else value for key, value in settings.items()}


def _rounds(layout: RunLayout) -> list[int]:
    """The rounds that have a folder in `output_dir`."""
    return sorted(int(n) for n in (f.name.removeprefix("round-") for f in layout.root.glob("round-*")) if n.isdigit())


def _check_prompts(args, dataset, per_round: int) -> None:
    """Every prompt checked as `nca-trl generate` checks them, naming the user's file and row, before `output_dir` is
    written: a bad prompt among the held-out ones was met at round 0's evaluation, named in `heldout_prompts.jsonl`,
    and the fixed file was then refused as other settings (its digest is the run's)."""
    from transformers import AutoTokenizer

    from ..generation.rows import check_prompts

    generate = args.stages.generate
    tokenizer = AutoTokenizer.from_pretrained(generate.model_name_or_path, revision=generate.model_revision,
                                              trust_remote_code=generate.trust_remote_code)
    check_prompts(dataset, tokenizer, args.dataset_name, generate.model_name_or_path)
    _check_training_room(args, dataset, per_round, tokenizer)


def _check_training_room(args, dataset, per_round: int, tokenizer) -> None:
    """A round whose every training prompt fills `training.max_length` (with `truncation_mode: keep_start`, each
    such row is dropped) is refused now, naming the round: it was refused at that round's training, after round 0's
    evaluation and the round's sampling and scoring had run. The prompts are tokenized as the trainer tokenizes
    them, with a one-token completion. `loss: dpo` (trl.DPOTrainer truncates, drops nothing) is not checked."""
    from ..data.tokenize import tokenize_rated_example
    from trl.data_utils import is_conversational

    config = getattr(args.stages.train, "training", None)  # `nca-trl train`'s arguments; a DPOConfig has none
    if config is None or config.max_length is None or config.truncation_mode != "keep_start":
        return
    eos = tokenizer.eos_token or ""
    for r in range(1, args.rounds + 1):
        rows = range((r - 1) * per_round, r * per_round)
        lengths = []
        for i in rows:
            row = dataset[i]
            one = [{"role": "assistant", "content": "x"}] if is_conversational({"prompt": row["prompt"]}) else "x"
            example = {**row, "completions": [one], "rewards": [0.0]}
            lengths.append(len(tokenize_rated_example(example, tokenizer, eos, row=i)["prompt_ids"]))
        if lengths and min(lengths) >= config.max_length:
            shortest = min(lengths)
            raise SettingsError(
                f"{args.dataset_name}: each training prompt of round {r} (rows {rows.start}-{rows.stop - 1}) alone "
                f"fills `max_length: {config.max_length}` of the `training:` mapping (shortest {shortest} tokens, row "
                f"{rows.start + lengths.index(shortest)}), so that round's training would drop every row. Fix: raise "
                f"`max_length` above {shortest} in `training:`, or set `truncation_mode: keep_end` there. Nothing was "
                "written.")


def _rows(dataset, indices) -> list[dict]:
    return [dataset[i] for i in indices]


def _evaluate(args, layout: RunLayout, r: int, policy: str, main: bool) -> dict:
    """Sample the held-out prompts from `policy` (every process), score and measure them (main process)."""
    from transformers import AutoTokenizer

    from .evaluate import kl_to_initial, round_metrics

    folder = layout.eval_dir(r)
    samples, rated = folder / "samples.jsonl", folder / "rated.jsonl"
    run_generate(args, policy, layout.heldout, samples, seed=args.seed)
    if not main:
        return {}
    run_score(args, samples, rated, evaluation=True)
    samples_rows, rated_rows = read_jsonl(samples), read_jsonl(rated)
    trust = args.stages.generate.trust_remote_code  # the training's `trust_remote_code`
    kl = 0.0 if r == 0 else kl_to_initial(samples_rows, policy, args.model_name_or_path, args.generation_dtype,
                                          args.eval_batch_size, trust)
    tokenizer = AutoTokenizer.from_pretrained(policy, trust_remote_code=trust)
    metrics = {"round": r, **round_metrics(samples_rows, rated_rows, tokenizer, kl)}
    write_json(folder / "metrics.json", metrics)
    return metrics


# How often the other processes of a launch look for the main process's mark of a stage it runs alone (seconds)
_POLL_S = 2.0


def _wait_for_main(state, layout: RunLayout, r: int, stage: str) -> None:
    """The other processes of a launch wait for the main process's `stage` of round r (scoring, the evaluation, which
    it runs alone) by its mark in `status.json`, then meet it in a barrier: a collective over the whole stage timed
    out while the main process scored (NCCL's and DeepSpeed's default: 10 minutes; a reward model scoring 80,000
    completions takes longer). A main process that fails ends the launch (its launcher stops the others)."""
    if not state.is_main_process:
        while not _done(layout.status(r), stage):
            time.sleep(_POLL_S)
    state.wait_for_everyone()


def _done(status: dict, stage: str) -> bool:
    """Whether a round's `status.json` lists `stage` as done (an evaluation: with every held-out sample scored, empty
    ones too; one of an older nca-trl left them out and runs again)."""
    return "empty_completions" in status.get("eval", {}) if stage == "eval" else stage in status


def _state():
    from ..runtime.environment import distributed_state

    return distributed_state()


def iterate(argv: list[str] | None = None) -> dict | None:
    """`nca-trl iterate`: returns the results (`iterate_results.json`) on the main process, None on the others."""
    from ..generation import load_prompts
    from ..runtime.output_dir import claim_output_dir
    from .report import plot_rounds, rounds_table

    args = parse_iterate_args(argv)
    check_path_settings([], PATH_SETTINGS, vars(args))  # before `output_dir` is created or any model loads
    state = _state()
    layout = RunLayout(args.output_dir)
    main = state.is_main_process
    lock_args = SimpleNamespace(output_dir=str(layout.root), distributed_state=state,
                                process_index=state.process_index, local_process_index=state.local_process_index,
                                world_size=state.num_processes, should_save=main)
    dataset = load_prompts(SimpleNamespace(dataset_name=args.dataset_name, dataset_config=args.dataset_config,
                                           dataset_split=args.dataset_split, max_prompts=None))
    if args.prompts_per_round is None and layout.manifest.exists() and not args.overwrite_output_dir \
            and not layout.removing.exists():
        # A restart (`--rounds N` too) keeps the split of the run: computed from `rounds`, it would change with it
        args.prompts_per_round = json.loads(layout.manifest.read_text()).get("prompts_per_round")
    per_round, heldout = plan_rounds(len(dataset), args)  # refused before `output_dir` exists
    _check_prompts(args, dataset, per_round)
    with claim_output_dir(lock_args):  # creates `output_dir`; removed again if the run stops before writing to it
        settings = {k: v for k, v in asdict(args).items()}
        settings.update(num_prompts=len(dataset), prompts_sha256=json_digest(dataset.to_list()),
                        prompts_per_round=per_round, **_input_digests(args))
        if main:
            _check_manifest(layout, settings, args.overwrite_output_dir)
            if not layout.heldout.exists():
                write_jsonl(layout.heldout, _rows(dataset, heldout))
        state.wait_for_everyone()
        log(f"{args.rounds} round(s) x {per_round} prompts x {args.num_completions} completions, loss {args.loss}, "
             f"reference {args.reference}; {len(heldout)} held-out prompts; output in {layout.root}")
        if args.stages.ignored_training_fields:
            log(f"dpo: ignoring the training field(s) {args.stages.ignored_training_fields} (NCA / nca-trl train "
                "only)")

        results = []
        for r in range(args.rounds + 1):
            results.append(_round(args, layout, r, per_round, dataset, state))
            if main:
                summary = {"rounds": results, "settings": settings}
                write_json(layout.results, summary)
                plot_rounds(results, layout.curves, title=f"nca-trl iterate ({args.loss})")
        if main:
            print(rounds_table(results), flush=True)
            log(f"results: {layout.results}; plot: {layout.curves}; final policy: "
                 f"{layout.model(args.rounds) if args.rounds else args.model_name_or_path}")
    from ..runtime.environment import end_process_group

    end_process_group(state)
    return summary if main else None


def _round(args, layout: RunLayout, r: int, per_round: int, dataset, state) -> dict:
    """Run what is left of round r (round 0: the initial model's evaluation only); returns its metrics. Sampling and
    training run on every process; scoring, the evaluation numbers and the files on the main process."""
    from ..runtime.environment import broadcast

    main = state.is_main_process
    status = broadcast(state, layout.status(r) if main else None)
    if _done(status, "eval"):
        log(f"round {r}: done (round-{r}/status.json), skipping")
        return status["eval"]
    if "eval" in status:  # evaluated before every held-out sample was scored: its mean left empty answers out
        log(f"round {r}: its evaluation left empty answers out (an older nca-trl): evaluating it again")
    policy = args.model_name_or_path if r <= 1 else str(layout.model(r - 1))
    if r > 0:
        if main and not layout.prompts(r).exists():
            write_jsonl(layout.prompts(r), _rows(dataset, range((r - 1) * per_round, r * per_round)))
        state.wait_for_everyone()
        if "generate" not in status:
            log(f"round {r}: sampling {per_round} prompts from {policy}")
            sidecar = run_generate(args, policy, layout.prompts(r), layout.samples(r), seed=args.seed + r)
            if main:
                layout.mark_done(r, "generate", sidecar["stats"])
        if "score" not in status:
            if main:
                layout.mark_done(r, "score", run_score(args, layout.samples(r), layout.rated(r)).get("stats", {}))
            _wait_for_main(state, layout, r, "score")
        if "train" not in status:
            reference = args.model_name_or_path if r > 1 and args.reference == "initial" else None
            info = run_train(args, r, policy, reference, layout.rated(r), layout.model(r))
            if main:
                layout.mark_done(r, "train", info)
        policy = str(layout.model(r))
        state.wait_for_everyone()
    metrics = _evaluate(args, layout, r, policy, main)
    if main:
        train = layout.status(r).get("train", {})
        metrics.update(train_prompts=train.get("train_prompts", 0), train_loss=train.get("train_loss"),
                       train_steps=train.get("train_steps", 0), ties_dropped=train.get("ties_dropped", train.get("ties_left_out", 0)))
        layout.mark_done(r, "eval", metrics)
        log(f"round {r}: held-out reward {metrics['reward_mean']:.4f} (best of {args.num_completions} "
             f"{metrics['reward_best_of_k']:.4f}), KL to initial {metrics['kl_to_initial']:.3f}, "
             f"length {metrics['length_mean']:.1f}")
    _wait_for_main(state, layout, r, "eval")
    return metrics
