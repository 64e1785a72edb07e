"""Tokenization of rated rows (`nca_trl.data.tokenize`) with the real Mistral-7B tokenizer, and the reward path
tokenize -> collator -> loss (shift invariance, rewards beyond float32's range)."""

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from nca_trl.data import DataCollatorForRatedCompletions, DataValidationError
from nca_trl.data import tokenize as tokenize_module
from nca_trl.data.tokenize import prepare_rated_dataset, select_completions, tokenize_rated_example
from nca_trl.losses import infonca_loss, nca_loss, reward_targets
from nca_trl.tiny import save_mistral_tokenizer


BOS, EOS = 1, 2
# "What is 2+2?" with the Mistral-7B tokenizer: <s> ▁What ▁is ▁ 2 + 2 ?
PROMPT_IDS = [BOS, 1824, 349, 28705, 28750, 28806, 28750, 28804]


@pytest.fixture(scope="module")
def mistral_tokenizer(tmp_path_factory):
    return save_mistral_tokenizer(tmp_path_factory.mktemp("mistral-tokenizer"))


def args(max_length=None, truncation_mode="keep_start"):
    """The three `DPOConfig` fields `prepare_rated_dataset` reads."""
    return SimpleNamespace(max_length=max_length, truncation_mode=truncation_mode, dataset_num_proc=None)


# --------------------------------------------------------------------------------------------- tokenize_rated_example


def test_standard_row_prompt_once_completions_after_it_with_eos(mistral_tokenizer):
    tok = mistral_tokenizer
    row = {"prompt": "What is 2+2?", "completions": [" 4", " five", " 4</s>"], "rewards": [1.0, 0.5, 0.25]}
    out = tokenize_rated_example(row, tok, tok.eos_token)
    assert out["prompt_ids"] == PROMPT_IDS == tok("What is 2+2?")["input_ids"]
    # ▁ 4 </s> | ▁five </s> | a completion that already ends with EOS does not get a second one
    assert out["completion_ids"] == [[28705, 28781, EOS], [3359, EOS], [28705, 28781, EOS]]
    for completion, ids in zip(row["completions"], out["completion_ids"]):
        full = tok("What is 2+2?" + completion.removesuffix("</s>") + "</s>")["input_ids"]
        assert out["prompt_ids"] + ids == full  # the boundary: prompt + completion is the whole sequence, no overlap
    assert out["rewards"] == [1.0, 0.5, 0.25]
    assert set(out) == {"prompt_ids", "completion_ids", "rewards"}


def test_conversational_row_uses_the_chat_template(mistral_tokenizer):
    tok = mistral_tokenizer
    row = {
        "prompt": [{"role": "user", "content": "What is 2+2?"}],
        "completions": [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "five"}]],
        "rewards": [1.0, 0.0],
    }
    out = tokenize_rated_example(row, tok, tok.eos_token)
    # <s> [ INST ] ▁What ▁is ▁ 2 + 2 ? ▁[ / INST ]: the generation prompt of the Mistral-Instruct template
    assert out["prompt_ids"] == [BOS, 28792, 16289, 28793, *PROMPT_IDS[1:], 733, 28748, 16289, 28793]
    assert tok.decode(out["prompt_ids"]) == "<s>[INST] What is 2+2? [/INST]"
    # the template ends the assistant turn with EOS itself: exactly one EOS
    assert out["completion_ids"] == [[28781, EOS], [12340, EOS]]
    assert [tok.decode(ids) for ids in out["completion_ids"]] == ["4</s>", "five</s>"]
    assert out["rewards"] == [1.0, 0.0]



def test_an_empty_system_turn_is_tokenized_as_the_template_renders_it(mistral_tokenizer):
    """A prompt with an empty system message (common in real chat data; trl.DPOTrainer takes it) is accepted and its
    prompt is the chat template's rendering, generation prompt included."""
    tok = mistral_tokenizer
    prompt = [{"role": "system", "content": ""}, {"role": "user", "content": "What is 2+2?"}]
    row = {"prompt": prompt, "completions": [[{"role": "assistant", "content": "4"}],
                                             [{"role": "assistant", "content": "five"}]], "rewards": [1.0, 0.0]}
    out = prepare_rated_dataset(Dataset.from_list([row]), tok, args(), "train")[0]
    assert out["prompt_ids"] == tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True)["input_ids"]
    assert out["completion_ids"] == [[28781, EOS], [12340, EOS]]

