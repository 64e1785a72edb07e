"""Issue 9, reliability: no silent wrong result, no lost run.

- The reference log-prob cache (`nca_trl.ref_cache`) is reused only when nothing that changes its values changed, and
  an interrupted precompute leaves nothing a later run reuses.
- A non-finite loss or gradient stops the run naming the step and the batch's rows, before the optimizer step and
  before any save (`nca_trl.runtime.safety`).
- `output_dir`: checked writable before anything is loaded, locked for the whole run, checkpoints and the final model
  count only once complete.
"""

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from datasets import load_dataset
from safetensors.torch import load_file
from test_trainer import make_args as trainer_args
from test_trainer import record_losses
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from nca_trl import NCAConfig, NCATrainer, ref_cache
from nca_trl.runtime.errors import ROW_INDEX
from nca_trl.train import train as cli_train

REPO = Path(__file__).resolve().parents[1]
VICUNA = REPO / "data" / "vicuna_rated.jsonl"
LOCK = ".nca-trl.lock"
MARKER = "nca_trl_complete.json"


def make_args(tmp_path, **kwargs):
    """`test_trainer.make_args` for `NCAConfig`, with 64-token sequences."""
    return trainer_args(NCAConfig, tmp_path, **{"max_length": 64, **kwargs})


def rated_rows(n=4):
    return [json.loads(line) for line in VICUNA.read_text().splitlines()[:n]]


def isolated_dataset(folder: Path, rows: list[dict]):
    """`rows` as a Dataset whose cache files (the prepared dataset's and the reference cache) live in `folder` only."""
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    # One file per content, written once: rewriting a file gives its dataset another fingerprint (its mtime changes)
    path = folder / f"rows-{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    if not path.exists():
        path.write_text(text)
    return load_dataset("json", data_files=str(path), split="train", cache_dir=str(folder / "hf-cache"))


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def all_finite(folder: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(folder / "model.safetensors")).values())


# --------------------------------------------------------------------------------------------------- reference cache


class RefCalls:
    """Counts the batches that go through `compute_ref_log_probs` (0 when the cache is reused)."""

    def __init__(self, monkeypatch, fail_on_batch=None):
        self.n = 0
        original = NCATrainer.compute_ref_log_probs

        def counted(trainer, model, inputs):
            self.n += 1
            if fail_on_batch is not None and self.n == fail_on_batch:
                raise KeyboardInterrupt("simulated kill during the reference precompute")
            return original(trainer, model, inputs)

        monkeypatch.setattr(NCATrainer, "compute_ref_log_probs", counted)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ref-cache")


def build_precomputed(folder, model, rows=None, tokenizer=None, ref_model=None, **overrides):
    dataset = isolated_dataset(folder, rows if rows is not None else rated_rows())
    args = make_args(folder, precompute_ref_log_probs=True, precompute_ref_batch_size=2, **overrides)
    return NCATrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer)


def test_ref_cache_computed_once_then_reused(tiny_mistral, cache_dir, monkeypatch):
    calls = RefCalls(monkeypatch)
    first = build_precomputed(cache_dir, tiny_mistral)
    assert calls.n == 2  # 4 rows in batches of 2
    second = build_precomputed(cache_dir, tiny_mistral)
    assert calls.n == 2  # identical run: reused, no forward
    assert second.train_dataset["ref_logps"] == first.train_dataset["ref_logps"]
    assert [len(r) for r in first.train_dataset["ref_logps"]] == [4] * 4


def _changed_template(tiny_mistral):
    tokenizer = AutoTokenizer.from_pretrained(tiny_mistral)
    tokenizer.chat_template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    return {"tokenizer": tokenizer}


FACTORS = {
    "reference_model": lambda paths: {"model": paths["ref"]},  # another seed: other weights
    "dataset_content": lambda paths: {"rows": [dict(r, rewards=[r["rewards"][0] + 1.0, *r["rewards"][1:]]) if i == 2 else r
                                               for i, r in enumerate(rated_rows())]},
    "completion_text": lambda paths: {"rows": [dict(r, completions=["Changed.", *r["completions"][1:]]) if i == 1 else r
                                               for i, r in enumerate(rated_rows())]},
    "chat_template": lambda paths: _changed_template(paths["policy"]),
    "max_length": lambda paths: {"max_length": 32},
    "truncation_mode": lambda paths: {"truncation_mode": "keep_end"},
    "precision": lambda paths: {"bf16": True},  # bf16 autocast on the CPU
    "layout": lambda paths: {"shared_prompt": False},
    "cache_version": lambda paths: {"version": "nca-trl/ref_logps/v-test"},
    # the same weights and config; the attention implementation is not in the config's JSON
    "attention": lambda paths: {"model": AutoModelForCausalLM.from_pretrained(paths["policy"],
                                                                               attn_implementation="eager")},
}


@pytest.mark.parametrize("factor", list(FACTORS))
def test_ref_cache_recomputed_when_a_factor_changes(factor, tiny_mistral, tiny_mistral_ref, cache_dir, monkeypatch):
    build_precomputed(cache_dir, tiny_mistral)  # the baseline, cached (computed here if this test runs alone)
    calls = RefCalls(monkeypatch)
    kwargs = FACTORS[factor]({"policy": tiny_mistral, "ref": tiny_mistral_ref})
    model = kwargs.pop("model", tiny_mistral)
    if "version" in kwargs:
        monkeypatch.setattr(ref_cache, "CACHE_VERSION", kwargs.pop("version"))
    changed = build_precomputed(cache_dir, model, **kwargs)
    assert calls.n == 2, f"changing the {factor} reused the cached reference log-probs"
    assert [len(r) for r in changed.train_dataset["ref_logps"]] == [4] * 4
    build_precomputed(cache_dir, model, **kwargs)
    assert calls.n == 2, f"the same changed run ({factor}) did not reuse its own cache"


@pytest.mark.slow
def test_weights_rewritten_in_place_under_zero3_are_not_reused(tiny_mistral, tiny_mistral_ref, tmp_path, monkeypatch):
    """Under ZeRO-3 every process holds its parameters partitioned into empty tensors, so TRL's model hash (the key's
    `model` part) covers their names and dtypes only: new weights written into the same folder (an SFT rerun into its
    output_dir) reused the old reference log-probs. The folder's weight files are in the key. ZeRO-3's hash is stood
    in for by a constant."""
    import shutil

    import trl.trainer.dpo_trainer

    monkeypatch.setattr(trl.trainer.dpo_trainer, "hash_module", lambda module: "names and dtypes only")
    model = tmp_path / "sft"
    shutil.copytree(tiny_mistral, model)
    calls = RefCalls(monkeypatch)
    build_precomputed(tmp_path, str(model))
    build_precomputed(tmp_path, str(model))
    assert calls.n == 2  # computed once, then reused
    shutil.copyfile(Path(tiny_mistral_ref) / "model.safetensors", model / "model.safetensors")  # other weights
    build_precomputed(tmp_path, str(model))
    assert calls.n == 4, "weights rewritten in place reused the cached reference log-probs"


