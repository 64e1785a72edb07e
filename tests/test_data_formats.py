"""Tests for nca_trl.data's formats, rewards, validation and converters modules (no models, no network)."""

import copy
import json
import logging
import math
import pickle
from pathlib import Path

import pytest
import torch
from datasets import Dataset, load_dataset

from nca_trl.data import (
    PREFERENCE,
    PREFERENCE_IMPLICIT,
    RATED,
    MIXED,
    PAIR_COLUMN,
    DataValidationError,
    ValidationReport,
    columns_to_rated,
    convert_dataset,
    detect_format,
    is_conversational_example,
    to_rated,
    ultrafeedback_to_rated,
    validate_dataset,
    validate_example,
)


REPO = Path(__file__).resolve().parents[1]
VICUNA = REPO / "data" / "vicuna_rated.jsonl"
HH = REPO / "tests" / "data" / "hh_helpful_test.jsonl"  # 202 HH-RLHF rows, see tests/data/README.md


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def rated(**overrides):
    row = {"prompt": "What is 2+2?", "completions": ["4", "5", "22"], "rewards": [9.0, 2.0, 1.0]}
    row.update(overrides)
    return row


def conv_rated(**overrides):
    row = {
        "prompt": [user("What is 2+2?")],
        "completions": [[assistant("4")], [assistant("5")]],
        "rewards": [1.0, 0.0],
    }
    row.update(overrides)
    return row


def pref(**overrides):
    row = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
    row.update(overrides)
    return row


