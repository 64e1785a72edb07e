"""`nca-trl score`: rewards from a reward model and from reward functions (GRPO's convention), combined, written as
rated rows that `nca-trl train` reads."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from nca_trl.runtime.errors import DataError
from nca_trl.scoring import parse_score_args, score, score_rows
from nca_trl.scoring.functions import ascii_letters, sorted_digits

THIS = Path(__file__).resolve()
REPO = THIS.parents[1]


# ------------------------------------------------------------------------------- reward functions used by the tests
def length_reward(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def constant_two(prompts, completions, **kwargs):
    return [2.0] * len(completions)


def none_for_x(prompts, completions, **kwargs):
    return [None if "x" in c else 1.0 for c in completions]


def matches_answer(prompts, completions, answer, **kwargs):
    return [float(c == a) for c, a in zip(completions, answer)]


def wrong_length(prompts, completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def a_string(prompts, completions, **kwargs):
    return ["high" if c == "b" else 1.0 for c in completions]


def nan_for_bad(prompts, completions, **kwargs):
    return [float("nan") if c == "bad" else 0.0 for c in completions]


def raises(prompts, completions, **kwargs):
    return [kwargs["solution"] for _ in completions]


NOT_CALLABLE = 3


def huge_int(prompts, completions, **kwargs):
    return [10**400] * len(completions)


def huge_float(prompts, completions, **kwargs):
    return [1e308 if c == "bad" else 0.0 for c in completions]


def large(prompts, completions, **kwargs):
    return [3e38 if c == "bad" else 0.0 for c in completions]


def spec(name: str) -> str:
    return f"{THIS}:{name}"


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ------------------------------------------------------------------------------------------------- a reward model
@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """A tiny random `MistralForSequenceClassification` (num_labels=1) with the Mistral tokenizer and chat template."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from nca_trl.tiny import model_config, save_mistral_tokenizer

    path = tmp_path_factory.mktemp("tiny-rm")
    tokenizer = save_mistral_tokenizer(path)
    config = model_config(tokenizer)
    config.num_labels = 1
    config.pad_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # rewards of order 1: differences well above 1e-5
    model.save_pretrained(path)
    return str(path)


STANDARD = [
    {"prompt": "Q: 2+2?\nA:", "completions": [" 4", " four, obviously", " 5 or so, I think, give or take"], "id": 0},
    {"prompt": "Name a colour:", "completions": [" red", " a very dark shade of blue"], "id": 1},
    {"prompt": "Hi", "completions": [" there, how are you doing today?", "!", " hello"], "id": 2},
]
CHAT = [
    {"prompt": [{"role": "user", "content": "Say hi"}],
     "completions": [[{"role": "assistant", "content": "hi"}], [{"role": "assistant", "content": "Hello there, friend"}],
                     [{"role": "assistant", "content": "hey!"}]], "id": 0},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
     "completions": [[{"role": "assistant", "content": "Red"}], [{"role": "assistant", "content": "A deep blue."}]],
     "id": 1},
]