def test_trl_key_would_reuse_stale_values_across_max_length(tiny_mistral, tmp_path, monkeypatch):
    """The bug the full key fixes: TRL keys the cache on the dataset fingerprint and the model hash only, which are the
    same for max_length 64 and 32 (no prompt is dropped), while the reference log-probs differ (the collator truncates
    after tokenization). Reusing them would train against the wrong reference."""
    from datasets.fingerprint import Hasher

    keys = []
    original = ref_cache.ref_cache_key

    def recording(trainer, dataset):
        key = original(trainer, dataset)
        keys.append({"trl": Hasher.hash((dataset._fingerprint, trainer._precompute_model_hash)), "ours": key})
        return key

    monkeypatch.setattr(ref_cache, "ref_cache_key", recording)
    long = build_precomputed(tmp_path, tiny_mistral, max_length=64).train_dataset["ref_logps"]
    short = build_precomputed(tmp_path, tiny_mistral, max_length=32).train_dataset["ref_logps"]
    assert keys[0]["trl"] == keys[1]["trl"]  # TRL's key: a cache hit
    assert keys[0]["ours"] != keys[1]["ours"]
    for a, b in zip(long, short):
        assert all(x < y - 1.0 for x, y in zip(a, b))  # 64 tokens score more completion tokens than 32: lower logps


def test_interrupted_precompute_leaves_no_cache(tiny_mistral, tmp_path, monkeypatch):
    """A kill during the precompute (an exception on the 2nd of 2 batches) leaves nothing that a later run reuses: the
    next run computes every batch again and gets the values of an uninterrupted run."""
    RefCalls(monkeypatch, fail_on_batch=2)
    with pytest.raises(KeyboardInterrupt):
        build_precomputed(tmp_path / "run", tiny_mistral)
    monkeypatch.undo()
    calls = RefCalls(monkeypatch)
    recovered = build_precomputed(tmp_path / "run", tiny_mistral).train_dataset["ref_logps"]
    assert calls.n == 2
    clean = build_precomputed(tmp_path / "clean", tiny_mistral).train_dataset["ref_logps"]
    assert calls.n == 4 and recovered == clean and [len(r) for r in recovered] == [4] * 4


# --------------------------------------------------------------------------------------------------- non-finite


def seed_good_model(tiny_mistral, output_dir: Path) -> str:
    """A good model already in `output_dir` (a previous run's): its weights' digest."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(tiny_mistral):
        shutil.copy(Path(tiny_mistral) / name, output_dir / name)
    return file_digest(output_dir / "model.safetensors")


def test_nan_loss_stops_naming_step_and_rows(tiny_mistral, tmp_path):
    data = isolated_dataset(tmp_path / "data", rated_rows(8))
    out = tmp_path / "out"
    good = seed_good_model(tiny_mistral, out)
    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=1)
    trainer = NCATrainer(model=tiny_mistral, args=args, train_dataset=data)

    batches, original = [], trainer._compute_loss
    loss_fn = trainer._loss_fn

    def recording(model, inputs, return_outputs):
        if trainer.model.training:
            rows = inputs.get(ROW_INDEX)
            batches.append(None if rows is None else sorted(rows.tolist()))
        return original(model, inputs, return_outputs)

    def nan_at_step_2(logratios, rewards, beta, alpha, mask):
        loss = loss_fn(logratios, rewards, beta, alpha, mask)
        return loss * float("nan") if trainer.state.global_step == 1 else loss

    trainer._compute_loss, trainer._loss_fn = recording, nan_at_step_2
    with pytest.raises(RuntimeError, match="loss") as error:
        trainer.train()
    message = str(error.value)
    assert "step 2" in message and "nan" in message.lower()
    assert len(batches) == 2 and batches[1] is not None and f"rows {batches[1]}" in message, (batches, message)
    # Stopped before the backward and the optimizer step of step 2, and before any save of it
    assert trainer.state.global_step == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (out / "checkpoint-1" / MARKER).exists() and all_finite(out / "checkpoint-1")
    assert file_digest(out / "model.safetensors") == good
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 1 and math.isfinite(logged[0]) and logged[0] > 0  # never a NaN (or 0.0) logged
    assert not (out / LOCK).exists()  # the lock is released on the error


def test_nan_gradient_stops_before_the_optimizer_step(tiny_mistral, tmp_path):
    """A finite loss whose gradient is NaN (a hook on one parameter at step 2): the run stops before the optimizer
    applies it, with max_grad_norm clipping on (where the NaN grad norm would otherwise only show in the logs)."""
    data = isolated_dataset(tmp_path / "data", rated_rows(8))
    out = tmp_path / "out"
    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=1, max_grad_norm=1.0)
    trainer = NCATrainer(model=tiny_mistral, args=args, train_dataset=data)
    weight = trainer.model.model.layers[0].mlp.down_proj.weight
    weight.register_hook(lambda g: g * float("nan") if trainer.state.global_step == 1 else g)
    after_step_1 = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                after_step_1.update({n: p.detach().clone() for n, p in trainer.model.named_parameters()})

    trainer.add_callback(Snapshot())
    with pytest.raises(RuntimeError, match="gradient") as error:
        trainer.train()
    message = str(error.value)
    assert "step 2" in message and "rows [" in message
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, after_step_1[name]), name  # step 2's NaN update never applied
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"] and all_finite(out / "checkpoint-1")
    assert all(math.isfinite(h.get("grad_norm", 0.0)) for h in trainer.state.log_history)


def test_a_reference_of_nan_log_probs_is_named_not_the_rows(tiny_mistral, tmp_path):
    """A reference model whose log-probs are NaN (a NaN in its LM head): with `precompute_ref_log_probs` they were
    cached and the run stopped at step 1 advising to check the rows and lower the learning rate; without, the same
    advice at step 1. Now the precompute refuses to cache them, naming the reference and the rows, and a step names
    the reference's rows."""
    from transformers import AutoModelForCausalLM

    from nca_trl.runtime.safety import NonFiniteError

    data = isolated_dataset(tmp_path / "data", rated_rows(4))
    ref = AutoModelForCausalLM.from_pretrained(tiny_mistral)
    with torch.no_grad():
        ref.lm_head.weight[7] = float("nan")
    with pytest.raises(NonFiniteError, match=r"reference model's log-probs are not finite \(NaN or infinite\) for 4 "
                       r"of 4 rows of the train dataset \(rows \[0, 1, 2, 3\].*nothing was cached or trained\. The "
                       r"reference \(the `ref_model`, .*\) gives them, not the data"):
        NCATrainer(model=tiny_mistral, ref_model=ref, train_dataset=data,
                   args=make_args(tmp_path, precompute_ref_log_probs=True))
    trainer = NCATrainer(model=tiny_mistral, ref_model=ref, train_dataset=data, args=make_args(tmp_path, max_steps=1))
    with pytest.raises(NonFiniteError, match=r"step 1 of 1.*The reference model's log-probs are not finite for rows "
                       r"\[\d, \d\]: the reference gives them, not the data") as error:
        trainer.train()
    assert "lower the learning rate" not in str(error.value)