def test_tokens_merging_across_the_boundary_go_to_the_completion(mistral_tokenizer, monkeypatch, caplog):
    tok = mistral_tokenizer
    monkeypatch.setitem(tokenize_module._warned, "boundary", False)
    row = {"prompt": "Hello wor", "completions": ["ld", "m"], "rewards": [1.0, 0.0]}
    out = tokenize_rated_example(row, tok, tok.eos_token)
    assert tok("Hello wor")["input_ids"] == [BOS, 22557, tok.convert_tokens_to_ids("▁wor")]
    # "▁wor" + "ld" become "▁world": the completion starts where prompt and prompt+completion diverge
    assert out["prompt_ids"] == [BOS, 22557]
    assert out["completion_ids"] == [tok("Hello world</s>")["input_ids"][2:], tok("Hello worm</s>")["input_ids"][2:]]

    # A dataset says it once, with the number of rows it applies to and an example
    rows = [row, {"prompt": "Hi.", "completions": [" Yes", " No"], "rewards": [1.0, 0.0]}, dict(row)]
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        prepared = prepare_rated_dataset(Dataset.from_list(rows), tok, args(), "train")
    boundary = [r.getMessage() for r in caplog.records if "not a prefix" in r.getMessage()]
    assert len(boundary) == 1 and "train dataset: 2 of 3 rows" in boundary[0] and "'wor'" in boundary[0]
    assert "prompt_trimmed" not in prepared.column_names
    # A stream cannot be counted: it says so at the first row it happens to, once per process
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        list(prepare_rated_dataset(Dataset.from_list(rows).to_iterable_dataset(), tok, args(), "train"))
        list(prepare_rated_dataset(Dataset.from_list(rows).to_iterable_dataset(), tok, args(), "train"))
    boundary = [r.getMessage() for r in caplog.records if "not a prefix" in r.getMessage()]
    assert len(boundary) == 1 and "row 0" in boundary[0] and "'wor'" in boundary[0]


def test_a_prompt_end_that_decodes_to_nothing_is_still_reported(mistral_tokenizer, caplog):
    """A prompt ending in a space whose "▁" merges into the completion: the left-out token decodes to "", and the
    rows went unreported (trl.DPOTrainer warns). The message shows the token."""
    tok = mistral_tokenizer
    row = {"prompt": "Question: 2+2? Answer: ", "completions": ["4", "five"], "rewards": [1.0, 0.0]}
    assert tok.convert_ids_to_tokens(tok(row["prompt"])["input_ids"])[-1] == "▁"
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        prepare_rated_dataset(Dataset.from_list([row, row]), tok, args(), "train")
    boundary = [r.getMessage() for r in caplog.records if "not a prefix" in r.getMessage()]
    assert len(boundary) == 1 and "train dataset: 2 of 2 rows" in boundary[0] and "'▁'" in boundary[0]


def test_a_completion_cut_at_max_new_tokens_is_trained_as_sampled(mistral_tokenizer):
    """`nca-trl generate` marks a sample cut at max_new_tokens `finished: false`: trained without the EOS (end of
    turn) it never produced; it had one, like every completion."""
    tok = mistral_tokenizer
    row = {"prompt": "What is 2+2?", "completions": [" 4", " five"], "rewards": [1.0, 0.0], "finished": [True, False]}
    assert tokenize_rated_example(row, tok, tok.eos_token)["completion_ids"] == [[28705, 28781, EOS], [3359]]
    assert tokenize_rated_example({**row, "finished": None}, tok, tok.eos_token)["completion_ids"][1] == [3359, EOS]
    chat = {"prompt": [{"role": "user", "content": "What is 2+2?"}], "rewards": [1.0, 0.0], "finished": [False, True],
            "completions": [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "five"}]]}
    assert tokenize_rated_example(chat, tok, tok.eos_token)["completion_ids"] == [[28781], [12340, EOS]]
    # `max_completions` keeps each kept completion's own flag
    four = {**row, "completions": [" 1", " 2", " 3", " 4"], "rewards": [2.0, 5.0, 1.0, 3.0],
            "finished": [True, False, True, True]}
    out = prepare_rated_dataset(Dataset.from_list([four]), tok, args(), "train", max_completions=2)[0]
    assert out["finished"] == [False, True] and [ids[-1] == EOS for ids in out["completion_ids"]] == [False, True]
    for bad, words in ((["yes", "no"], "['yes', 'no']"), ([True], "[True]"), (True, "True")):
        with pytest.raises(DataValidationError, match="expected one true/false per completion") as info:
            prepare_rated_dataset(Dataset.from_list([{**row, "finished": bad}]), tok, args(), "eval")
        assert (info.value.row, info.value.field) == (0, "finished") and words in str(info.value)


