"""`nca-trl iterate` (generate -> score -> train rounds) and `nca-trl train --ref_model_name_or_path`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, VICUNA

from nca_trl.cli import main
from nca_trl.iterate import IterateArguments, plan_rounds
from nca_trl.iterate.evaluate import completion_logps
from nca_trl.iterate.stages import best_worst_pairs

ASCII = "nca_trl.scoring.functions:ascii_letters"


def _train_argv(model, out, **extra):
    argv = ["train", "--model_name_or_path", str(model), "--dataset_name", str(VICUNA), "--output_dir", str(out),
            "--max_steps", "1", "--max_length", "48", "--max_train_samples", "4", "--per_device_train_batch_size", "2",
            "--logging_steps", "1", "--use_cpu", "true", "--bf16", "false", "--activation_checkpointing", "false",
            "--save_strategy", "no", "--report_to", "none", "--learning_rate", "0"]
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    return argv


def test_train_uses_the_reference_model_it_is_given(tiny_mistral, tiny_mistral_ref, tmp_path):
    """At the first step the policy is the initial model: with the implicit reference every implicit reward is 0;
    with `ref_model_name_or_path` (other weights) they are not, and they are beta * (log pi - log pi_ref) of that
    model."""
    assert main(_train_argv(tiny_mistral, tmp_path / "implicit")) == 0
    assert main(_train_argv(tiny_mistral, tmp_path / "explicit", ref_model_name_or_path=tiny_mistral_ref)) == 0
    first = {}
    for name in ("implicit", "explicit"):
        history = json.loads((tmp_path / name / "run_info.json").read_text())["log_history"]
        first[name] = next(e for e in history if "rewards/chosen" in e)
    assert first["implicit"]["rewards/chosen"] == 0 and first["implicit"]["rewards/margins"] == 0
    assert abs(first["explicit"]["rewards/chosen"]) > 1e-3
    assert first["explicit"]["logps/chosen"] == pytest.approx(first["implicit"]["logps/chosen"])  # same policy


def _args(**kw):
    defaults = dict(model_name_or_path="m", dataset_name="d", output_dir="o", reward_funcs=[ASCII])
    return IterateArguments(**{**defaults, **kw})


def test_rounds_take_disjoint_slices_before_the_heldout_prompts():
    per_round, heldout = plan_rounds(100, _args(rounds=3, heldout_prompts=10))
    assert per_round == 30 and heldout == range(90, 100)
    assert plan_rounds(100, _args(rounds=2, heldout_prompts=10, prompts_per_round=45))[0] == 45
    with pytest.raises(ValueError, match="3 rounds x 40 prompts need 120 training prompts.*100 prompts, 10 of them"):
        plan_rounds(100, _args(rounds=3, heldout_prompts=10, prompts_per_round=40))
    with pytest.raises(ValueError, match="none left for training"):
        plan_rounds(10, _args(heldout_prompts=10))


def test_iterate_arguments_are_checked():
    with pytest.raises(ValueError, match="Give a reward"):
        IterateArguments(model_name_or_path="m", dataset_name="d", output_dir="o")
    with pytest.raises(ValueError, match="`loss` must be one of"):
        _args(loss="ipo")
    with pytest.raises(ValueError, match=r"`training` sets \['output_dir'\]"):
        _args(training={"output_dir": "x"})
    with pytest.raises(ValueError, match="use_peft"):
        _args(training={"use_peft": True})
    assert _args(training='{"beta": 0.5}').training == {"beta": 0.5}
    with pytest.raises(ValueError, match="num_completions"):
        _args(num_completions=1)


def test_best_worst_pairs_keep_the_first_of_ties_and_drop_rows_without_a_preference():
    rows = [{"prompt": "p", "completions": ["a", "b", "c", "d"], "rewards": [1.0, 3.0, 3.0, 0.0]},
            {"prompt": "q", "completions": ["e", "f"], "rewards": [2.0, 2.0]},
            {"prompt": "s", "completions": ["g", "h", "i"], "rewards": [0.0, 0.0, 1.0]}]
    pairs, ties = best_worst_pairs(rows)
    assert ties == 1
    assert pairs == [{"prompt": "p", "chosen": "b", "rejected": "d"}, {"prompt": "s", "chosen": "i", "rejected": "g"}]


def test_completion_logps_equal_one_sequence_at_a_time(tiny_mistral):
    """Batched, padded log-probs of the KL proxy equal each sequence alone, and their hand-computed sum."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_mistral).eval()
    items = [([1, 5, 9, 200], [17, 33, 2]), ([1, 7], [40, 41, 42, 43, 2]), ([1, 300, 301, 302, 303, 304], [2])]
    batched = completion_logps(model, items, pad_id=0, batch_size=3)
    alone = [completion_logps(model, [item], pad_id=0)[0] for item in items]
    assert batched == pytest.approx(alone, abs=1e-4)
    prompt, completion = items[1]
    ids = torch.tensor([prompt + completion])
    logps = model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
    assert alone[1] == pytest.approx(logps[len(prompt) - 1:].sum().item(), abs=1e-4)