def test_a_reference_of_a_smaller_vocabulary_is_refused_at_construction(tiny_mistral, tmp_path):
    """A reference of a smaller vocabulary than the policy's tokenizer failed at step 1 with torch's `IndexError: index
    out of range in self`: refused at construction, naming both sizes, for the policy named by path or given as a
    model. A larger one (a padded vocabulary) is accepted."""
    from transformers import AutoConfig

    from nca_trl.runtime.errors import SettingsError

    data = isolated_dataset(tmp_path / "data", rated_rows(2))
    policy = AutoModelForCausalLM.from_pretrained(tiny_mistral)
    config = AutoConfig.from_pretrained(tiny_mistral)
    config.vocab_size = 1000
    small = AutoModelForCausalLM.from_config(config)
    for model in (tiny_mistral, policy):
        with pytest.raises(SettingsError, match=r"`ref_model` \(.*\) has a vocabulary of 1000 tokens, fewer than the "
                           r"policy's tokenizer's 32000: it cannot score the policy's token ids"):
            NCATrainer(model=model, ref_model=small, train_dataset=data, args=make_args(tmp_path))
    padded = AutoModelForCausalLM.from_pretrained(tiny_mistral)
    padded.resize_token_embeddings(32000, pad_to_multiple_of=448)  # 32256 entries, the same tokenizer
    trainer = NCATrainer(model=tiny_mistral, ref_model=padded, train_dataset=data, args=make_args(tmp_path, max_steps=1))
    assert trainer.train().training_loss > 0


def test_no_epoch_is_refused_when_training_starts_not_for_an_evaluation(tiny_mistral, tmp_path):
    """`num_train_epochs=0` without `max_steps` trained no step and saved the initial model as a finished run: refused
    by `train()`. A trainer built only to `evaluate()` may have it (refused at construction, it could not be built)."""
    from nca_trl.runtime.errors import SettingsError

    data = isolated_dataset(tmp_path / "data", rated_rows(2))
    trainer = NCATrainer(model=tiny_mistral, train_dataset=data, eval_dataset=data,
                         args=make_args(tmp_path, num_train_epochs=0, max_steps=-1))
    assert math.isfinite(trainer.evaluate()["eval_loss"])
    with pytest.raises(SettingsError, match=r"num_train_epochs.*without `max_steps` trains no step"):
        trainer.train()
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_push_to_hub_sees_the_results_files(tiny_mistral, tmp_path, monkeypatch):
    """`nca-trl train` saves the final model before its metrics: the push inside that save sent the model without
    train_results.json / all_results.json / trainer_state.json. The push now comes once, after them."""
    from transformers import Trainer

    monkeypatch.setattr(Trainer, "init_hf_repo", lambda self, token=None, private=None: setattr(
        self, "hub_model_id", "me/x"))
    pushed = []
    monkeypatch.setattr(Trainer, "push_to_hub", lambda self, *a, **k: pushed.append(
        sorted(os.listdir(self.args.output_dir))))
    out = tmp_path / "run"
    cli_train(cli_argv(tiny_mistral, out, "--max_steps", "1", "--push_to_hub", "true", "--hub_model_id", "me/x"))
    assert len(pushed) == 1 and {"model.safetensors", "train_results.json", "all_results.json",
                                 "trainer_state.json"} <= set(pushed[0]), pushed