def direct_rewards(path, rows):
    """One forward pass per sequence: the text (or chat) tokenized by hand, `logits[:, 0]`."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    out = []
    for row in rows:
        rewards = []
        for completion in row["completions"]:
            if isinstance(row["prompt"], str):
                ids = tokenizer(row["prompt"] + completion + tokenizer.eos_token)["input_ids"]
            else:
                ids = tokenizer.apply_chat_template(row["prompt"] + completion, tokenize=True, return_dict=True)[
                    "input_ids"]
            with torch.no_grad():
                rewards.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
        out.append(rewards)
    return out


@pytest.mark.parametrize("batch_size", [1, 3])
def test_reward_model_scores_equal_a_direct_forward_pass(reward_model, tmp_path, batch_size):
    for name, rows, suffix in (("standard", STANDARD, ".jsonl"), ("chat", CHAT, ".parquet")):
        data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        output = tmp_path / f"{name}-rated{suffix}"
        sidecar = score(["--dataset_name", data, "--reward_model", reward_model, "--output", str(output),
                         "--batch_size", str(batch_size), "--dtype", "auto"])
        if suffix == ".parquet":
            import datasets

            scored = datasets.load_dataset("parquet", data_files=str(output), split="train").to_list()
        else:
            scored = read_jsonl(output)
        expected = direct_rewards(reward_model, rows)
        assert [r["id"] for r in scored] == [r["id"] for r in rows]
        assert [r["completions"] for r in scored] == [r["completions"] for r in rows]
        for got, want in zip(scored, expected):
            assert got["rewards"] == pytest.approx(want, abs=1e-5)
        assert len({round(r, 3) for row in expected for r in row}) > 3  # the rewards differ: the check has teeth
        (source,) = sidecar["sources"]
        assert source["kind"] == "reward_model" and source["dtype"] == "float32" and source["batch_size"] == batch_size
        assert source["truncated_sequences"] == 0 and source["sequences"] == sum(len(r["completions"]) for r in rows)
        assert json.loads((tmp_path / f"{name}-rated.scoring.json").read_text())["stats"]["rows_out"] == len(rows)


def test_reward_model_first_then_functions_weighted(reward_model, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", STANDARD)
    sidecar = score(["--dataset_name", data, "--reward_funcs", spec("length_reward"), "--reward_model", reward_model,
                     "--reward_weights", "2", "0.5", "--output", str(tmp_path / "o.jsonl")])
    expected = direct_rewards(reward_model, STANDARD)
    for got, row, model in zip(read_jsonl(tmp_path / "o.jsonl"), STANDARD, expected):
        assert got["rewards"] == pytest.approx([2 * m + 0.5 * len(c) for m, c in zip(model, row["completions"])],
                                               abs=1e-5)
    assert [(s["kind"], s["weight"]) for s in sidecar["sources"]] == [("reward_model", 2.0), ("reward_function", 0.5)]


def test_reward_model_truncation_is_counted(reward_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", STANDARD)
    sidecar = score(["--dataset_name", data, "--reward_model", reward_model, "--output", str(tmp_path / "o.jsonl"),
                     "--max_length", "6"])
    (source,) = sidecar["sources"]
    assert source["max_length"] == 6 and 0 < source["truncated_sequences"] <= source["sequences"] == 8
    assert "were longer than max_length=6 tokens and truncated (their start" in capsys.readouterr().out
    # The head reads the last token, so the start goes: with the end cut (the tokenizer's default side), every
    # completion of a prompt longer than max_length was scored on the same prefix, the same reward
    rewards = [row["rewards"] for row in read_jsonl(tmp_path / "o.jsonl")]
    assert all(len(set(r)) == len(r) for r in rewards), rewards


def test_a_reward_model_needs_one_label(reward_model, tmp_path):
    import shutil

    two = tmp_path / "two-labels"
    shutil.copytree(reward_model, two)
    config = json.loads((two / "config.json").read_text())
    config["id2label"] = {"0": "LABEL_0", "1": "LABEL_1"}
    config["label2id"] = {"LABEL_0": 0, "LABEL_1": 1}
    (two / "config.json").write_text(json.dumps(config))
    data = write_jsonl(tmp_path / "rows.jsonl", STANDARD)
    with pytest.raises(ValueError, match="has num_labels=2"):
        score(["--dataset_name", data, "--reward_model", str(two), "--output", str(tmp_path / "o.jsonl")])
    assert not (tmp_path / "o.jsonl").exists()



def test_chat_rows_need_the_reward_models_chat_template_before_it_loads(reward_model, tmp_path, monkeypatch):
    """Chat rows and a reward model whose tokenizer has no chat template failed once the model had loaded, with a
    traceback (exit 1); `nca-trl generate` refuses the same case up front. Now refused before the model loads."""
    import shutil

    from transformers import AutoModelForSequenceClassification

    from nca_trl.cli import main

    plain = tmp_path / "no-template"
    shutil.copytree(reward_model, plain)
    for name in ("chat_template.jinja", "chat_template.json"):
        (plain / name).unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model was loaded"))
    data = write_jsonl(tmp_path / "rows.jsonl", CHAT)
    assert main(["score", "--dataset_name", data, "--reward_model", str(plain), "--output",
                 str(tmp_path / "o.jsonl")]) == 2
    assert not (tmp_path / "o.jsonl").exists()

# ----------------------------------------------------------------------------------------------- reward functions
def test_none_drops_the_completion_and_then_the_row_with_counts_in_the_sidecar(tmp_path):
    rows = [
        {"prompt": "p0", "completions": ["a", "xb", "cc"], "tag": "keep"},    # xb: None -> 2 left, kept
        {"prompt": "p1", "completions": ["xa", "xb", "c"], "tag": "drop"},    # 1 left -> row dropped
        {"prompt": "p2", "completions": ["a", "", "bbb"], "tag": "empty"},   # "" dropped, 2 left, kept
        {"prompt": "p3", "completions": ["", "x", "a"], "tag": "drop2"},     # "" and x dropped -> row dropped
        {"prompt": "p4", "completions": ["a", "bb"], "rewards": [9.0, 9.0], "tag": "old"},  # rewards replaced
    ]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    output = tmp_path / "out" / "rated.jsonl"
    sidecar = score(["--dataset_name", data, "--reward_funcs", spec("none_for_x"), "--reward_funcs",
                     spec("length_reward"), "--output", str(output), "--chunk_size", "2"])
    scored = read_jsonl(output)
    assert [r["tag"] for r in scored] == ["keep", "empty", "old"]
    assert [r["completions"] for r in scored] == [["a", "cc"], ["a", "bbb"], ["a", "bb"]]
    assert [r["rewards"] for r in scored] == [[2.0, 3.0], [2.0, 4.0], [2.0, 3.0]]
    assert list(scored[0]) == ["prompt", "completions", "rewards", "tag"]
    stats = sidecar["stats"]
    assert stats["dropped"] == {"empty_completions": 2, "none_rewards": 4, "rows_fewer_than_2_completions": 2,
                                "completions_in_dropped_rows": 2}
    assert stats["none_by_source"] == {spec("none_for_x"): 4, spec("length_reward"): 0}
    assert (stats["rows_in"], stats["rows_out"], stats["completions_in"], stats["completions_out"]) == (5, 3, 14, 6)
    assert stats["replaced_rewards"] == 1
    lengths = [1, 2, 2, 2, 2, 1, 1, 3, 1, 1, 1, 2]  # every non-empty completion is scored, kept or not
    assert stats["sources"][spec("length_reward")] == {
        "weight": 1.0, "count": 12, "mean": pytest.approx(19 / 12), "std": pytest.approx(statistics.pstdev(lengths)),
        "min": 1.0, "max": 3.0, "none": 0}
    written = json.loads((tmp_path / "out" / "rated.scoring.json").read_text())
    assert written["stats"] == json.loads(json.dumps(stats)) and written["weights"] == [1.0, 1.0]
    assert {"torch", "transformers", "trl", "nca-trl"} <= set(written["versions"])
    assert [s["kind"] for s in written["sources"]] == ["reward_function"] * 2


def test_finished_follows_the_kept_completions_and_reaches_each_reward_call_as_its_own():
    """generate's per-completion `finished` was carried whole while score dropped completions: the flags of a
    row no longer matched its completions (a finished one trained without EOS)."""
    rows = [{"prompt": "p", "completions": ["a", "", "xc", "dd", "eee"], "finished": [True, True, False, False, True]}]
    seen = []

    def reward(prompts, completions, finished, **kwargs):
        seen.extend(zip(completions, finished))
        return [None if c.startswith("x") else float(len(c)) for c in completions]

    scored, _ = score_rows(rows, {"r": reward}, progress=False)
    assert seen == [("a", True), ("xc", False), ("dd", False), ("eee", True)]  # "" dropped before scoring
    assert scored[0]["completions"] == ["a", "dd", "eee"] and scored[0]["finished"] == [True, False, True]


def test_evaluation_scores_empty_completions_and_keeps_rows_with_one(tmp_path):
    """`--evaluation` (what `nca-trl iterate` scores its held-out samples with): an empty completion is scored like
    the others and a row is kept with one scored completion, so a model that answers nothing is not scored on its other
    answers only (its held-out mean rose as it answered nothing more often); None still leaves a completion out."""
    logged = []
    rows = [
        {"prompt": "p0", "completions": ["a", "", "cc"]},
        {"prompt": "p1", "completions": ["xa", "xb", ""]},   # one left: kept
        {"prompt": "p2", "completions": ["xa", "xb"]},       # none left: dropped
    ]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    output = tmp_path / "rated.jsonl"
    sidecar = score(["--dataset_name", data, "--reward_funcs", spec("none_for_x"), "--reward_funcs",
                     spec("length_reward"), "--output", str(output), "--evaluation", "true"])
    scored = read_jsonl(output)
    assert [r["completions"] for r in scored] == [["a", "", "cc"], [""]]
    assert [r["rewards"] for r in scored] == [[2.0, 1.0, 3.0], [1.0]]
    assert sidecar["stats"]["dropped"] == {"empty_completions": 0, "none_rewards": 4,
                                           "rows_fewer_than_2_completions": 1, "completions_in_dropped_rows": 0}
    # A source that scores an empty completion None leaves it out after all: said, and counted
    rows = [{"prompt": "p0", "completions": ["a", "", "cc"]}]
    scored, stats = score_rows(rows, {"empty_none": lambda prompts, completions, **kw: [len(c) or None
                                                                                       for c in completions]},
                               progress=False, evaluation=True, log=logged.append)
    assert scored[0]["completions"] == ["a", "cc"] and stats["empty_scored_none"] == 1
    assert any("1 empty completion(s) scored None by a source: left out" in line for line in logged)
    score(["--dataset_name", data, "--reward_funcs", spec("none_for_x"), "--reward_funcs", spec("length_reward"),
           "--output", str(tmp_path / "for_training.jsonl")])
    assert [r["completions"] for r in read_jsonl(tmp_path / "for_training.jsonl")] == [["a", "cc"]]  # for training: as before

    # An evaluation checks the rows as training does, less the empty completions and K >= 2: a null prompt, a null
    # completion and a chat row with a completion of the user's were scored (or a reward's RuntimeError, exit 1)
    bad = [([{"prompt": None, "completions": ["a"]}], r"row 0, field 'prompt'"),
           ([{"prompt": "p", "completions": ["a", None]}], r"row 0, field 'completions'"),
           ([{"prompt": [{"role": "user", "content": "hi"}],
              "completions": [[{"role": "user", "content": "me?"}], []]}], r"row 0, field 'completions'")]
    for rows, where in bad:
        with pytest.raises(ValueError, match=where):
            score_rows(rows, {"length": length_reward}, progress=False, evaluation=True)


def test_two_sources_with_weights_give_the_weighted_sum(tmp_path, monkeypatch):
    # a module of the current folder, named `module:function` and `module.function`
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, completions, **kwargs):\n    return [float(len(c)) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    rows = [{"prompt": "p", "completions": ["a", "bbb", "cc"]}, {"prompt": "q", "completions": ["dddd", "e"]}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    sidecar = score(["--dataset_name", data, "--reward_funcs", "my_rewards:length", spec("constant_two"),
                     "my_rewards.length", "--reward_weights", "0.5", "-1.5", "0.25", "--output", "rated.parquet"])
    import datasets

    scored = datasets.load_dataset("parquet", data_files=str(tmp_path / "rated.parquet"), split="train").to_list()
    assert [r["rewards"] for r in scored] == [[0.75 * n - 3.0 for n in (1, 3, 2)], [0.75 * n - 3.0 for n in (4, 1)]]
    assert sidecar["weights"] == [0.5, -1.5, 0.25]
    assert [s["name"] for s in sidecar["sources"]] == ["my_rewards:length", spec("constant_two"), "my_rewards.length"]
    assert sidecar["stats"]["rewards"]["min"] == -2.25 and sidecar["stats"]["rewards"]["max"] == 0.0


def test_reward_functions_get_grpo_style_flattened_arguments():
    calls = []

    def recorder(prompts, completions, **kwargs):
        calls.append({"prompts": prompts, "completions": completions, **kwargs})
        kwargs["log_metric"]("seen", len(completions))
        return [0.0] * len(completions)

    rows = [{"prompt": "p0", "completions": ["a", "b"], "answer": "b", "meta": {"k": 1}},
            {"prompt": "p1", "completions": ["c", "d", "e"], "answer": "e", "meta": {"k": 2}},
            {"prompt": "p2", "completions": ["f", "g"], "answer": "f", "meta": None}]
    scored, stats = score_rows(rows, {"rec": recorder, "match": matches_answer}, [0.0, 1.0], chunk_size=2,
                               progress=False)
    assert [r["rewards"] for r in scored] == [[0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0]]
    assert [set(c) for c in calls] == [{"prompts", "completions", "answer", "meta", "log_metric", "log_extra"}] * 2
    assert calls[0]["prompts"] == ["p0", "p0", "p1", "p1", "p1"] and calls[1]["prompts"] == ["p2", "p2"]
    assert calls[0]["completions"] == ["a", "b", "c", "d", "e"]
    assert calls[0]["answer"] == ["b", "b", "e", "e", "e"] and calls[0]["meta"] == [{"k": 1}] * 2 + [{"k": 2}] * 3
    assert stats["metrics"] == {"seen": 3.5} and stats["sources"]["rec"]["weight"] == 0.0
    # Every row tied (a function that scores every completion alike): said, as training would have nothing to learn
    said = []
    score_rows(rows, {"rec": recorder}, log=said.append, progress=False)
    assert any("in every one of the 3 rows all completions got the same reward" in line for line in said), said
    said.clear()
    score_rows(rows, {"match": matches_answer}, log=said.append, progress=False)
    assert not any("every one of the" in line for line in said)
    # A column named as an argument of the functions replaced it: `prompts` scored other prompts' answers, exit 0
    for column in ("prompts", "log_metric"):
        with pytest.raises(DataError, match=rf"row 1 has a column `{column}`, a name that the reward functions take"):
            score_rows([rows[0], {**rows[1], column: "99999>"}], {"match": matches_answer}, progress=False)


@pytest.mark.parametrize("func, match", [
    ("wrong_length", r"returned 6 rewards for rows 0-2, expected 7"),
    ("a_string", r"returned 'high' \(str\) for row 0, completion 1: expected a real number"),
    ("nan_for_bad", r"returned nan for row 2, completion 1: rewards must be finite"),
    ("raises", r"failed on rows 0-2: KeyError: 'solution'"),
    ("NOT_CALLABLE", r"is a int, not callable"),
    ("no_such_function", r"has no attribute 'no_such_function'"),
])
def test_bad_reward_functions_are_errors_naming_the_source_and_the_row(tmp_path, func, match):
    rows = [{"prompt": "p", "completions": ["a", "b"]}, {"prompt": "q", "completions": ["a", "c", "d"]},
            {"prompt": "r", "completions": ["a", "bad"]}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match) as error:
        score(["--dataset_name", data, "--reward_funcs", spec(func), "--output", str(tmp_path / "o.jsonl")])
    assert spec(func) in str(error.value)
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.scoring.json").exists()


def test_a_bad_reward_source_or_output_is_one_line_exit_2_before_scoring(tmp_path, monkeypatch, capsys):
    """A reward source's bad values (NaN, a string, an int past float's range) were tracebacks with exit 1 (the last
    one a bare OverflowError naming neither source nor row); an output that is a folder or under a file failed after
    every row was scored, leaving a temporary file behind."""
    from nca_trl.cli import main
    from nca_trl.scoring import run

    rows = [{"prompt": "p", "completions": ["a", "b"]}, {"prompt": "r", "completions": ["a", "bad"]}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = str(tmp_path / "o.jsonl")
    for func, words in (("nan_for_bad", "returned nan for row 1, completion 1"), ("a_string", "'high' (str)"),
                        ("huge_int", "returned inf for row 0, completion 0"),
                        ("huge_float", "returned 1e+308 for row 1, completion 1: rewards must be within float32's")):
        assert main(["score", "--dataset_name", data, "--reward_funcs", spec(func), "--output", out]) == 2
        err = capsys.readouterr().err
        assert words in err and spec(func) in err and "Traceback" not in err
    # Past float32 once weighted: an OverflowError in the summary under --evaluation (a bare traceback, no row)
    for evaluation in ("false", "true"):
        assert main(["score", "--dataset_name", data, "--reward_funcs", spec("large"), "--reward_weights", "10",
                     "--evaluation", evaluation, "--output", out]) == 2
        err = capsys.readouterr().err
        assert "the weighted reward 3e+39 of row 1, completion 1 is past float32's range" in err, err
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder.jsonl").mkdir()
    monkeypatch.setattr(run, "load_rows", lambda args: pytest.fail("the rows were read"))
    for output, words in ((tmp_path / "afile" / "o.jsonl", "is a file"), (tmp_path / "folder.jsonl", "is a folder")):
        assert main(["score", "--dataset_name", data, "--reward_funcs", "ascii_letters", "--output", str(output)]) == 2
        assert words in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder.jsonl", "rows.jsonl"]
    # generate's folder (its output and the sidecar): a 5 KB Arrow cast error over the sidecar, exit 2, before
    monkeypatch.undo()
    (tmp_path / "gen").mkdir()
    write_jsonl(tmp_path / "gen" / "g.jsonl", rows)
    (tmp_path / "gen" / "g.generation.json").write_text(json.dumps({"output": "g.jsonl", "settings": {}}))
    assert main(["score", "--dataset_name", str(tmp_path / "gen"), "--reward_funcs", "ascii_letters", "--output",
                 out]) == 2
    err = capsys.readouterr().err
    assert "pass the data file itself" in err and str(tmp_path / "gen" / "g.jsonl") in err and len(err) < 600
    # The output over the rows it scores: generate's samples replaced by rated rows without their empty completions
    samples = tmp_path / "gen" / "g.jsonl"
    before = samples.read_text()
    assert main(["score", "--dataset_name", str(samples), "--reward_funcs", "ascii_letters", "--output",
                 str(samples)]) == 2
    assert "`output` is `dataset_name`" in capsys.readouterr().err and samples.read_text() == before
    # Over another generate output: it replaced those samples, and a rerun of generate took the file as done
    assert main(["score", "--dataset_name", data, "--reward_funcs", "ascii_letters", "--output", str(samples)]) == 2
    assert "is the output of an `nca-trl generate` run" in capsys.readouterr().err and samples.read_text() == before
    # A folder where the record goes: found after every row was scored (IsADirectoryError, a temporary file left)
    (tmp_path / "x.scoring.json").mkdir()
    assert main(["score", "--dataset_name", data, "--reward_funcs", "ascii_letters", "--output",
                 str(tmp_path / "x.jsonl")]) == 2
    assert "x.scoring.json is a folder where the record of the run is written" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".x", "x.jsonl"))]
    # `~` (a recipe's, which no shell expanded) is where the output goes, not a folder named `~` here
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert parse_score_args(["--dataset_name", data, "--reward_funcs", "ascii_letters", "--output",
                             "~/o.jsonl"]).output == str(tmp_path / "home" / "o.jsonl")


def test_arguments_and_sources_are_checked(tmp_path):
    base = ["--dataset_name", "d.jsonl", "--output", "o.jsonl"]
    with pytest.raises(ValueError, match=r"`reward_weights` has 1 value\(s\) but there are 2 reward source\(s\)"):
        parse_score_args([*base, "--reward_model", "rm", "--reward_funcs", "m:f", "--reward_weights", "1"])
    with pytest.raises(ValueError, match="at least one reward source"):
        parse_score_args(base)
    with pytest.raises(ValueError, match="finite"):
        parse_score_args([*base, "--reward_funcs", "m:f", "--reward_weights", "nan"])
    with pytest.raises(ValueError, match="`output` must end with one of"):
        parse_score_args(["--dataset_name", "d", "--output", "o.csv", "--reward_funcs", "m:f"])
    # Reward functions are imported when the arguments are built: a misspelled one fails before anything is read
    with pytest.raises(ValueError, match=r"Reward function 'm:f': no module named 'm'"):
        parse_score_args([*base, "--reward_funcs", "m:f"])
    with pytest.raises(ValueError, match="needs `output`"):
        parse_score_args(["--dataset_name", "d", "--reward_funcs", "ascii_letters"])
    funcs = ["sorted_digits", "ascii_letters", "nca_trl.scoring.functions:ascii_letters"]
    args = parse_score_args([*base, "--reward_funcs", funcs[0], "--batch_size", "2", "--reward_funcs", *funcs[1:]])
    assert args.reward_funcs == funcs and args.weights == [1.0, 1.0, 1.0]
    config = tmp_path / "s.yaml"
    config.write_text("reward_func: [ascii_letters]\n")
    with pytest.raises(ValueError, match="did you mean 'reward_funcs'.*nca-trl score --help"):
        parse_score_args([*base, "--config", str(config)])
    config.write_text("reward_funcs: [sorted_digits, ascii_letters]\nreward_weights: [2, 3]\n")
    assert parse_score_args([*base, "--config", str(config)]).weights == [2.0, 3.0]

    out = str(tmp_path / "o.jsonl")
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "p", "completions": ["a", "xb"]}])
    with pytest.raises(ValueError, match="no module named 'no_such_module_xyz'"):
        score(["--dataset_name", rows, "--reward_funcs", "no_such_module_xyz:f", "--output", out])
    with pytest.raises(ValueError, match="does not exist"):
        score(["--dataset_name", rows, "--reward_funcs", str(tmp_path / "nope.py:f"), "--output", out])
    with pytest.raises(ValueError, match="Every row was dropped"):
        score(["--dataset_name", rows, "--reward_funcs", spec("none_for_x"), "--output", out])
    assert not (tmp_path / "o.jsonl").exists()
    no_completions = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "p"}])
    with pytest.raises(ValueError, match="no `completions` column"):
        score(["--dataset_name", no_completions, "--reward_funcs", "ascii_letters", "--output", out])


def test_bundled_reward_functions():
    prompts = ["31415>", "<s>31415>", "31415>", "31415>", "Sort: 907>", "hello", "hi>"]
    completions = ["11345", " 11345\n", "11354", "1134", "079", "x", "x"]
    assert sorted_digits(prompts, completions) == [1.0, 1.0, 3 / 5, 4 / 5, 1.0, None, None]
    chat_prompt = [{"role": "user", "content": "2210>"}]
    assert sorted_digits([chat_prompt], [[{"role": "assistant", "content": "0122"}]]) == [1.0]
    assert sorted_digits(["12>"], ["123"]) == [2 / 3]  # an extra character counts as wrong
    assert ascii_letters(["p"] * 5, ["Hello world", "Hi 42!", "", "éé a", [{"role": "assistant", "content": "ok."}]]) \
        == [1.0, 0.5, 0.0, 0.5, 2 / 3]
    # through the command's names
    rows = [{"prompt": "321>", "completions": ["123", "132", "1"]}]
    scored, _ = score_rows(rows, {"sorted_digits": sorted_digits}, progress=False)
    assert scored[0]["rewards"] == [1.0, 1 / 3, 1 / 3]


# -------------------------------------------------------------------------------------------------------- pipeline
@pytest.mark.slow
def test_cli_generate_then_score_then_train(tiny_mistral, tmp_path, hh):
    """`nca-trl generate ... && nca-trl score ... && nca-trl train --dataset_name <scored file>`, in subprocesses."""
    prompts = [{"prompt": row["prompt"], "source": "hh"} for row in hh if len(row["prompt"]) < 160][:6]
    data = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    samples, rated, out = tmp_path / "gen" / "samples.jsonl", tmp_path / "gen" / "rated.jsonl", tmp_path / "trained"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}

    def run(*argv):
        done = subprocess.run([sys.executable, "-m", "nca_trl.cli", *argv], check=False, capture_output=True,
                              text=True, env=env, cwd=REPO, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    run("generate", "--model_name_or_path", tiny_mistral, "--dataset_name", data, "--output", str(samples),
        "--num_completions", "3", "--max_new_tokens", "8")
    printed = run("score", "--dataset_name", str(samples), "--reward_funcs", "nca_trl.scoring.functions:ascii_letters",
                  "--output", str(rated))
    assert "[nca-trl score]" in printed
    scored = read_jsonl(rated)
    assert 1 <= len(scored) <= 6 and all(row["source"] == "hh" for row in scored)
    for row in scored:
        assert 2 <= len(row["completions"]) == len(row["rewards"]) == len(row["finished"]) <= 3
        assert row["rewards"] == ascii_letters([row["prompt"]] * len(row["completions"]), row["completions"])
    assert json.loads((tmp_path / "gen" / "rated.scoring.json").read_text())["stats"]["rows_out"] == len(scored)
    run("train", "--model_name_or_path", tiny_mistral, "--dataset_name", str(rated), "--output_dir", str(out),
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "64", "--report_to", "none",
        "--use_cpu", "true", "--bf16", "false", "--activation_checkpointing", "false", "--save_strategy", "no",
        "--logging_steps", "1", "--dtype", "float32")
    assert (out / "config.json").exists() and any(out.glob("*.safetensors"))
    assert json.loads((out / "run_info.json").read_text())["global_step"] == 2


def test_carried_columns_reach_reward_functions_and_the_output_as_written(tmp_path):
    """A column whose values change type across rows (12, "34", "0056") is read by `datasets` as JSON values, which
    decoded the text "0056" to 56: the reward function and the output got other values than the file's, exit 0.
    Refused now, naming the line, the column and the fix; nothing is written."""
    rows = [{"prompt": "12>", "completions": ["12", "21"], "solution": 12},
            {"prompt": "34>", "completions": ["34", "43"], "solution": "plain text"},
            {"prompt": "56>", "completions": ["56", "65"], "solution": "0056"}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    output = tmp_path / "rated.jsonl"
    with pytest.raises(ValueError, match=r"rows.jsonl, line 3, column 'solution': the text '0056' would be read as "
                                         r"56\. .* Fix: give the column one type in every row"):
        score(["--dataset_name", data, "--reward_funcs", spec("length_reward"), "--output", str(output)])
    assert not output.exists() and not (tmp_path / "rated.scoring.json").exists()


def test_a_parquet_output_is_checked_before_scoring_and_the_sidecar_follows_the_rows(tmp_path, monkeypatch):
    """A column of an object in one row and a string in another fits a JSON Lines file but not one Parquet column:
    pyarrow raised after the scoring, with the sidecar already written and no output. Refused before scoring now,
    naming the column; and a sidecar is written only after its rows."""
    import nca_trl.scoring.run as run

    rows = [{"prompt": "a", "completions": ["x", "yy"], "meta": {"k": 1}},
            {"prompt": "b", "completions": ["x", "yy"], "meta": "plain"}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    argv = ["--dataset_name", data, "--reward_funcs", spec("length_reward")]
    with pytest.raises(ValueError, match=r"rows.jsonl \(for the Parquet output .*rated.parquet\): column 'meta' mixes "
                                         r"value types across rows .* write a .jsonl output instead"):
        score([*argv, "--output", str(tmp_path / "rated.parquet")])
    assert not list(tmp_path.glob("rated*"))
    assert read_jsonl(score([*argv, "--output", str(tmp_path / "rated.jsonl")])["output"])[1]["meta"] == "plain"

    def fails(path, rows):
        raise OSError("disk full")

    monkeypatch.setattr(run, "write_rows", fails)
    with pytest.raises(OSError):
        score([*argv, "--output", str(tmp_path / "again.jsonl")])
    assert not list(tmp_path.glob("again*"))