def test_sequences_cut_at_max_length_are_counted_and_said(mistral_tokenizer, monkeypatch, caplog):
    """The collator cuts prompt + completion at max_length as trl.DPOTrainer does; that was silent."""
    tok = mistral_tokenizer
    rows = [{"prompt": "What is 2+2?", "completions": [" 4", " five " * 6, " 22"], "rewards": [1.0, 0.0, 0.5]},
            {"prompt": "What is 2+2?", "completions": [" 4", " 5"], "rewards": [1.0, 0.0]}]
    stats = {}
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        prepare_rated_dataset(Dataset.from_list(rows), tok, args(max_length=12), "train", stats=stats)
    assert stats["cut_completions"] == 1
    assert "train dataset: 1 of 5 completions (in 1 of 2 rows; the longest 21 tokens): prompt + completion longer " \
        "than max_length=12 tokens is cut when batched" in caplog.text and "EOS included" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        prepare_rated_dataset(Dataset.from_list(rows), tok, args(max_length=21, truncation_mode="keep_end"), "eval",
                              stats=stats)
    assert stats["cut_completions"] == 0 and "cut when batched" not in caplog.text
    monkeypatch.setitem(tokenize_module._warned, "cut", False)  # a stream: said at the first, once per process
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        for _ in range(2):
            list(prepare_rated_dataset(Dataset.from_list(rows).to_iterable_dataset(), tok,
                                       args(max_length=20, truncation_mode="keep_end"), "train"))
    cut = [r.getMessage() for r in caplog.records if "cut when batched" in r.getMessage()]
    assert len(cut) == 1 and cut[0].startswith("train dataset, row 0: ") and "keep_end" in cut[0]


# --------------------------------------------------------------------------------------------- select_completions