class NaNGradientAtStep2(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.lm_head.weight.register_hook(lambda g: g * float("nan") if state.global_step == 1 else g)


def cli_argv(model, out, *extra):
    return [
        "--config", str(REPO / "recipes/tiny/nca.yaml"), "--model_name_or_path", str(model),
        "--dataset_name", str(VICUNA), "--output_dir", str(out), "--max_length", "48", "--max_train_samples", "6",
        "--eval_strategy", "no", "--report_train_prompts", "0", "--use_cpu", "true", "--warmup_steps", "0",
        "--lr_scheduler_type", "constant", "--report_to", "none", *extra,
    ]


def test_cli_nan_run_raises_and_keeps_the_good_model(tiny_mistral, tmp_path):
    out = tmp_path / "run"
    good = seed_good_model(tiny_mistral, out)
    argv = cli_argv(tiny_mistral, out, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1")
    with pytest.raises(RuntimeError, match="step 2"):
        cli_train(argv, callbacks=[NaNGradientAtStep2()])
    assert file_digest(out / "model.safetensors") == good
    assert not (out / "run_info.json").exists() and not (out / LOCK).exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"] and all_finite(out / "checkpoint-1")


@pytest.mark.slow
def test_console_script_exits_nonzero_on_a_diverging_run(tiny_mistral, tmp_path):
    """A learning rate of 1e30 overflows the weights at step 1: step 2's loss is NaN. The console script used to log the
    loss as 0 and exit 0; it stops at step 2 with a non-zero exit status."""
    out = tmp_path / "run"
    argv = cli_argv(tiny_mistral, out, "--max_steps", "3", "--learning_rate", "1e30")
    proc = subprocess.run(
        [Path(sys.executable).parent / "nca-trl", "train", *argv], check=False, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"},
    )
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Non-finite" in proc.stderr and "step 2" in proc.stderr, proc.stderr[-3000:]
    assert "'loss': '0'" not in proc.stdout and not (out / "model.safetensors").exists()


# --------------------------------------------------------------------------------------------------- output_dir


def test_unwritable_output_dir_fails_before_loading_anything(tmp_path):
    """An output_dir that cannot be created (under a regular file: refused for root too) fails naming the folder,
    before the data or the model is loaded (the model folder here is empty)."""
    (tmp_path / "never-loaded").mkdir()  # passes the path check; never loaded
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "out"
    argv = cli_argv(tmp_path / "never-loaded", out, "--max_steps", "1")
    with pytest.raises(OSError, match="output_dir") as error:
        cli_train(argv)
    assert str(out) in str(error.value) and "writable" in str(error.value)
    with pytest.raises(OSError, match="output_dir"):  # the trainer's own check, for API users
        NCATrainer(model=str(tmp_path / "never-loaded"), args=make_args(tmp_path, output_dir=str(out)))


HOLDER = textwrap.dedent("""
    import fcntl, json, os, socket, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                             "command": "nca-trl train (the other run)"}).encode())
    print("locked", flush=True)
    time.sleep(120)
""")


def test_second_run_on_a_locked_output_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (tmp_path / "never-loaded").mkdir()  # passes the path check; never loaded
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = cli_argv(tmp_path / "never-loaded", out, "--max_steps", "1")
        with pytest.raises(OSError, match="in use") as error:
            cli_train(argv)
        message = str(error.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message and str(out) in message
        # On the command line: one line, exit 2 (a traceback, exit 1, before)
        from nca_trl.cli import main

        assert main(["train", *argv]) == 2
        err = capsys.readouterr().err
        assert "in use by another nca-trl run" in err and "Traceback" not in err and len(err.splitlines()) == 1
        assert (out / LOCK).exists()  # the holder's lock is left alone
    finally:
        holder.kill()
        holder.wait()


def test_a_resume_with_nothing_to_resume_is_refused_before_anything_loads(tmp_path, capsys):
    """`--resume_from_checkpoint true` with no complete checkpoint, or naming an incomplete one, failed inside
    `trainer.train`, after the model and the data had loaded: a traceback, exit 1. Now one line, exit 2, first."""
    from nca_trl.cli import main

    out = tmp_path / "run"
    (out / "checkpoint-4").mkdir(parents=True)  # written by a run killed while saving it: no marker
    (tmp_path / "never-loaded").mkdir()  # passes the path check; loading it would fail
    for value, words in (("true", "No complete checkpoint in output_dir"),
                         (str(out / "checkpoint-4"), "checkpoint-4' is incomplete")):
        assert main(["train", *cli_argv(tmp_path / "never-loaded", out, "--resume_from_checkpoint", value)]) == 2
        err = capsys.readouterr().err
        assert words in err and f"`--resume_from_checkpoint {value}`" in err and "Traceback" not in err, err


def test_stale_lock_is_taken_over_with_a_warning(tiny_mistral, tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK).write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "started": time.time() - 60, "command": "nca-trl train"}
    ))
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        info = cli_train(cli_argv(tiny_mistral, out, "--max_steps", "1"))
    assert info["global_step"] == 1
    assert any("stale" in r.getMessage() and f"pid {dead.pid}" in r.getMessage() for r in caplog.records), caplog.text
    assert not (out / LOCK).exists() and (out / MARKER).exists()


# --------------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.slow
def test_resume_skips_an_incomplete_checkpoint(tiny_mistral, tmp_path, caplog):
    """A run killed while writing checkpoint-3 (only its config.json written): resume_from_checkpoint=True warns naming
    it, resumes from checkpoint-2 (the last complete one) and finishes; checkpoint-3 is then written in full."""
    data = isolated_dataset(tmp_path / "data", rated_rows(8))
    out = tmp_path / "out"
    first = NCATrainer(
        model=tiny_mistral, args=make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1),
        train_dataset=data,
    )
    first.train()
    assert all((out / f"checkpoint-{n}" / MARKER).exists() for n in (1, 2))
    partial = out / "checkpoint-3"
    partial.mkdir()
    shutil.copy(out / "checkpoint-2" / "config.json", partial / "config.json")

    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=1)
    resumed = NCATrainer(model=tiny_mistral, args=args, train_dataset=data)
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        resumed.train(resume_from_checkpoint=True)
    warning = [r.getMessage() for r in caplog.records if "incomplete" in r.getMessage()]
    assert warning and str(partial) in warning[0] and "checkpoint-2" in warning[0], caplog.text
    assert resumed.state.global_step == 4
    assert [h["step"] for h in resumed.state.log_history if "loss" in h] == [1, 2, 3, 4]
    assert all((out / f"checkpoint-{n}" / MARKER).exists() for n in (3, 4))

    shutil.rmtree(out / "checkpoint-4")
    (out / "checkpoint-3" / MARKER).unlink()
    again = NCATrainer(model=tiny_mistral, args=args, train_dataset=data)
    with pytest.raises(ValueError, match="incomplete"):  # an explicit path to an incomplete checkpoint
        again.train(resume_from_checkpoint=str(out / "checkpoint-3"))