def conv_pref(**overrides):
    row = {"prompt": [user("What is 2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}
    row.update(overrides)
    return row


def implicit(**overrides):
    row = {"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}
    row.update(overrides)
    return row


# --------------------------------------------------------------------------------------------- error message shape


def test_error_message_format_and_attributes():
    err = DataValidationError(
        "reward at position 2 is NaN",
        "give every completion a finite number (or drop the row)",
        row=12,
        field="rewards",
        dataset_name="train",
    )
    assert str(err) == (
        "train dataset, row 12, field 'rewards': reward at position 2 is NaN. "
        "Fix: give every completion a finite number (or drop the row)."
    )
    assert isinstance(err, ValueError)
    assert (err.row, err.field, err.dataset_name) == (12, "rewards", "train")
    clone = pickle.loads(pickle.dumps(err))
    assert str(clone) == str(err) and clone.row == 12 and clone.field == "rewards"


def test_nan_reward_message_matches_the_documented_example():
    with pytest.raises(DataValidationError) as info:
        validate_example(rated(rewards=[1.0, 2.0, float("nan")]), 12)
    assert str(info.value) == (
        "train dataset, row 12, field 'rewards': reward at position 2 is NaN. "
        "Fix: give every completion a finite number (or drop the row)."
    )


# --------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "row, expected",
    [
        (rated(), RATED),
        (conv_rated(), RATED),
        (pref(), PREFERENCE),
        (conv_pref(), PREFERENCE),
        (implicit(), PREFERENCE_IMPLICIT),
        ({"chosen": [user("hi"), assistant("a")], "rejected": [user("hi"), assistant("b")]}, PREFERENCE_IMPLICIT),
        ({**pref(), "prompt": None}, PREFERENCE_IMPLICIT),  # Arrow fills absent columns with None
        ({**rated(), "chosen": None, "rejected": None}, RATED),
    ],
)
def test_detect_format(row, expected):
    assert detect_format(row) == expected


def test_detect_format_points_to_converters():
    uf = {"instruction": "Say hi", "completions": [{"response": "hi", "overall_score": 8.0}]}
    with pytest.raises(DataValidationError, match="ultrafeedback_to_rated") as info:
        detect_format(uf, 4, "eval")
    assert info.value.row == 4 and "row 4" in str(info.value) and "eval dataset" in str(info.value)
    with pytest.raises(DataValidationError, match="columns_to_rated"):
        detect_format({"prompt": "p", "A0": "a", "A1": "b", "A0_score": 1, "A1_score": 2}, 1)
    with pytest.raises(DataValidationError, match="Accepted layouts") as info:
        detect_format({"text": "hello"}, 9)
    assert info.value.field == "prompt" and "missing column" in str(info.value)


def test_is_conversational_example():
    assert is_conversational_example(conv_rated())
    assert is_conversational_example(conv_pref())
    assert is_conversational_example({"chosen": [user("hi"), assistant("a")], "rejected": []})
    assert not is_conversational_example(rated())
    assert not is_conversational_example(pref())
    assert not is_conversational_example({"prompt": [], "completions": [], "rewards": []})
    # rated row without a prompt key: decided by the first completion
    assert is_conversational_example({"completions": [[assistant("a")]], "rewards": [1.0]})


# --------------------------------------------------------------------------------------------- bad rows

BAD_ROWS = [
    # (id, row, field, words that must appear in the message)
    # generate's samples, not scored yet: the fix names `nca-trl score`; the trainers' row index is not the user's
    ("missing-rewards", {"prompt": "p", "completions": ["a", "b"], "_nca_row_index": 0}, "rewards",
     ["missing column", "columns ['completions', 'prompt']", "score the completions first (`nca-trl score"]),
    ("missing-prompt-rated", {"completions": ["a", "b"], "rewards": [1, 2]}, "prompt", ["missing column"]),
    ("missing-rejected", {"prompt": "p", "chosen": "a"}, "rejected", ["missing column"]),
    ("no-layout", {"text": "hello"}, "prompt", ["Accepted layouts"]),
    ("rewards-none-column", rated(rewards=None), "rewards", ["present but None"]),
    ("k-1", rated(completions=["a"], rewards=[1.0]), "completions", ["K = 1", "K >= 2"]),
    ("k-0", rated(completions=[], rewards=[]), "completions", ["K = 0"]),
    ("length-mismatch", rated(rewards=[1.0, 2.0]), "rewards", ["3 completions but 2 rewards"]),
    ("reward-nan", rated(rewards=[1.0, float("nan"), 2.0]), "rewards", ["position 1", "NaN"]),
    ("reward-inf", rated(rewards=[float("inf"), 1.0, 2.0]), "rewards", ["position 0", "+inf"]),
    ("reward-neg-inf", rated(rewards=[1.0, 2.0, float("-inf")]), "rewards", ["position 2", "-inf"]),
    ("reward-numeric-string", rated(rewards=[1.0, "7", 2.0]), "rewards", ["'7'", "numeric strings are not accepted"]),
    ("reward-float-string", rated(rewards=[1.0, "4.5", 2.0]), "rewards", ["'4.5'", "numeric strings are not accepted",
                                                                          "float(x) for x in"]),
    ("rewards-differ-beyond-float32", rated(rewards=[1e39, 0.0, -1e39]), "rewards",
     ["position 0 (1e+39)", "position 2 (-1e+39)", "float32", "rescale the rewards"]),
    ("reward-string", rated(rewards=[1.0, "good", 2.0]), "rewards", ["'good'", "not a number"]),
    ("reward-bool", rated(rewards=[True, 0.0, 1.0]), "rewards", ["boolean", "not a number"]),
    ("reward-none", rated(rewards=[1.0, None, 2.0]), "rewards", ["position 1", "None"]),
    ("reward-list", rated(rewards=[1.0, [2.0], 2.0]), "rewards", ["position 1", "not a number"]),
    ("rewards-not-list", rated(rewards=3.0), "rewards", ["expected a list"]),
    ("completions-not-list", rated(completions="abc"), "completions", ["expected a list"]),
    ("empty-completion", rated(completions=["a", "", "c"]), "completions", ["completion 1", "empty string"]),
    ("completion-dict", rated(completions=["a", {"text": "b"}, "c"]), "completions", ["completion 1", "a dict"]),
    ("prompt-empty", rated(prompt=""), "prompt", ["empty string"]),
    ("prompt-int", rated(prompt=5), "prompt", ["an int"]),
    ("prompt-empty-list", conv_rated(prompt=[]), "prompt", ["empty message list"]),
    ("prompt-empty-content", conv_rated(prompt=[user("")]), "prompt", ["empty content"]),
    ("prompt-message-no-role", conv_rated(prompt=[{"content": "hi"}]), "prompt", ["no 'role' key"]),
    ("conv-empty-completion", conv_rated(completions=[[assistant("a")], []]), "completions",
     ["completion 1", "empty message list"]),
    ("conv-empty-content", conv_rated(completions=[[assistant("a")], [assistant("")]]), "completions",
     ["completion 1", "empty content"]),
    ("conv-message-str", conv_rated(completions=[[assistant("a")], ["b"]]), "completions",
     ["completion 1", "a string, expected a dict"]),
    ("conv-content-none", conv_rated(completions=[[assistant("a")], [{"role": "assistant", "content": None}]]),
     "completions", ["message 0, has neither content nor tool_calls"]),
    ("conv-no-assistant", conv_rated(completions=[[assistant("a")], [user("b")]]), "completions",
     ["completion 1", "no assistant message"]),
    ("mixed-str-prompt-list-completions", rated(completions=[[assistant("a")], [assistant("b")]], rewards=[1, 0]),
     "completions",
     ["mixed standard/conversational", "completion 0"]),
    ("mixed-list-prompt-str-completions", conv_rated(completions=["a", "b"]), "completions",
     ["mixed standard/conversational", "completion 0"]),
    ("mixed-within-completions", conv_rated(completions=[[assistant("a")], "b"]), "completions",
     ["mixed standard/conversational", "completion 1"]),
    ("pref-empty-chosen", pref(chosen=""), "chosen", ["empty string"]),
    ("pref-empty-rejected", pref(rejected=""), "rejected", ["empty string"]),
    ("pref-conv-empty-rejected", conv_pref(rejected=[]), "rejected", ["empty message list"]),
    ("pref-mixed-rejected", conv_pref(rejected="5"), "rejected", ["mixed standard/conversational"]),
    ("pref-mixed-chosen", pref(chosen=[assistant("4")]), "chosen", ["mixed standard/conversational"]),
    ("pref-chosen-no-assistant", conv_pref(chosen=[user("4")]), "chosen", ["no assistant message"]),
    ("implicit-empty-chosen", implicit(chosen=""), "chosen", ["empty string"]),
    ("implicit-identical", implicit(rejected="Q: 2+2? A: 4"), "rejected", ["identical"]),
    ("implicit-no-shared-prefix", implicit(rejected="Different text"), "chosen", ["no shared prompt"]),
    ("implicit-mixed", {"chosen": [user("q"), assistant("a")], "rejected": "q b"}, "rejected",
     ["mixed standard/conversational"]),
    # before: accepted, with an empty prompt (a shared space goes to the completions), where `prompt: ""` is refused
    ("implicit-only-a-space-shared", {"chosen": " yes", "rejected": " no"}, "chosen", ["extracted", "is empty"]),
    # after an empty message became legal among others: the pieces extracted from an implicit pair are checked too
    ("implicit-conv-empty-reply", {"chosen": [user("hi"), assistant("hello there")], "rejected": [user("hi"),
     assistant("")]}, "rejected", ["the reply of 'rejected'", "empty content in every message"]),
    ("implicit-conv-empty-prompt", {"chosen": [user(""), assistant("a")], "rejected": [user(""), assistant("b")]},
     "chosen", ["extracted", "empty content in every message"]),
    ("implicit-conv-first-message-differs", {"chosen": [user("q"), assistant("a")], "rejected": [user("r"),
     assistant("b")]}, "chosen", ["first message"]),
]


@pytest.mark.parametrize("row, field, words", [case[1:] for case in BAD_ROWS], ids=[case[0] for case in BAD_ROWS])
def test_bad_rows_raise_with_row_and_field(row, field, words):
    with pytest.raises(DataValidationError) as info:
        validate_example(row, 17, "eval")
    err = info.value
    message = str(err)
    assert err.row == 17 and "row 17" in message
    assert err.field == field and f"field '{field}'" in message
    assert err.dataset_name == "eval" and message.startswith("eval dataset")
    assert "Fix: " in message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("row", [rated(), conv_rated(), pref(), conv_pref(), implicit()])
def test_good_rows_pass(row):
    validate_example(row, 0)


def test_whitespace_and_tool_call_content_are_accepted():
    validate_example(pref(rejected=" "), 0)  # HH-RLHF has replies that are a single space
    tool_turn = [{"role": "assistant", "content": "", "tool_calls": [{"name": "calc"}]}, assistant("4")]
    validate_example(conv_rated(completions=[tool_turn, [assistant("5")]]), 0)


def test_some_empty_messages_are_accepted_as_trl_does():
    """An empty system turn, an empty earlier turn or an empty tool result is data trl.DPOTrainer takes (they were
    refused as 'message 0 has empty content'); a conversation with no content in any message is still empty."""
    system = {"role": "system", "content": ""}
    validate_example(conv_rated(prompt=[system, user("What is 2+2?")]), 0)
    validate_example(conv_pref(prompt=[system, user("q")]), 0)
    validate_example(conv_rated(prompt=[user("Hi"), assistant(""), user("What is 2+2?")]), 0)
    call = {"role": "assistant", "content": "", "tool_calls": [{"name": "calc"}]}
    validate_example(conv_rated(completions=[[call, {"role": "tool", "content": ""}, assistant("4")],
                                             [assistant("5")]]), 0)
    with pytest.raises(DataValidationError, match="empty content in every message") as info:
        validate_example(conv_rated(prompt=[system, user("")]), 3)
    assert info.value.field == "prompt" and info.value.row == 3


# --------------------------------------------------------------------------------------------- whole datasets


def test_validate_dataset_mixed_styles_across_rows():
    rows = [rated(), rated(), conv_rated(), rated()]
    with pytest.raises(DataValidationError, match="mixed standard/conversational styles") as info:
        validate_dataset(rows, "eval")
    assert info.value.row == 2 and info.value.field == "prompt" and "row 2" in str(info.value)

    rows = [conv_pref(), conv_pref(), pref()]
    with pytest.raises(DataValidationError, match="mixed standard/conversational styles") as info:
        validate_dataset(rows)
    assert info.value.row == 2 and info.value.field == "prompt"

    conv_implicit = {"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]}
    with pytest.raises(DataValidationError, match="mixed standard/conversational styles") as info:
        validate_dataset([implicit(), conv_implicit])
    assert info.value.row == 1 and info.value.field == "chosen"


def test_validate_dataset_mixed_formats_across_rows():
    # Rated rows and preference rows (explicit prompt) may share a dataset: each row keeps its own targets
    report = validate_dataset([rated(), rated(), pref()])
    assert report.format == MIXED and report.num_pairs == 1 and report.k_histogram == {2: 1, 3: 2}
    assert "1 preference pairs (one-hot targets on the chosen; alpha does not apply)" in report.summary()
    # Arrow fills absent columns with None: the preference row has completions=None, the rated row chosen=None
    arrow = lambda rows: Dataset.from_list(  # noqa: E731 - every row with every column, as Arrow stores a mixture
        [{"prompt": None, "completions": None, "rewards": None, "chosen": None, "rejected": None, **r} for r in rows])
    report = validate_dataset(arrow([pref(), rated()]))
    assert report.format == MIXED and report.num_pairs == 1 and report.num_rows == 2
    # A bad row of the other kind is still found
    with pytest.raises(DataValidationError, match="reward at position 1 is NaN") as info:
        validate_dataset(arrow([rated(), pref(), rated(rewards=[1.0, float("nan"), 0.0])]))
    assert info.value.row == 2 and info.value.field == "rewards"
    # Implicit-prompt pairs have no prompt to share: they cannot be mixed with either
    with pytest.raises(DataValidationError, match="only rated rows and preference rows with a 'prompt'") as info:
        validate_dataset([rated(), implicit()])
    assert info.value.row == 1 and info.value.field == "prompt"
    with pytest.raises(DataValidationError) as info:
        validate_dataset([pref(), implicit()])
    assert info.value.row == 1 and info.value.field == "prompt"
    with pytest.raises(DataValidationError) as info:
        validate_dataset([implicit(), pref(chosen="Q: x A: 1", rejected="Q: x A: 2")])
    assert info.value.row == 1 and info.value.field == "prompt"


def test_pair_flag_survives_conversion_and_is_checked():
    # to_rated marks pairs, so a dataset converted before training keeps one-hot targets on its pairs
    converted = [to_rated(pref()), to_rated(rated())]
    assert [row[PAIR_COLUMN] for row in converted] == [True, False]
    assert validate_dataset(converted).num_pairs == 1
    assert to_rated(converted[0]) == converted[0]  # converting twice keeps the flag
    with pytest.raises(DataValidationError, match="'preference_pair' is True") as info:
        validate_dataset([rated(**{PAIR_COLUMN: True})])  # K = 3 is no pair
    assert info.value.row == 0 and info.value.field == PAIR_COLUMN
    with pytest.raises(DataValidationError, match="expected True or False"):
        validate_example(rated(completions=["a", "b"], rewards=[1.0, 0.0], **{PAIR_COLUMN: "yes"}), 0)


def test_validate_dataset_reports_the_global_row_index_of_a_late_bad_row():
    rows = [rated() for _ in range(2500)]
    rows[1733] = rated(rewards=[1.0, 2.0, float("nan")])
    ds = Dataset.from_list(rows)
    with pytest.raises(DataValidationError) as info:
        validate_dataset(ds, "eval")
    assert info.value.row == 1733 and "eval dataset, row 1733, field 'rewards'" in str(info.value)


def test_validate_dataset_names_every_other_bad_row_so_one_round_of_fixes_fixes_them_all():
    rows = [rated() for _ in range(1200)]
    for i in (5, 17, 1100):
        rows[i] = rated(rewards=[1.0, 2.0, float("nan")])
    rows[40] = rated(prompt="")
    rows[41] = rated(completions=["a", "b"])  # 2 completions, 3 rewards
    with pytest.raises(DataValidationError) as info:
        validate_dataset(Dataset.from_list(rows), "eval")
    error = info.value
    assert (error.row, error.field) == (5, "rewards")  # the first bad row's message, as before, then the others
    assert str(error).startswith("eval dataset, row 5, field 'rewards': ")
    assert str(error).endswith(" 4 more rows of the eval dataset are bad too: rows 17 ('rewards'), 40 ('prompt'), "
                               "41 ('rewards'), 1100 ('rewards').")
    assert pickle.loads(pickle.dumps(error)).args == error.args  # still crosses processes (datasets.map)
    # More than 20: the first 20, said
    many = [rated(prompt="")] + [rated(rewards=[1.0, float("inf"), 0.0]) for _ in range(30)]
    with pytest.raises(DataValidationError) as info:
        validate_dataset(many)
    assert "30 more rows of the train dataset are bad too: rows 1 ('rewards'), " in str(info.value)
    assert str(info.value).endswith(", 20 ('rewards') (the first 20).")
    # One bad row: the message is what it was
    with pytest.raises(DataValidationError) as info:
        validate_dataset([rated(), rated(prompt="")])
    assert "bad too" not in str(info.value) and str(info.value).endswith(".")


def test_validate_dataset_ragged_k_and_all_equal(caplog):
    rows = [
        rated(),
        rated(completions=["a", "b"], rewards=[3, 3]),
        rated(completions=["a", "b", "c", "d", "e"], rewards=[1, 2, 3, 4, 5]),
        rated(rewards=[0.5, 0.5, 0.5]),
    ]
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        report = validate_dataset(Dataset.from_list(rows))
    assert report.format == RATED and not report.conversational and report.num_rows == 4
    assert report.k_histogram == {2: 1, 3: 2, 5: 1}
    assert report.num_all_equal_rewards == 2 and report.all_equal_rows == [1, 3]
    assert "2 of 4 rows have all-equal rewards (legal" in caplog.text and "EVERY row" not in caplog.text
    # Every row tied (a reward function that scored every completion alike): said, not "legal" alone
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        validate_dataset(Dataset.from_list([rows[1], rows[3]]))
    assert "2 of 2 rows have all-equal rewards (EVERY row: no reward tells any completion from another, so there " \
        "is nothing to learn" in caplog.text


def test_validate_dataset_empty_and_formatted():
    with pytest.raises(DataValidationError, match="no rows"):
        validate_dataset([])
    ds = Dataset.from_list([rated(), rated()]).with_format("numpy")
    report = validate_dataset(ds)  # reads unformatted rows
    assert report.num_rows == 2


def test_conversational_rated_and_preference_datasets():
    rows = [
        conv_rated(),
        conv_rated(
            prompt=[{"role": "system", "content": "Be terse."}, user("Capital of France?")],
            completions=[[assistant("Paris")], [assistant("Lyon")], [assistant("Paris, I think")]],
            rewards=[9, 1, 6],
        ),
    ]
    report = validate_dataset(Dataset.from_list(rows))
    assert report.conversational and report.format == RATED and report.k_histogram == {2: 1, 3: 1}

    prefs = [conv_pref(), conv_pref(prompt=[user("Capital of France?")], chosen=[assistant("Paris")],
                                    rejected=[assistant("Lyon")])]
    report = validate_dataset(Dataset.from_list(prefs))
    assert report.conversational and report.format == PREFERENCE and report.k_histogram == {2: 2}
    assert to_rated(prefs[1]) == {
        "prompt": [user("Capital of France?")],
        "completions": [[assistant("Paris")], [assistant("Lyon")]],
        "rewards": [1.0, 0.0],
        PAIR_COLUMN: True,
    }
    converted = convert_dataset(Dataset.from_list(prefs))
    assert converted.column_names == ["prompt", "completions", "rewards", PAIR_COLUMN]
    assert converted[1]["completions"] == [[assistant("Paris")], [assistant("Lyon")]]
    assert validate_dataset(converted).conversational

    # implicit prompt, conversational (TRL's extract_prompt)
    row = {
        "chosen": [user("Capital of France?"), assistant("Paris")],
        "rejected": [user("Capital of France?"), assistant("Lyon")],
    }
    assert to_rated(row) == to_rated(prefs[1])


# --------------------------------------------------------------------------------------------- real data


def test_vicuna_rated_file(caplog):
    ds = load_dataset("json", data_files=str(VICUNA), split="train")
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        report = validate_dataset(ds)
    assert isinstance(report, ValidationReport)
    assert report.format == RATED and not report.conversational
    assert report.num_rows == 80 and report.k_histogram == {4: 80}
    assert report.num_all_equal_rewards == 6 and len(report.all_equal_rows) == 6
    assert "6 of 80 rows have all-equal rewards" in caplog.text
    assert "80 rows" in report.summary() and "6 rows with all-equal rewards" in report.summary()
    for i in report.all_equal_rows:
        assert len(set(ds[i]["rewards"])) == 1
    # the same from a plain list of dicts
    rows = [json.loads(line) for line in VICUNA.read_text().splitlines()]
    assert validate_dataset(rows).num_all_equal_rewards == 6
    # rated rows pass through to_rated / convert_dataset
    out = to_rated(rows[0])
    assert set(out) == {"prompt", "completions", "rewards", PAIR_COLUMN} and out[PAIR_COLUMN] is False
    assert all(isinstance(r, float) for r in out["rewards"])
    converted = convert_dataset(ds)
    assert converted.column_names == ["prompt", "completions", "rewards", PAIR_COLUMN] and len(converted) == 80


def _hh_rows():
    return [json.loads(line) for line in HH.read_text().splitlines()]


def test_hh_slice_holds_the_rows_the_tests_use():
    """The shipped slice (tests/data/README.md): 200 leading rows, then the sample's two identical-reply rows."""
    rows = _hh_rows()
    assert len(rows) == 202 and HH.stat().st_size < 1_000_000
    assert [i for i, row in enumerate(rows) if row["chosen"] == row["rejected"]] == [200, 201]
    assert [i for i, row in enumerate(rows) if len(row["prompt"]) < 160][:8] == [0, 6, 10, 11, 16, 17, 18, 19]


def test_hh_preference_file():
    rows = _hh_rows()
    ds = load_dataset("json", data_files=str(HH), split="train")
    report = validate_dataset(ds, "eval")
    assert report.format == PREFERENCE and not report.conversational
    assert report.num_rows == len(rows) and report.k_histogram == {2: len(rows)}
    assert report.num_all_equal_rewards == 0
    for row in rows[:50]:
        out = to_rated(row)
        assert out == {"prompt": row["prompt"], "completions": [row["chosen"], row["rejected"]], "rewards": [1.0, 0.0],
                       PAIR_COLUMN: True}
    converted = convert_dataset(ds.select(range(200)))
    assert converted.column_names == ["prompt", "completions", "rewards", PAIR_COLUMN] and all(converted[PAIR_COLUMN])
    assert converted[0]["rewards"] == [1.0, 0.0] and len(converted[0]["completions"]) == 2


def test_hh_implicit_prompt_converts_via_extract_prompt():
    """HH-RLHF ships chosen/rejected as whole dialogues. TRL's extract_prompt splits at the first differing character,
    so the split is exact when the two replies differ right after their leading space (most rows); when the replies
    share a first word, that word goes into the prompt (as in DPOTrainer). Nothing is ever lost."""
    rows = _hh_rows()
    exact = refused = 0
    for i, row in enumerate(rows):
        example = {"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]}
        if row["chosen"] == row["rejected"]:
            with pytest.raises(DataValidationError, match="identical") as info:
                to_rated(example, i)
            assert info.value.row == i
            refused += 1
            continue
        validate_example(example, i)
        out = to_rated(example, i)
        assert out["rewards"] == [1.0, 0.0]
        assert out["prompt"] + out["completions"][0] == example["chosen"]
        assert out["prompt"] + out["completions"][1] == example["rejected"]
        shared = 0
        while row["chosen"][shared : shared + 1] == row["rejected"][shared : shared + 1] != "":
            shared += 1
        if shared <= 1 or row["rejected"].strip() == "":  # the replies differ right after the leading space
            assert out == {"prompt": row["prompt"], "completions": [row["chosen"], row["rejected"]],
                           "rewards": [1.0, 0.0], PAIR_COLUMN: True}
            exact += 1
    # Most rows split exactly: 161 of the slice's 200 rows with distinct replies (1,915 of the full sample's 2,350),
    # counted over the rows that have a prompt to extract (the 2 identical-reply rows are refused above)
    assert refused == 2 and exact > 0.8 * (len(rows) - refused)


# --------------------------------------------------------------------------------------------- UltraFeedback raw


def _uf_completion(model, response, overall, fine, help_, honesty, follow, truth, principle="helpfulness"):
    return {
        "annotations": {
            "helpfulness": {
                "Rating": help_,
                "Rationale": "The response is clear and relevant.",
                "Rationale For Rating": "Accurate and informative.",
                "Type": ["1", "2"],
            },
            "honesty": {"Rating": honesty, "Rationale": "The response is confident and correct."},
            "instruction_following": {"Rating": follow, "Rationale": "Addresses the task goal."},
            "truthfulness": {
                "Rating": truth,
                "Rationale": "No hallucination observed.",
                "Rationale For Rating": "Free of hallucinations.",
                "Type": ["0"],
            },
        },
        "critique": f"The answer by {model} is mostly good, but could be more concise.",
        "custom_system_prompt": "As an AI assistant, ensure your response is accurate and engaging.",
        "fine-grained_score": fine,
        "model": model,
        "overall_score": overall,
        "principle": principle,
        "response": response,
    }


UF_A = {
    "source": "evol_instruct",
    "instruction": "What is the capital of France, and why did it become the capital?",
    "models": ["gpt-4", "alpaca-7b", "falcon-40b-instruct", "llama-2-13b-chat"],
    "completions": [
        _uf_completion("gpt-4", "Paris. It became the capital under the Capetian kings.", 9.0, 4.75,
                       "5", "5", "5", "4"),
        _uf_completion("alpaca-7b", "The capital of France is Paris.", 6.5, 3.5, "3", "N/A", "4", "3", "honesty"),
        _uf_completion("falcon-40b-instruct", "Lyon is the capital of France.", 4.0, 2.25, "2", "3", "2", "2"),
        _uf_completion("llama-2-13b-chat", "Paris, since the 10th century.", 8.0, 4.25, "4", "4", "5", "4"),
    ],
}
UF_B = {
    "source": "flan_v2_niv2",
    "instruction": "Translate to German: Good morning.",
    "models": ["ultralm-65b", "wizardlm-70b", "mpt-30b-chat", "gpt-3.5-turbo"],
    "completions": [
        _uf_completion("ultralm-65b", "Guten Morgen.", 8.5, 4.5, "5", "4", "5", "4"),
        _uf_completion("wizardlm-70b", "Gute Nacht.", 3.0, 1.75, "2", "2", "2", "1"),
        _uf_completion("mpt-30b-chat", "Guten Morgen!", 8.0, 4.0, "4", "4", "4", "4"),
        _uf_completion("gpt-3.5-turbo", "Morgen.", 5.0, 2.5, "3", "3", "2", "2"),
    ],
}
UF_C = {  # only one usable completion under overall_score / helpfulness
    "source": "sharegpt",
    "instruction": "Write a haiku about rain.",
    "models": ["bard", "pythia-12b", "starchat", "vicuna-33b"],
    "completions": [
        _uf_completion("bard", "Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky", 7.0,
                       4.0, "4", "5", "4", "3"),
        _uf_completion("pythia-12b", "", 1.0, 1.0, "1", "1", "1", "1"),
        _uf_completion("starchat", "Rain rain rain.", None, 1.0, "N/A", "N/A", "N/A", "N/A"),
        _uf_completion("vicuna-33b", "Drops fall.", float("nan"), 2.0, "", "3", "2", "2"),
    ],
}


@pytest.mark.parametrize(
    "score_field, rewards, kept",
    [
        ("overall_score", [9.0, 6.5, 4.0, 8.0], [0, 1, 2, 3]),
        ("fine-grained_score", [4.75, 3.5, 2.25, 4.25], [0, 1, 2, 3]),
        ("helpfulness", [5.0, 3.0, 2.0, 4.0], [0, 1, 2, 3]),
        ("honesty", [5.0, 3.0, 4.0], [0, 2, 3]),  # completion 1 has honesty "N/A"
        ("instruction_following", [5.0, 4.0, 2.0, 5.0], [0, 1, 2, 3]),
        ("truthfulness", [4.0, 3.0, 2.0, 4.0], [0, 1, 2, 3]),
        ("mean_aspects", [4.75, 10 / 3, 2.25, 4.25], [0, 1, 2, 3]),  # "N/A" left out of the mean
    ],
)
def test_ultrafeedback_score_fields(score_field, rewards, kept):
    out = ultrafeedback_to_rated(copy.deepcopy(UF_A), 0, score_field=score_field)
    assert out["prompt"] == UF_A["instruction"]
    assert out["completions"] == [UF_A["completions"][i]["response"] for i in kept]
    assert out["rewards"] == pytest.approx(rewards)
    assert out["num_dropped_completions"] == 4 - len(kept)
    assert all(isinstance(r, float) for r in out["rewards"])


def test_ultrafeedback_unusable_error_names_row_completion_and_field():
    with pytest.raises(DataValidationError, match="'N/A'") as info:
        ultrafeedback_to_rated(UF_A, 5, score_field="honesty", unusable="error")
    err = info.value
    assert err.row == 5 and err.field == "completions[1].annotations.honesty.Rating"
    assert "completion 1" in str(err) and "row 5" in str(err)
    with pytest.raises(DataValidationError) as info:
        ultrafeedback_to_rated(UF_C, 8, unusable="error")
    assert info.value.field == "completions[1].response" and "empty string" in str(info.value)
    # nothing unusable: same as drop
    assert ultrafeedback_to_rated(UF_B, 1, unusable="error") == ultrafeedback_to_rated(UF_B, 1)


def test_ultrafeedback_drop_unusable():
    out = ultrafeedback_to_rated(UF_C, 2)
    assert out["completions"] == [UF_C["completions"][0]["response"]] and out["rewards"] == [7.0]
    assert out["num_dropped_completions"] == 3
    out = ultrafeedback_to_rated(UF_C, 2, score_field="honesty")  # c1 empty response, c2 "N/A"
    assert out["rewards"] == [5.0, 3.0] and out["num_dropped_completions"] == 2


def test_ultrafeedback_bad_arguments():
    with pytest.raises(ValueError, match="score_field"):
        ultrafeedback_to_rated(UF_A, 0, score_field="overall")
    with pytest.raises(ValueError, match="unusable"):
        ultrafeedback_to_rated(UF_A, 0, unusable="skip")
    with pytest.raises(DataValidationError) as info:
        ultrafeedback_to_rated({**UF_A, "instruction": ""}, 3)
    assert info.value.field == "instruction" and info.value.row == 3


def test_convert_dataset_ultrafeedback_drops_short_rows_with_one_warning(caplog):
    ds = Dataset.from_list(copy.deepcopy([UF_A, UF_B, UF_C]))
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        out = convert_dataset(ds, "auto")
    assert out.column_names == ["prompt", "completions", "rewards"]
    assert len(out) == 2 and out["prompt"] == [UF_A["instruction"], UF_B["instruction"]]
    assert out[0]["rewards"] == [9.0, 6.5, 4.0, 8.0]
    warnings = [r for r in caplog.records if r.name == "nca_trl" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    # row 2 is dropped: 3 unusable completions + the 1 usable one left in it
    assert "dropped 1 of 3 rows" in message and "4 completions" in message and "[2]" in message
    report = validate_dataset(out)
    assert report.k_histogram == {4: 2}

    # honesty: only completions are dropped (no row), still reported
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        out = convert_dataset(ds, "ultrafeedback", score_field="honesty")
    assert len(out) == 3 and [len(c) for c in out["completions"]] == [3, 4, 2]
    assert "dropped 0 of 3 rows" in caplog.text and "3 completions" in caplog.text
    # which rows lost completions, not only how many (they were counted, not named)
    assert "first kept rows that lost completions: [0, 2]" in caplog.text

    with pytest.raises(DataValidationError) as info:
        convert_dataset(ds, "ultrafeedback", unusable="error", dataset_name="eval")
    assert info.value.row == 2 and info.value.dataset_name == "eval"


def test_convert_dataset_no_drops_no_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        out = convert_dataset([copy.deepcopy(UF_B)], "ultrafeedback")
    assert len(out) == 1 and caplog.records == []


def test_convert_dataset_bad_format():
    with pytest.raises(ValueError, match="'auto', 'rated', 'preference', 'ultrafeedback', 'columns'"):
        convert_dataset([rated()], "ultra")
    with pytest.raises(DataValidationError, match="row 0 is in the 'preference' format"):
        convert_dataset([pref()], "rated")
    with pytest.raises(DataValidationError, match="row 0 is in the 'rated' format"):
        convert_dataset([rated()], "preference")
    with pytest.raises(TypeError, match="score_field"):
        convert_dataset([rated()], "rated", score_field="helpfulness")


# --------------------------------------------------------------------------------------------- column layout


def test_columns_to_rated_string_cells_both_namings():
    row = {"prompt": "Say hi", "A0": "hi", "A1": "hello", "A2": "go away", "A0_score": 8, "A1_score": 9.5,
           "A2_score": 1.0}
    assert columns_to_rated(row, 0) == {"prompt": "Say hi", "completions": ["hi", "hello", "go away"],
                                        "rewards": [8.0, 9.5, 1.0]}
    row = {"prompt": "Say hi", "A0": "hi", "A1": "hello", "score_A0": 8.0, "score_A1": 9.5}
    assert columns_to_rated(row, 0) == {"prompt": "Say hi", "completions": ["hi", "hello"], "rewards": [8.0, 9.5]}


def test_columns_to_rated_conversation_cells():
    row = {
        "A0": [user("Say hi"), assistant("hi")],
        "A1": [user("Say hi"), assistant("hello")],
        "A2": [user("Say hi"), assistant("go away")],
        "A3": [user("Say hi"), assistant("hey")],
        "score_A0": 8.0, "score_A1": 9.5, "score_A2": 1.0, "score_A3": 7.0,
    }
    out = columns_to_rated(row, 0)
    assert out == {
        "prompt": [user("Say hi")],
        "completions": [[assistant("hi")], [assistant("hello")], [assistant("go away")], [assistant("hey")]],
        "rewards": [8.0, 9.5, 1.0, 7.0],
    }
    validate_example(out, 0)
    # with a prompt column and a system message: the conversation context is the prompt
    system = {"role": "system", "content": "Be nice."}
    row = {"prompt": "Say hi", "A0": [system, user("Say hi"), assistant("hi")],
           "A1": [system, user("Say hi"), assistant("yo")], "A0_score": 2, "A1_score": 3}
    out = columns_to_rated(row, 0)
    assert out["prompt"] == [system, user("Say hi")] and out["completions"] == [[assistant("hi")], [assistant("yo")]]
    # assistant-only cells take the prompt column
    row = {"prompt": "Say hi", "A0": [assistant("hi")], "A1": [assistant("yo")], "A0_score": 2, "A1_score": 3}
    assert columns_to_rated(row, 0)["prompt"] == [user("Say hi")]


@pytest.mark.parametrize(
    "row, field, words",
    [
        ({"prompt": "p", "A0": "a", "A1": "b", "A0_score": 1.0}, "A1_score", ["A1_score", "score_A1"]),
        ({"prompt": "p", "A0": "a", "A1": "b", "A0_score": 1.0, "A1_score": None}, "A1_score", ["None"]),
        ({"prompt": "p", "A0": "a", "A1": "b", "score_A0": float("nan"), "score_A1": 2.0}, "score_A0", ["NaN"]),
        ({"prompt": "p", "A0": "a", "A1": "b", "A0_score": "7", "A1_score": 2.0}, "A0_score", ["numeric strings"]),
        ({"prompt": "p", "A0": "a", "A1": "b", "A3": "d", "A0_score": 1, "A1_score": 2, "A3_score": 3}, "A2",
         ["not contiguous"]),
        ({"A0": "a", "A1": "b", "A0_score": 1, "A1_score": 2}, "prompt", ["no 'prompt' column"]),
        ({"prompt": "p", "A0": None, "A1": "b", "A0_score": 1, "A1_score": 2}, "A0", ["None"]),
        ({"prompt": "p", "A0": "a", "A1": [assistant("b")], "A0_score": 1, "A1_score": 2}, "A1",
         ["mixed standard/conversational"]),
        ({"A0": [user("q"), assistant("a")], "A1": [user("other"), assistant("b")], "A0_score": 1, "A1_score": 2},
         "A1", ["different messages"]),
        ({"A0": [user("q"), assistant("a")], "A1": [user("q")], "A0_score": 1, "A1_score": 2}, "A1",
         ["does not end with an assistant message"]),
    ],
)
def test_columns_to_rated_errors(row, field, words):
    with pytest.raises(DataValidationError) as info:
        columns_to_rated(row, 6)
    assert info.value.row == 6 and info.value.field == field and f"field '{field}'" in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_columns_ragged_rows_via_convert_dataset(caplog):
    rows = [
        {"prompt": "p0", "A0": "a", "A1": "b", "A2": "c", "A0_score": 1.0, "A1_score": 2.0, "A2_score": 3.0},
        {"prompt": "p1", "A0": "a", "A1": "b", "A2": None, "A0_score": 1.0, "A1_score": 2.0, "A2_score": None},
        {"prompt": "p2", "A0": "a", "A1": None, "A2": None, "A0_score": 5.0, "A1_score": None, "A2_score": None},
    ]
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        out = convert_dataset(Dataset.from_list(rows))
    assert out.column_names == ["prompt", "completions", "rewards"]
    assert out["prompt"] == ["p0", "p1"] and [len(c) for c in out["completions"]] == [3, 2]
    assert "dropped 1 of 3 rows" in caplog.text
    assert validate_dataset(out).k_histogram == {2: 1, 3: 1}


def test_convert_dataset_columns_conversations():
    rows = [
        {"prompt": f"q{i}", "A0": [user(f"q{i}"), assistant("a")], "A1": [user(f"q{i}"), assistant("b")],
         "score_A0": 1.0, "score_A1": float(i)}
        for i in range(3)
    ]
    out = convert_dataset(Dataset.from_list(rows), "columns")
    assert out.column_names == ["prompt", "completions", "rewards"]
    assert out[2] == {"prompt": [user("q2")], "completions": [[assistant("a")], [assistant("b")]],
                      "rewards": [1.0, 2.0]}
    report = validate_dataset(out)
    assert report.conversational and report.num_all_equal_rewards == 1 and report.all_equal_rows == [1]


def test_to_rated_rated_rows_floats_and_checks():
    out = to_rated({**rated(rewards=[1, 2, 3]), "id": 7})
    assert out == {"prompt": "What is 2+2?", "completions": ["4", "5", "22"], "rewards": [1.0, 2.0, 3.0],
                   PAIR_COLUMN: False}
    assert all(type(r) is float for r in out["rewards"])
    with pytest.raises(DataValidationError, match="numeric strings") as info:
        to_rated(rated(rewards=[1, "2", 3]), 4)
    assert info.value.row == 4 and info.value.field == "rewards"
    assert not math.isnan(to_rated(pref())["rewards"][1])


# --------------------------------------------------------------------------------------------- one reward rule


def test_numeric_strings_follow_one_rule_everywhere():
    """Every string reward is refused, numeric or not, by validation, to_rated and the column converter, with the same
    rule and a cast as the fix; only the UltraFeedback converter parses ratings (its raw ratings are text by design)."""
    from nca_trl.data.formats import REWARD_RULE

    messages = []
    for check in (lambda: validate_example(rated(rewards=[1.0, "4.5", 2.0]), 3),
                  lambda: to_rated(rated(rewards=[1.0, "4.5", 2.0]), 3)):
        with pytest.raises(DataValidationError) as info:
            check()
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert REWARD_RULE in messages[0] and "Fix: cast the 'rewards' column to numbers" in messages[0]
    with pytest.raises(DataValidationError) as info:
        columns_to_rated({"prompt": "p", "A0": "a", "A1": "b", "A0_score": 1.0, "A1_score": "4.5"}, 3)
    assert REWARD_RULE in str(info.value) and "cast the 'A1_score' column to numbers" in info.value.fix
    assert ultrafeedback_to_rated(UF_A, 0, score_field="helpfulness")["rewards"] == [5.0, 3.0, 2.0, 4.0]


def test_reward_differences_must_fit_float32():
    from nca_trl.data import check_rewards
    from nca_trl.data.formats import FLOAT32_MAX

    assert FLOAT32_MAX == torch.finfo(torch.float32).max
    validate_example(rated(rewards=[1e39, 1e39 - 1e38, 9.5e38]), 0)  # beyond float32 but close together: fine
    validate_example(rated(rewards=[3e38, 0.0, -4e37]), 0)
    with pytest.raises(DataValidationError) as info:
        validate_example(rated(rewards=[1e39, 0.0, -1e39]), 5, "eval")
    assert (info.value.row, info.value.field, info.value.dataset_name) == (5, "rewards", "eval")
    with pytest.raises(DataValidationError, match="row 5, field 'rewards'"):
        to_rated(rated(rewards=[1e308, 0.0, -1e308]), 5)  # the difference overflows float64 too
    with pytest.raises(DataValidationError, match="field 'A1_score'.*float32"):
        columns_to_rated({"prompt": "p", "A0": "a", "A1": "b", "A0_score": 1e39, "A1_score": -1e39}, 2)
    check_rewards([2.0, -1.0], 0)
    with pytest.raises(DataValidationError, match="row 1, field 'rewards': reward at position 0 is NaN"):
        check_rewards([float("nan"), 1.0], 1)


def test_old_import_paths_still_resolve():
    import nca_trl.data as data
    from nca_trl.data import columns, converters, formats, ultrafeedback, validation

    for name in ("validate_example", "validate_dataset", "ValidationReport", "to_rated", "check_rewards"):
        assert getattr(formats, name) is getattr(data, name)
    for module, names in ((ultrafeedback, ("ultrafeedback_to_rated", "ULTRAFEEDBACK_ASPECTS")),
                          (columns, ("columns_to_rated",)), (converters, ("convert_dataset",))):
        for name in names:
            assert getattr(formats, name) is getattr(module, name)
    assert validation.validate_dataset is validate_dataset and data.DATASET_FORMATS is formats.DATASET_FORMATS
    with pytest.raises(AttributeError):
        formats.no_such_name  # noqa: B018


def test_a_tie_is_an_absolute_spread_so_adding_a_constant_keeps_every_preference():
    """Before: `math.isclose(rel_tol=1e-9)` called [1e9, 1e9 + 1] a tie, and `ties: drop` dropped a real preference
    once a constant was added to the rewards (which the docs say changes nothing)."""
    from nca_trl.data.rewards import rewards_tie

    assert rewards_tie([2, 2.0, 2]) and rewards_tie([0.3, 0.1 + 0.2]) and not rewards_tie([1e9, 1e9 + 1])
    assert not rewards_tie([0.0, 1e-9]) and rewards_tie([5e9, 5e9 + 1e-13])
    base = [[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]]
    assert [rewards_tie([r + 1e9 for r in row]) for row in base] == [rewards_tie(row) for row in base]


def test_the_collator_makes_adding_a_constant_change_nothing():
    """The float32 rewards tensor is built after each row's best reward is subtracted in float64: 1e9 + r gives the
    targets and loss of r (cast first, 1e9 and 1e9 + 1 are the same float32)."""
    from nca_trl.data import DataCollatorForRatedCompletions
    from nca_trl.losses import nca_loss, reward_targets

    def batch(shift):
        rows = [{"prompt_ids": [1], "completion_ids": [[2], [3], [4]], "rewards": [shift + 1, shift + 0.5, shift]}]
        return DataCollatorForRatedCompletions(pad_token_id=0)(rows)

    base, shifted = batch(0.0), batch(1e9)
    assert shifted["rewards"].tolist() == base["rewards"].tolist() == [[0.0, -0.5, -1.0]]
    mask = base["completion_slots"]
    targets = reward_targets(shifted["rewards"], 1.0, mask=mask)
    assert targets[0, 0] > targets[0, 1] > targets[0, 2]
    logratios = torch.tensor([[0.1, -0.2, 0.3]])
    torch.testing.assert_close(nca_loss(logratios, shifted["rewards"], beta=0.1, alpha=1.0, mask=mask),
                               nca_loss(logratios, base["rewards"], beta=0.1, alpha=1.0, mask=mask))


def test_a_reward_past_float64s_range_or_a_decimal():
    """Before: 10**400 raised a bare OverflowError; a Parquet decimal128 reward was refused as 'a Decimal'."""
    from decimal import Decimal

    with pytest.raises(DataValidationError, match=r"row 7, field 'rewards': reward at position 0 is a number beyond "
                                                  r"float64's range"):
        validate_example({"prompt": "x", "completions": ["a", "b"], "rewards": [10**400, 0]}, 7)
    row = {"prompt": "x", "completions": ["a", "b"], "rewards": [Decimal("1.5"), Decimal("0")]}
    validate_example(row, 0)
    assert to_rated(row)["rewards"] == [1.5, 0.0]


def test_an_explicit_format_is_not_read_from_row_0(caplog):
    """Before: `dataset_format='ultrafeedback'` still detected row 0's layout, and an UltraFeedback row 0 with no
    completion was refused as missing 'prompt' and 'rewards'. Now it is dropped with the other short rows, counted."""
    rows = [{**UF_A, "completions": []}, UF_A, {**UF_A, "completions": []}]
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        out = convert_dataset(rows, "ultrafeedback")
    assert len(out) == 1 and len(out[0]["completions"]) == 4
    assert "dropped 2 of 3 rows" in caplog.text
    with pytest.raises(DataValidationError, match=r"`dataset_format='columns'` was asked for but the data has no "
                                                  r"column\(s\) \['A0', 'A1'\]"):
        convert_dataset(rows, "columns")