def test_select_completions():
    assert select_completions([1.0, 5.0, 3.0, 4.0, 2.0], 3) == [0, 1, 2]  # ranks 1 (5.0), 3 (3.0), 5 (1.0)
    assert select_completions([2.0, 5.0, 1.0, 3.0], 2) == [1, 2]  # the best and the worst, in their order
    assert select_completions([1.0, 1.0, 1.0, 1.0], 2) == [0, 3]  # ties ranked by position
    assert select_completions([3.0, 1.0, 2.0], None) == [0, 1, 2]
    assert select_completions([3.0, 1.0, 2.0], 3) == [0, 1, 2]
    assert select_completions([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 4) == [0, 2, 4, 6]


# --------------------------------------------------------------------------------------------- prepare_rated_dataset


def test_prepare_drops_rows_without_room_and_names_them(mistral_tokenizer, caplog):
    tok = mistral_tokenizer
    rows = [
        {"prompt": "What is 2+2?", "completions": [" 4", " five"], "rewards": [1.0, 0.0]},
        {"prompt": "word " * 20, "completions": [" a", " b"], "rewards": [0.0, 1.0]},  # fills max_length alone
        {"prompt": "What is 2+2?", "completions": [" 4", " 5", " 22"], "rewards": [3.0, 2.0, 1.0]},
    ]
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        out = prepare_rated_dataset(Dataset.from_list(rows), tok, args(max_length=12), "eval")
    assert len(out) == 2
    assert "eval dataset: dropped 1 of 3 rows" in caplog.text and "max_length=12" in caplog.text
    assert "(rows 1)" in caplog.text
    assert out[0]["prompt_ids"] == PROMPT_IDS and out[1]["prompt_ids"] == PROMPT_IDS
    assert out[0]["completion_ids"] == [[28705, 28781, EOS], [3359, EOS]]
    assert out[1]["rewards"] == [3.0, 2.0, 1.0]
    # idempotent: a tokenized dataset prepared again with the same settings is unchanged
    assert prepare_rated_dataset(out, tok, args(max_length=12), "eval").to_list() == out.to_list()
    # without max_length nothing is dropped
    assert len(prepare_rated_dataset(Dataset.from_list(rows), tok, args(), "eval")) == 3


def test_prepare_preference_rows_and_max_completions(mistral_tokenizer):
    tok = mistral_tokenizer
    pairs = [{"prompt": "What is 2+2?", "chosen": " 4", "rejected": " five"}]
    out = prepare_rated_dataset(Dataset.from_list(pairs), tok, args(), "train")
    assert out[0]["rewards"] == [1.0, 0.0] and out[0]["completion_ids"] == [[28705, 28781, EOS], [3359, EOS]]
    rated = [{"prompt": "What is 2+2?", "completions": [" 1", " 2", " 3", " 4"], "rewards": [2.0, 5.0, 1.0, 3.0]}]
    out = prepare_rated_dataset(Dataset.from_list(rated), tok, args(), "train", max_completions=2)
    assert out[0]["completions"] == [" 2", " 3"] and out[0]["rewards"] == [5.0, 1.0]
    assert out[0]["completion_ids"] == [tok(f"What is 2+2? {n}</s>")["input_ids"][8:] for n in (2, 3)]



def test_a_tokenized_dataset_gets_this_preparation_s_checks_and_settings(mistral_tokenizer, caplog):
    """A dataset that arrives tokenized (another trainer's prepared `train_dataset`) was returned as it was: a NaN
    reward or a K = 1 row failed at the first step naming a batch position, and this trainer's max_length and
    max_completions were not applied (a prompt filling max_length trained with no completion token, silently)."""
    tok = mistral_tokenizer
    rows = [{"prompt": "word " * 20, "completions": [" a", " b", " c"], "rewards": [1.0, 2.0, 3.0]},
            {"prompt": "What is 2+2?", "completions": [" 4", " five"], "rewards": [1.0, 0.0]}]
    prepared = prepare_rated_dataset(Dataset.from_list(rows), tok, args(), "train")
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        assert len(prepare_rated_dataset(prepared, tok, args(max_length=12), "train")) == 1
        assert "dropped 1 of 2 rows whose prompt alone fills max_length=12" in caplog.text and "(rows 0)" in caplog.text
        caplog.clear()
        capped = prepare_rated_dataset(prepared, tok, args(), "train", max_completions=2)
        assert "1 of 2 prompts have more than max_completions=2" in caplog.text and "(rows 0)" in caplog.text
    assert capped[0]["rewards"] == [1.0, 3.0] and capped[0]["completions"] == [" a", " c"]
    assert capped[0]["completion_ids"] == [prepared[0]["completion_ids"][i] for i in (0, 2)]
    assert len(list(prepare_rated_dataset(prepared.to_iterable_dataset(), tok, args(max_length=12), "train"))) == 1
    for fmt in ("torch", "numpy"):  # a format set on it: 'preference_pair' is a Tensor, blamed on a column of ours
        again = prepare_rated_dataset(prepared.with_format(fmt), tok, args(), "train")
        assert again[0]["preference_pair"] is False and again.to_list() == prepared.to_list()
    for change, field, words in [
        ({"rewards": [float("nan"), 0.0]}, "rewards", "NaN"),
        ({"completion_ids": [[28705]], "rewards": [1.0]}, "completion_ids", "K >= 2"),
        ({"completion_ids": [[28705], []]}, "completion_ids", "completion 1 is empty"),
        ({"rewards": [1.0, 0.0, 2.0]}, "rewards", "2 completions but rewards"),
    ]:
        bad = prepared.to_list()
        bad[1].update(change)
        for data in (Dataset.from_list(bad), Dataset.from_list(bad).to_iterable_dataset()):
            with pytest.raises(DataValidationError, match=words) as info:
                list(prepare_rated_dataset(data, tok, args(), "train"))
            assert info.value.row == 1 and info.value.field == field


def test_max_completions_warns_only_when_it_caps(mistral_tokenizer, caplog):
    rows = [{"prompt": "What is 2+2?", "completions": [" 4", " five"], "rewards": [1.0, 0.0]}]
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        prepare_rated_dataset(Dataset.from_list(rows), mistral_tokenizer, args(), "train", max_completions=8)
    assert "max_completions" not in caplog.text  # it said "0 of 1 prompts have more than max_completions=8"


def test_each_row_is_validated_once(mistral_tokenizer, monkeypatch):
    """The rewards of each row are checked once, up front; conversion, tokenization and collation trust them."""
    from nca_trl.data import validation

    calls = []
    check = validation.check_rewards
    monkeypatch.setattr(validation, "check_rewards", lambda rewards, *a, **k: calls.append(list(rewards)) or check(
        rewards, *a, **k))
    rows = [{"prompt": "What is 2+2?", "completions": [" 4", " five"], "rewards": [float(i), 0.0]} for i in range(3)]
    out = prepare_rated_dataset(Dataset.from_list(rows), mistral_tokenizer, args(), "train")
    DataCollatorForRatedCompletions(pad_token_id=EOS)(out.to_list())
    assert calls == [[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]

    calls.clear()  # a stream: each row as it is read
    stream = prepare_rated_dataset(Dataset.from_list(rows).to_iterable_dataset(), mistral_tokenizer, args(), "train")
    DataCollatorForRatedCompletions(pad_token_id=EOS)(list(stream))
    assert calls == [[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]


# --------------------------------------------------------------------------------------------- rewards: shift, float32


def _targets_and_losses(rows, tok, alpha):
    examples = prepare_rated_dataset(Dataset.from_list(rows), tok, args(), "train").to_list()
    batch = DataCollatorForRatedCompletions(pad_token_id=EOS)(examples)
    slots, rewards = batch["completion_slots"], batch["rewards"]
    logratios = torch.tensor([[0.3, -0.2, 0.1], [0.5, -1.0, 0.0]])[: len(rows), : rewards.shape[1]]
    return (
        reward_targets(rewards, alpha, slots),
        infonca_loss(logratios, rewards, beta=1.0, alpha=alpha, mask=slots),
        nca_loss(logratios, rewards, beta=1.0, alpha=alpha, mask=slots),
    )


def test_adding_a_constant_to_the_rewards_changes_nothing(mistral_tokenizer):
    """1e9 + r in float32 is 1e9 for r in [0, 1] (float32 steps by 64 there): the shift must happen in float64 first."""
    tok = mistral_tokenizer
    row = {"prompt": "What is 2+2?", "completions": [" 4", " 5", " 22"]}
    plain = _targets_and_losses([{**row, "rewards": [1.0, 0.5, 0.0]}], tok, alpha=1.0)
    shifted = _targets_and_losses([{**row, "rewards": [1e9 + 1.0, 1e9 + 0.5, 1e9]}], tok, alpha=1.0)
    expected = torch.softmax(torch.tensor([[1.0, 0.5, 0.0]]), dim=1)
    torch.testing.assert_close(plain[0], expected)
    for a, b in zip(plain, shifted):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rewards_beyond_float32_train_to_finite_rescaled_targets(mistral_tokenizer):
    """Rewards near and above float32's max (3.4e38) whose differences fit in float32 give the targets of the rescaled
    rewards: softmax(r / alpha) with r and alpha both divided by 1e38."""
    tok = mistral_tokenizer
    rows = [
        {"prompt": "What is 2+2?", "completions": [" 4", " 5"], "rewards": [3e38, 2.9e38]},
        {"prompt": "What is 3+3?", "completions": [" 6", " 7"], "rewards": [5e38, 4e38]},  # both above float32's max
    ]
    targets, infonca, nca = _targets_and_losses(rows, tok, alpha=1e38)
    expected = reward_targets(torch.tensor([[3.0, 2.9], [5.0, 4.0]]), alpha=1.0)
    assert torch.isfinite(targets).all() and torch.isfinite(infonca).all() and torch.isfinite(nca).all()
    torch.testing.assert_close(targets, expected)
    assert targets[1].tolist() == pytest.approx([1 / (1 + math.exp(-1)), 1 / (1 + math.e)])


def test_reward_differences_beyond_float32_are_refused_naming_the_row(mistral_tokenizer):
    tok = mistral_tokenizer
    rows = [
        {"prompt": "What is 2+2?", "completions": [" 4", " 5"], "rewards": [1.0, 0.0]},
        {"prompt": "What is 3+3?", "completions": [" 6", " 7"], "rewards": [1e39, -1e39]},
    ]
    with pytest.raises(DataValidationError) as info:
        prepare_rated_dataset(Dataset.from_list(rows), tok, args(), "eval")
    err = info.value
    assert (err.row, err.field, err.dataset_name) == (1, "rewards", "eval")
    assert str(err).startswith("eval dataset, row 1, field 'rewards': ") and "float32" in str(err)
    assert "rescale" in err.fix


@pytest.mark.slow
def test_training_is_unchanged_by_a_reward_offset_or_a_scale_past_float32(tiny_mistral, tmp_path):
    """End to end: InfoNCA on rewards r, on 1e9 + r, and on 1e38 * r with alpha 1e38 takes the same steps (before the
    fix, 1e9 + r trained on uniform targets and 1e38 * r on NaN targets, logging a loss of 0 and NaN weights)."""
    from nca_trl import InfoNCAConfig, InfoNCATrainer

    from test_trainer import make_args, record_losses

    base = [[5.0, 4.0, 4.5], [1.0, 3.0, 2.0]]
    runs = {"plain": (base, 1.0), "offset": ([[1e9 + r for r in row] for row in base], 1.0),
            "scaled": ([[1e38 * r for r in row] for row in base], 1e38)}
    results = {}
    for name, (rewards, alpha) in runs.items():
        rows = [{"prompt": f"Question {i}:", "completions": [" yes", " no", " maybe"], "rewards": r}
                for i, r in enumerate(rewards)]
        args = make_args(InfoNCAConfig, tmp_path / name, alpha=alpha, beta=1.0, max_steps=2, max_length=32)
        trainer = InfoNCATrainer(model=tiny_mistral, args=args, train_dataset=Dataset.from_list(rows))
        losses = record_losses(trainer)
        trainer.train()
        weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        assert torch.isfinite(weights).all(), name
        results[name] = losses
    assert len(results["plain"]) == 2 and all(math.isfinite(x) for x in results["plain"])
    assert results["offset"] == pytest.approx(results["plain"], rel=1e-6)
    assert results["scaled"] == pytest.approx(results["plain"], rel=1e-5)


# ------------------------------------------------------------------------------ the chat template and its arguments


def _conversation(**extra):
    return {"prompt": [{"role": "user", "content": "What is 2+2?"}], "rewards": [1.0, 0.0],
            "completions": [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]], **extra}


def test_a_row_the_chat_template_refuses_is_named(mistral_tokenizer):
    """Before: jinja2's TemplateError (or an UndefinedError, a TypeError...) came out of `datasets.map`, no row named,
    and `nca-trl train` exited 1 with a traceback."""
    import copy

    strict = copy.deepcopy(mistral_tokenizer)  # a template that refuses system turns, as Gemma's does
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                            "supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    system = {"role": "system", "content": "Be brief."}
    no_content = [{"role": "assistant", "content": None,
                   "tool_calls": [{"type": "function", "function": {"name": "get", "arguments": {"city": "Paris"}}}]}]
    rows = [_conversation(), _conversation(), _conversation(prompt=[system, _conversation()["prompt"][0]])]
    with pytest.raises(DataValidationError, match=r"train dataset, row 2, field 'prompt': the tokenizer's chat template "
                                                  r"refused this row \(the prompt: TemplateError: System role not "
                                                  r"supported\)\. Fix: "):
        prepare_rated_dataset(Dataset.from_list(rows), strict, args(), "train")
    rows = [_conversation(), _conversation(completions=[_conversation()["completions"][0], no_content])]
    with pytest.raises(DataValidationError, match=r"row 1, field 'completions': the tokenizer's chat template refused "
                                                  r"this row \(prompt \+ completion 1: "):
        prepare_rated_dataset(Dataset.from_list(rows), mistral_tokenizer, args(), "train")


@pytest.mark.parametrize("extra, message", [
    ({"tools": "not json"}, r"field 'tools': 'tools' is the string 'not json', which is not JSON"),
    ({"tools": '{"type": "function"}'}, r"field 'tools': 'tools' is a dict, expected a list of tool definitions"),
    ({"chat_template_kwargs": "x"},
     r"field 'chat_template_kwargs': 'chat_template_kwargs' is a string, expected a dict"),
])
def test_malformed_template_arguments_are_named(mistral_tokenizer, extra, message):
    """Before: a bare JSONDecodeError ('tools' not JSON) or TypeError ('str' object is not a mapping)."""
    rows = [_conversation(**{k: None for k in extra}), _conversation(**extra)]
    with pytest.raises(DataValidationError, match=r"train dataset, row 1, " + message):
        prepare_rated_dataset(Dataset.from_list(rows), mistral_tokenizer, args(), "train")


# ------------------------------------------------------------------------------------------------------------ streams


def _stream(rows):
    from datasets import IterableDataset

    from nca_trl.data.tokenize import with_row_index

    return with_row_index(IterableDataset.from_generator(lambda: iter(rows)))  # a generator's: rows may differ in type


@pytest.mark.parametrize("second, message", [
    ({"prompt": [{"role": "user", "content": "What is 2+2?"}], "rewards": [1.0, 0.0],
      "completions": [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]]},
     r"row 1, field 'prompt': mixed standard/conversational styles across rows: 'prompt' is a list of messages "
     r"\(conversational\) here but a string \(standard\) in row 0"),
    ({"prompt": None, "completions": None, "rewards": None, "chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"},
     r"row 1, field 'prompt': this row is in the 'preference_implicit' format but row 0 is in the 'rated' format"),
])
def test_a_stream_refuses_a_row_unlike_its_first_as_a_dataset_does(mistral_tokenizer, second, message):
    """Before: a stream validated each row alone, and trained on mixed styles and formats that a Dataset refuses."""
    first = {"prompt": "What is 2+2?", "completions": ["4", "5"], "rewards": [1.0, 0.0]}
    if "chosen" in second:
        first = {**first, "chosen": None, "rejected": None}
    with pytest.raises(DataValidationError, match=r"train dataset, " + message):
        list(prepare_rated_dataset(_stream([first, second]), mistral_tokenizer, args(), "train"))


def test_a_stream_that_keeps_no_row_is_refused_as_a_dataset_is(mistral_tokenizer):
    """Before: every streamed row dropped (prompts filling max_length, or all tied with ties='drop') trained 0 steps
    and returned success, where a Dataset is refused."""
    long = {"prompt": "word " * 40, "completions": ["a", "b"], "rewards": [1.0, 0.0]}
    with pytest.raises(ValueError, match=r"train dataset: every one of its 3 rows would be dropped, since each prompt "
                                         r"alone fills max_length=16 tokens.*shortest 41 \(row 0\)"):
        prepare_rated_dataset(_stream([long] * 3), mistral_tokenizer, args(max_length=16), "train")
    tied = {"prompt": "q", "completions": ["a", "b"], "rewards": [1e9, 1e9]}
    settings = SimpleNamespace(**vars(args()), ties="drop")
    with pytest.raises(ValueError, match=r"the rewards of every one of its 2 prompts tie, and `ties='drop'`"):
        prepare_rated_dataset(_stream([tied] * 2), mistral_tokenizer, settings, "train")
    kept = prepare_rated_dataset(_stream([tied, {**tied, "rewards": [1e9, 1e9 + 1]}]), mistral_tokenizer, settings,
                                 "train")
    assert [row["rewards"] for row in kept] == [[1e9, 1e9 + 1]]