@pytest.mark.slow
def test_resume_keeps_the_synced_reference_model(tiny_mistral, tmp_path):
    """`sync_ref_model` moves the reference toward the policy every `ref_model_sync_steps`; TRL keeps it in memory
    only, so a run resumed from checkpoint-2 trained steps 3-4 against the initial reference (other losses, exit 0).
    Each checkpoint now holds the reference (`ref_model.safetensors`) and a resume loads it: the same losses as an
    uninterrupted run. A checkpoint without it is refused."""
    from transformers import TrainerCallback

    from nca_trl.runtime.checkpoints import SYNCED_REFERENCE

    class StopAfter2(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt("simulated kill after checkpoint-2")

    data = isolated_dataset(tmp_path / "data", rated_rows(8))
    sync = dict(max_steps=4, save_strategy="steps", save_steps=1, learning_rate=5e-2, sync_ref_model=True,
                ref_model_sync_steps=2, ref_model_mixup_alpha=0.5, per_device_train_batch_size=1)

    def run(name, resume=None, callbacks=None):
        args = make_args(tmp_path, **sync)
        args.output_dir = str(tmp_path / name)
        trainer = NCATrainer(model=tiny_mistral, args=args, train_dataset=data, callbacks=callbacks)
        losses = record_losses(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return losses

    whole = run("whole")
    with pytest.raises(KeyboardInterrupt):
        run("killed", callbacks=[StopAfter2()])
    checkpoint = tmp_path / "killed" / "checkpoint-2"
    assert (checkpoint / SYNCED_REFERENCE).exists() and (checkpoint / MARKER).exists()
    resumed = run("killed", resume=True)
    assert len(whole) == 4 and resumed == pytest.approx(whole[2:], rel=1e-5)

    (checkpoint / SYNCED_REFERENCE).unlink()
    (tmp_path / "killed" / "checkpoint-3").rename(tmp_path / "killed" / "moved-3")
    shutil.rmtree(tmp_path / "killed" / "checkpoint-4")
    with pytest.raises(ValueError, match=r"holds no copy of the synced reference model \(ref_model.safetensors\)"):
        run("killed", resume=str(checkpoint))


@pytest.mark.slow
@pytest.mark.parametrize("length", [dict(max_steps=2), dict(max_steps=-1, num_train_epochs=0.5)],
                         ids=["max_steps", "epochs"])
def test_resume_from_the_last_checkpoint_trains_no_further_step(tiny_mistral, tmp_path, length):
    """A run killed once checkpoint-2, its last step, was written, before the final save: resumed, transformers skipped
    2 batches and trained a third (step 3 of 2, exit 0), so the final model was not the run's, and `train_loss` was
    0.0. Now the resume trains nothing: the weights, and the final save, are the checkpoint's, and `train_loss` is the
    whole run's; likewise by epochs (half of 4 batches). Resumed from checkpoint-1, `train_loss` covered step 2 only."""
    data = isolated_dataset(tmp_path / "data", rated_rows(8))  # 4 batches of 2 an epoch; the run is 2 steps

    def trainer_in(name):
        args = make_args(tmp_path, save_strategy="steps", save_steps=1, **length)
        args.output_dir = str(tmp_path / name)
        return NCATrainer(model=tiny_mistral, args=args, train_dataset=data)

    whole = trainer_in("whole")
    result = whole.train()
    assert result.global_step == 2 and whole.state.max_steps == 2
    for name, kept in (("killed", (1, 2)), ("killed-early", (1,))):  # what the kill left
        for n in kept:
            shutil.copytree(tmp_path / "whole" / f"checkpoint-{n}", tmp_path / name / f"checkpoint-{n}")

    resumed = trainer_in("killed")
    losses = record_losses(resumed)
    again = resumed.train(resume_from_checkpoint=True)
    assert losses == []  # no training step
    assert again.global_step == resumed.state.global_step == resumed.state.max_steps == 2
    trained = dict(whole.model.named_parameters())
    for name, value in resumed.model.named_parameters():
        assert torch.equal(value, trained[name]), name
    assert [h["step"] for h in resumed.state.log_history if "loss" in h] == [1, 2]
    assert again.training_loss == again.metrics["train_loss"] == pytest.approx(result.training_loss, rel=1e-6)
    assert resumed.state.log_history[-1]["train_loss"] == again.training_loss
    resumed.save_model()  # the final save, as after any run
    final, checkpoint = (load_file(str(tmp_path / "killed" / where / "model.safetensors"))
                         for where in (".", "checkpoint-2"))
    assert final.keys() == checkpoint.keys() and all(torch.equal(final[k], checkpoint[k]) for k in final)
    assert json.loads((tmp_path / "killed" / MARKER).read_text())["step"] == 2

    early = trainer_in("killed-early")
    losses = record_losses(early)
    again = early.train(resume_from_checkpoint=True)
    assert len(losses) == 1 and again.global_step == 2  # step 2 only
    assert again.metrics["train_loss"] == pytest.approx(result.training_loss, rel=1e-5)


def test_whole_run_train_loss_of_a_resumed_run():
    """Resumed at step 5 of 8, this call's 3 steps of mean 5.0: with the sum of the losses before the resume that the
    checkpoint's marker records, the mean over the 8 steps. A marker without it (an older nca-trl): the losses logged
    every 2 steps before the resume, over the 7 steps whose loss is known (step 5's was never logged). Without either,
    the call's own."""
    from nca_trl.runtime.checkpoints import whole_run_train_loss

    history = [{"loss": 1.0, "step": 2}, {"eval_loss": 9.0, "step": 2}, {"loss": 3.0, "step": 4},
               {"loss": 7.0, "step": 6}, {"loss": 5.0, "step": 8}, {"train_loss": 5.0, "step": 8}]
    assert whole_run_train_loss(10.0, history, 5, 8, 5.0) == pytest.approx((10.0 + 5.0 * 3) / 8)
    assert whole_run_train_loss(10.0, history, 8, 8, 0.0) == pytest.approx(10.0 / 8)  # resumed at the end
    assert whole_run_train_loss(None, history, 5, 8, 5.0) == pytest.approx((1.0 * 2 + 3.0 * 2 + 5.0 * 3) / 7)
    assert whole_run_train_loss(None, history, 4, 4, 0.0) == pytest.approx(2.0)
    assert whole_run_train_loss(None, history[-2:], 0, 8, 5.0) == 5.0


@pytest.mark.slow  # over a few seconds on 2 cores
def test_cli_resume_after_the_last_checkpoint_finishes_the_run(tiny_mistral, tmp_path, capsys):
    """`nca-trl train` killed once its last checkpoint was written, before the final save, then run again with
    `--resume_from_checkpoint true`: it trained a step 3 of 2 (a final model up to 3e-3 off the uninterrupted run's)
    and reported `train_loss` 0.0. Now the final model and the report are the uninterrupted run's. The recipe logs
    every 5 steps: no loss of this run is logged before the kill, the checkpoint's marker holds their sum."""

    class KilledAfterTheLastCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt("simulated kill after checkpoint-2")

    def argv(name, *extra):  # 3 batches of 2 prompts an epoch: the run ends within it
        return cli_argv(tiny_mistral, tmp_path / name, "--max_steps", "2", "--save_strategy", "steps", "--save_steps",
                        "1", "--per_device_train_batch_size", "2", *extra)

    whole = cli_train(argv("whole"))
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        cli_train(argv("killed"), callbacks=[KilledAfterTheLastCheckpoint()])
    assert (out / "checkpoint-2" / MARKER).exists() and not (out / "model.safetensors").exists()

    capsys.readouterr()
    info = cli_train(argv("killed", "--resume_from_checkpoint", "true"))
    printed = capsys.readouterr().out  # the progress line at the end printed transformers' 0.0 (the call's steps)
    assert f"train_loss {info['train_metrics']['train_loss']:.4g}" in printed and "train_loss 0 " not in printed
    state = json.loads((out / "trainer_state.json").read_text())
    assert info["global_step"] == state["global_step"] == state["max_steps"] == 2
    final, expected = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("killed", "whole"))
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)
    assert whole["train_metrics"]["train_loss"] > 0 and info["step_losses"] == whole["step_losses"] == []
    assert info["train_metrics"]["train_loss"] == pytest.approx(whole["train_metrics"]["train_loss"], rel=1e-6)
    assert json.loads((out / "all_results.json").read_text())["train_loss"] == info["train_metrics"]["train_loss"]
    assert info["resumed_from"] == str(out / "checkpoint-2")  # the checkpoint taken, not `true` as given


def test_checkpoint_killed_mid_write_has_no_marker(tiny_mistral, tmp_path, monkeypatch):
    """A failure while a checkpoint is being written (after its model, before its RNG state) leaves it unmarked."""
    data = isolated_dataset(tmp_path / "data", rated_rows(4))
    out = tmp_path / "out"
    trainer = NCATrainer(
        model=tiny_mistral, args=make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1),
        train_dataset=data,
    )
    original = trainer._save_rng_state

    def dies_at_step_2(output_dir):
        if trainer.state.global_step == 2:
            raise KeyboardInterrupt("simulated kill while writing checkpoint-2")
        return original(output_dir)

    monkeypatch.setattr(trainer, "_save_rng_state", dies_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert (out / "checkpoint-1" / MARKER).exists()
    assert (out / "checkpoint-2" / "model.safetensors").exists() and not (out / "checkpoint-2" / MARKER).exists()


def test_final_model_replaces_the_old_one_only_once_written(tiny_mistral, tmp_path, monkeypatch):
    """`save_model` writes into a staging folder inside output_dir and moves the files into place once all are written:
    a failure half-way leaves the previous model whole; the completion marker is written last."""
    data = isolated_dataset(tmp_path / "data", rated_rows(4))
    out = tmp_path / "out"
    good = seed_good_model(tiny_mistral, out)
    trainer = NCATrainer(model=tiny_mistral, args=make_args(tmp_path, max_steps=1), train_dataset=data)
    trainer.train()

    def dies(*args, **kwargs):
        raise KeyboardInterrupt("simulated kill after the weights, before the tokenizer")

    monkeypatch.setattr(trainer.processing_class, "save_pretrained", dies)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_model(str(out))
    assert file_digest(out / "model.safetensors") == good  # the old model, whole
    monkeypatch.undo()

    trainer.save_model(str(out))
    assert file_digest(out / "model.safetensors") != good and (out / MARKER).exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".nca-trl-saving")]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, trainer.model.state_dict()[name]), name


# --------------------------------------------------------------------------------------------------- accelerate launch
def _launch_cli(tmp_path, name, launch_env, train_args, timeout=240):
    """`accelerate launch` 2 CPU DDP processes of `-m nca_trl.cli train`; returns (exit status, log text)."""
    from launching import DDP_CPU_ARGS, cpu_config, free_port, launch_cmd, start, wait

    config = cpu_config(tmp_path / "ddp_cpu.yaml")
    log = tmp_path / f"{name}.log"
    cmd = launch_cmd(config, free_port(), ("--num_processes", "2"), ("-m", "nca_trl.cli", "train"))
    proc = start(cmd + [*train_args, *DDP_CPU_ARGS], log, launch_env)
    wait([proc], [log], timeout=timeout, check=False)  # a hang fails the test
    return proc.returncode, log.read_text(errors="replace")


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_diverging_run_stops_on_every_process(tiny_mistral, tmp_path, launch_env):
    """2 DDP processes, learning rate 1e30: both processes stop at step 2 (no hang at the next collective), the launch
    exits non-zero, checkpoint-1 is complete and nothing is saved after it; the lock is released."""
    from launching import common_args

    out = tmp_path / "run"
    args = common_args(tiny_mistral) + [
        "--learning_rate", "1e30", "--save_strategy", "steps", "--save_steps", "1", "--output_dir", str(out),
    ]
    status, log = _launch_cli(tmp_path, "diverging", launch_env, args)
    assert status != 0
    assert log.count("NonFiniteError: Non-finite") >= 2 and "step 2 of 4" in log, log[-4000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (out / "checkpoint-1" / MARKER).exists() and all_finite(out / "checkpoint-1")
    assert not (out / "model.safetensors").exists() and not (out / LOCK).exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_launch_on_a_locked_output_dir_is_refused_by_every_process(tmp_path, launch_env):
    """The main process finds the lock held; the other process refuses too instead of waiting for it, before any
    model is loaded (the model path does not exist)."""
    from launching import common_args

    out = tmp_path / "run"
    out.mkdir()
    (tmp_path / "never-loaded").mkdir()  # passes the path check; never loaded
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = common_args(tmp_path / "never-loaded") + ["--output_dir", str(out)]
        status, log = _launch_cli(tmp_path, "locked", launch_env, args, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert status != 0
    assert f"pid {holder.pid}" in log and "The main process refused to start" in log, log[-4000:]


# ------------------------------------------------------------------------------------------------ finished runs
@pytest.mark.slow  # over a few seconds on 2 cores
def test_a_failed_save_says_what_it_left_and_the_model_is_saved_before_the_final_evaluation(tiny_mistral, tmp_path,
                                                                                            monkeypatch):
    """A full disk during a checkpoint raised torch's "unexpected pos 16984896 vs 16984788", naming nothing: the error
    now carries a note (the checkpoint is incomplete, which one a resume takes, the free space). `nca-trl train` saved
    its metrics and trainer_state.json before the final model, so a failed final save left them beside the earlier
    model, and a final evaluation that failed (out of memory) lost the trained steps: the model is now saved first."""
    import sys

    import trl

    if sys.version_info < (3, 11):
        pytest.skip("exception notes are Python 3.11's")
    original = trl.DPOTrainer._save_checkpoint

    def full_at_step_2(self, model, trial):
        if self.state.global_step == 2:
            (Path(self.args.output_dir) / "checkpoint-2").mkdir()
            raise OSError(28, "No space left on device")
        return original(self, model, trial)

    monkeypatch.setattr(trl.DPOTrainer, "_save_checkpoint", full_at_step_2)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="No space left") as error:
        cli_train(cli_argv(tiny_mistral, out, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1"))
    note = " ".join(getattr(error.value, "__notes__", []))
    assert f"writing {out / 'checkpoint-2'} failed; it has no {MARKER}, so no resume takes it" in note
    assert f"resumes from {out / 'checkpoint-1'}, the last complete checkpoint" in note and "MiB are free" in note
    monkeypatch.undo()

    # The final evaluation fails: the trained model is in place all the same
    def evaluate_once(self, *args, **kwargs):  # the step-0 evaluation passes, the final one fails
        if self.state.global_step == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original_evaluate(self, *args, **kwargs)

    original_evaluate = NCATrainer.evaluate
    monkeypatch.setattr(NCATrainer, "evaluate", evaluate_once)
    out = tmp_path / "evaluated"
    with pytest.raises(RuntimeError, match="simulated"):
        cli_train(cli_argv(tiny_mistral, out, "--max_steps", "2", "--report_train_prompts", "2"))
    assert json.loads((out / MARKER).read_text())["final_model"] and all_finite(out)
    assert not (out / "run_info.json").exists()  # not finished: no run_info.json
    monkeypatch.undo()

    # The final save fails over that model: it stays whole, and no file of this run is left beside it
    kept = {p.name: file_digest(p) for p in out.iterdir() if p.is_file()}
    monkeypatch.setattr(trl.DPOTrainer, "save_model", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space")))
    with pytest.raises(OSError, match="No space") as error:
        cli_train(cli_argv(tiny_mistral, out, "--max_steps", "1", "--seed", "7"))
    assert "nca-trl: writing the final model into" in " ".join(error.value.__notes__)
    assert {p.name: file_digest(p) for p in out.iterdir() if p.is_file() and p.name != LOCK} == kept


@pytest.mark.slow  # over a few seconds on 2 cores
def test_a_finished_run_of_other_settings_is_refused_before_loading_anything(tiny_mistral, tmp_path, monkeypatch):
    """Before: a second `nca-trl train` into a finished `output_dir` (e.g. the docs' chain reusing the quick start's
    folder) trained over it without a word. Now other settings are refused before the data or any model loads, naming
    the changed settings and the two ways out; `--overwrite_output_dir true` replaces the run on purpose (its
    checkpoints go, so nothing resumes from them); the same settings, and an explicit resume, still run.

    With `report_train_prompts` (the tiny recipes' 72), which turns on `eval_on_start`: the finished run recorded that
    derived value, so the same command again was refused (`eval_on_start: True -> False`). The settings recorded and
    compared are the ones the user gave.

    `--overwrite_output_dir` removes the earlier run only once the new one has loaded (a bad row leaves it); a resume
    from another folder's checkpoint into a finished run is refused, and one of its own checkpoints with other settings
    says which settings changed."""
    import nca_trl.data.loading as loading

    out, other = tmp_path / "run", tmp_path / "other"
    extra = ("--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1", "--report_train_prompts", "2")
    argv, other_argv = cli_argv(tiny_mistral, out, *extra), cli_argv(tiny_mistral, other, *extra)
    first = cli_train(argv)
    assert first["settings"]["beta"] == 0.1 and first["settings"]["max_steps"] == 2  # the recipe's
    assert first["settings"]["report_train_prompts"] == 2 and not first["settings"]["eval_on_start"]
    model = file_digest(out / "model.safetensors")

    loads = []
    original = loading.load_datasets
    monkeypatch.setattr(loading, "load_datasets", lambda *a, **k: loads.append(1) or original(*a, **k))
    with pytest.raises(ValueError, match=r"holds a finished nca run \(run_info.json\) with other settings \(beta: "
                       r"0.1 -> 0.2\)\. Nothing was loaded or written\. Write to another `output_dir` .*"
                       r"`--overwrite_output_dir true`"):
        cli_train([*argv, "--beta", "0.2"])
    assert loads == [] and file_digest(out / "model.safetensors") == model
    assert json.loads((out / "run_info.json").read_text())["settings"]["beta"] == 0.1
    # `resume_from_checkpoint: false` is no resume: it went past this check and trained over the finished run
    with pytest.raises(ValueError, match=r"holds a finished nca run"):
        cli_train([*argv, "--beta", "0.2", "--resume_from_checkpoint", "false"])
    assert loads == [] and file_digest(out / "model.safetensors") == model
    assert not (out / LOCK).exists()  # a refused start leaves nothing that blocks the corrected command

    # Where the run is written and how it is watched are not settings: the same run again
    again = cli_train([*argv, "--logging_steps", "1"])
    assert again["global_step"] == 2 and loads == [1]
    model, kept = file_digest(out / "model.safetensors"), sorted(p.name for p in out.iterdir())

    # `--overwrite_output_dir` with a bad row: the finished run's checkpoints and run_info.json were removed before the
    # data was read, and the corrected command had nothing left to replace. They go only once the new run has loaded
    rows = [json.loads(line) for line in VICUNA.read_text().splitlines()[:6]]
    rows[3]["rewards"][1] = float("nan")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"row 3"):
        cli_train([*argv, "--beta", "0.2", "--overwrite_output_dir", "true", "--dataset_name", str(bad)])
    assert sorted(p.name for p in out.iterdir()) == kept and file_digest(out / "model.safetensors") == model

    # A resume from another folder's checkpoint into this finished run replaced it without a word: refused
    shutil.copytree(out, other)
    with pytest.raises(ValueError, match=r"holds a finished nca run \(run_info.json\): resuming .*checkpoint-1 into it "
                       r"would replace it\. Nothing was loaded or written\..*`--overwrite_output_dir true`"):
        cli_train([*other_argv, "--resume_from_checkpoint", str(out / "checkpoint-1")])
    assert sorted(p.name for p in other.iterdir()) == kept and loads == [1, 1]  # the bad rows loaded, not these
    # A resume of its own checkpoint with other settings runs, and says which (it took them up without a word)
    resumed = cli_train([*other_argv, "--beta", "0.2", "--max_steps", "3", "--resume_from_checkpoint", "true"])
    assert resumed["global_step"] == 3 and resumed["resumed_with_changes"] == ["beta: 0.1 -> 0.2", "max_steps: 2 -> 3"]
    assert "resumed_with_changes" not in again

    replaced = cli_train([*argv, "--beta", "0.2", "--overwrite_output_dir", "true", "--save_strategy", "no"])
    assert replaced["settings"]["beta"] == 0.2 and replaced["global_step"] == 2 and replaced["resumed_from"] is None
    assert not list(out.glob("checkpoint-*")) and file_digest(out / "model.safetensors") != model



@pytest.mark.slow  # over a few seconds on 2 cores
def test_an_unfinished_run_of_other_settings_is_refused_before_loading_anything(tiny_mistral, tmp_path):
    """Before: a fresh run into an `output_dir` holding an unfinished run's checkpoints (killed after checkpoint-3)
    trained beside them, and when it was stopped in turn after checkpoint-1, `--resume_from_checkpoint true` took up
    the other run's checkpoint-3 and finished that run under this run's name. Each checkpoint now records the run's
    settings: a fresh run of other settings is refused (three ways out), one of the same settings too (resume it or
    overwrite it), and `--overwrite_output_dir true` removes the checkpoints first."""
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        def __init__(self, step):
            self.step = step

        def on_save(self, args, state, control, **kwargs):
            if state.global_step == self.step:
                raise KeyboardInterrupt(f"simulated kill after checkpoint-{self.step}")

    out = tmp_path / "run"
    argv = cli_argv(tiny_mistral, out, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "1")
    with pytest.raises(KeyboardInterrupt):
        cli_train([*argv, "--learning_rate", "0.001"], callbacks=[StopAfter(3)])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    recorded = json.loads((out / "checkpoint-3" / MARKER).read_text())["settings"]
    assert recorded["learning_rate"] == 0.001 and recorded["max_steps"] == 4

    with pytest.raises(ValueError, match=r"holds the checkpoints of an unfinished run \(checkpoint-3, checkpoint-2, "
                       r"checkpoint-1\) with other settings \(learning_rate: 0.001 -> 0.05\)\. Nothing was loaded or "
                       r"written\..*`--overwrite_output_dir true`\. Or continue it with `--resume_from_checkpoint true`"):
        cli_train([*argv, "--learning_rate", "0.05"])
    assert not (out / LOCK).exists()

    # The same settings again (the command rerun after a Ctrl-C) trained from step 0 and removed those checkpoints as
    # it wrote its own, without a word: refused naming the resume, which passes
    from nca_trl.train.arguments import parse_train_args
    from nca_trl.train.run import check_finished_run

    with pytest.raises(ValueError, match=r"holds the checkpoints of an unfinished run \(checkpoint-3, checkpoint-2, "
                       r"checkpoint-1\) of these settings\. Continue it with `--resume_from_checkpoint true`.*"
                       r"`--overwrite_output_dir true`"):
        check_finished_run(parse_train_args([*argv, "--learning_rate", "0.001"]))
    check_finished_run(parse_train_args([*argv, "--learning_rate", "0.001", "--resume_from_checkpoint", "true"]))
    assert (out / "checkpoint-3").is_dir()

    replaced = cli_train([*argv, "--learning_rate", "0.05", "--overwrite_output_dir", "true", "--max_steps", "1"])
    assert replaced["global_step"] == 1 and replaced["settings"]["learning_rate"] == 0.05
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]


def test_final_model_removes_the_replaced_models_other_files(tiny_mistral, tmp_path):
    """A full model saved over a LoRA run's output (`--overwrite_output_dir`) kept the old adapter beside it, and
    `from_pretrained` applied that adapter on top of the new weights; likewise old shards and their index beside one
    weights file. The replaced model's files the new save did not write go: removed where its marker lists them (an
    nca-trl save), moved aside into `replaced-*/` for a model saved without that list (another program's: they were
    deleted); other files stay. Beside a new adapter, a base model's files stay in place."""
    from safetensors.torch import save_file

    data = isolated_dataset(tmp_path / "data", rated_rows(4))
    out = tmp_path / "out"
    out.mkdir()
    for name in ("adapter_config.json", "model.safetensors.index.json", "notes.txt"):
        (out / name).write_text("{}")
    save_file({"w": torch.zeros(1)}, out / "adapter_model.safetensors")
    save_file({"w": torch.zeros(1)}, out / "model-00001-of-00002.safetensors")
    trainer = NCATrainer(model=tiny_mistral, args=make_args(tmp_path, max_steps=1), train_dataset=data)
    trainer.train()
    trainer.save_model(str(out))
    left = {p.name for p in out.iterdir()}
    moved = {"adapter_config.json", "adapter_model.safetensors", "model.safetensors.index.json",
             "model-00001-of-00002.safetensors"}
    assert not left & moved
    assert {"notes.txt", "model.safetensors", "config.json", MARKER} <= left
    (aside,) = out.glob("replaced-*")
    assert {p.name for p in aside.iterdir()} == moved
    listed = json.loads((out / MARKER).read_text())["files"]
    assert "model.safetensors" in listed and "notes.txt" not in listed

    # The marker's list: a file the previous save wrote, whatever its name, goes when the next save does not write it
    (out / "extra_weights.pt").write_text("x")
    (out / MARKER).write_text(json.dumps({"complete": True, "files": [*listed, "extra_weights.pt"]}))
    trainer.save_model(str(out))
    assert not (out / "extra_weights.pt").exists() and (out / "notes.txt").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, trainer.model.state_dict()[name]), name


def test_generate_output_claim_tells_the_other_processes_why_it_refused(tmp_path, monkeypatch):
    """The main process's claim of generate's output that failed on an unwritable folder (not the lock) raised before
    telling the other processes, which waited in the broadcast until the launcher killed them."""
    from types import SimpleNamespace

    import accelerate.utils

    from nca_trl.runtime import output_dir
    from nca_trl.runtime.errors import OutputDirError

    told = []

    def broadcast_object_list(values, from_process=0):  # the main process's values, on every process
        if told:
            values[0] = told[0]
        else:
            told.append(values[0])

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast_object_list)

    def unwritable(*args, **kwargs):
        raise OutputDirError("the folder is not writable")

    monkeypatch.setattr(output_dir, "acquire_lock", unwritable)
    main = SimpleNamespace(is_main_process=True, process_index=0, num_processes=2)
    with pytest.raises(OutputDirError, match="not writable"):
        with output_dir.claim_output_file(tmp_path / "new" / "out.jsonl", main):
            pytest.fail("claimed")
    assert told == [("OutputDirError", "the folder is not writable")] and not (tmp_path / "new").exists()
    other = SimpleNamespace(is_main_process=False, process_index=1, num_processes=2)
    with pytest.raises(OutputDirError, match="The main process refused to start: the folder is not writable"):
        with output_dir.claim_output_file(tmp_path / "new" / "out.jsonl", other):
            pytest.fail("claimed")


def test_an_adapter_saved_into_the_base_models_folder_keeps_the_base(tmp_path):
    """A pipeline that trains LoRA with `output_dir` = the base model's folder: `save_model` deleted the base's
    config.json, weights and tokenizer (taken for a replaced model's files), and the adapter no longer loaded
    (`trl.DPOTrainer` leaves them). They stay; the folder loads as base + adapter."""
    from peft import AutoPeftModelForCausalLM, LoraConfig

    from nca_trl.tiny import build_tiny_model

    out = build_tiny_model(tmp_path / "base", "mistral", seed=0)
    before = {p.name for p in Path(out).iterdir()}
    data = isolated_dataset(tmp_path / "data", rated_rows(2))
    trainer = NCATrainer(model=str(out), args=make_args(tmp_path, output_dir=str(out), max_steps=1),
                         train_dataset=data, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                    task_type="CAUSAL_LM"))
    trainer.train()
    trainer.save_model()
    after = {p.name for p in Path(out).iterdir()}
    assert before <= after and "adapter_model.safetensors" in after and not list(Path(out).glob("replaced-*"))
    assert AutoPeftModelForCausalLM.from_pretrained(out) is not None
