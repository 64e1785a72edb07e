"""Local data files and folders (`nca_trl.data.loading`): a folder is loaded whole or refused, and a broken file is
reported by name (and line) as a `DataFileError` before `datasets` reads it, not as a library traceback."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from nca_trl.data.datafiles import DataFileError
from nca_trl.runtime.errors import ROW_INDEX
from nca_trl.data.loading import load_datasets, load_raw

REPO = Path(__file__).resolve().parents[1]
ROW = {"prompt": "What is 2 + 2?", "completions": ["4", "5", "22"], "rewards": [1.0, 0.0, 0.5]}
NO_MIXTURE = SimpleNamespace(datasets=[])


def rows(n, start=0):
    return [{**ROW, "prompt": f"question {i}"} for i in range(start, start + n)]


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def raw(name, config=None):
    return load_raw(SimpleNamespace(dataset_name=str(name), dataset_config=config), NO_MIXTURE)


def write_csv(path, n):
    path.write_text("prompt,chosen,rejected\n" + "".join(f"q{i},good,bad\n" for i in range(n)), encoding="utf-8")
    return path


def test_a_file_rewritten_with_its_modification_time_kept_is_read_again(tmp_path, caplog):
    """`datasets` keys its cache of a local file on its path and modification time: a file rewritten with the time
    kept (`cp -p`, `rsync -t`, tar) gave the cached old rows (40 prompts trained from a 20-line file, exit 0) while
    the checks read the new file. A cache of another size is read again, said so; files too (a folder's)."""
    import logging
    import os

    for name in ("file", "folder"):
        path = tmp_path / name / "rated.jsonl"
        write_jsonl(path, rows(40))
        stamp = (1_700_000_000, 1_700_000_000)
        os.utime(path, stamp)
        assert len(raw(path if name == "file" else path.parent)["train"]) == 40  # cached
        write_jsonl(path, rows(20, 100))
        os.utime(path, stamp)
        with caplog.at_level(logging.WARNING, logger="nca_trl"):
            again = raw(path if name == "file" else path.parent)["train"]
        assert len(again) == 20 and again[0]["prompt"] == "question 100", name
        assert "the datasets cache held another version of it (the same modification time, another size): read " \
               "again" in caplog.text
        caplog.clear()
        assert len(raw(path if name == "file" else path.parent)["train"]) == 20 and not caplog.text  # cached now


# ---------------------------------------------------------------------------------------------------------- folders
def test_folder_with_two_file_types_is_refused_naming_both(tmp_path):
    """Before: datasets picks the most common type and trains on the jsonl rows only, without a word."""
    write_jsonl(tmp_path / "data" / "a.jsonl", rows(3))
    write_jsonl(tmp_path / "data" / "b.jsonl", rows(3, 3))
    write_csv(tmp_path / "data" / "c.csv", 2)
    with pytest.raises(DataFileError) as info:
        raw(tmp_path / "data")
    message = str(info.value)
    assert "2 types" in message and "json: 2 files (a.jsonl, b.jsonl)" in message and "csv: 1 file (c.csv)" in message
    assert "`datasets:` mixture" in message


def test_folder_with_files_outside_the_splits_is_refused(tmp_path):
    """Before: once a file is named for a split, datasets keeps only such files (extra.jsonl silently left out)."""
    folder = tmp_path / "data"
    write_jsonl(folder / "train.jsonl", rows(4))
    write_jsonl(folder / "test.jsonl", rows(2, 4))
    write_jsonl(folder / "extra.jsonl", rows(3, 6))
    with pytest.raises(DataFileError, match=r"skip the 1 data file that match no split: extra\.jsonl"):
        raw(folder)
    (folder / "extra.jsonl").rename(folder / "train-2.jsonl")
    loaded = raw(folder)
    assert sorted(loaded) == ["test", "train"] and len(loaded["train"]) == 7 and len(loaded["test"]) == 2


def test_folder_of_one_type_loads_every_file(tmp_path):
    folder = tmp_path / "data"
    write_jsonl(folder / "a.jsonl", rows(3))
    write_jsonl(folder / "sub" / "b.json", rows(2, 3))
    (folder / "README.md").write_text("# notes, not data\n")
    write_jsonl(folder / ".hidden" / "c.jsonl", rows(5, 100))  # hidden: skipped, as datasets does
    loaded = raw(folder)
    assert list(loaded) == ["train"] and sorted(loaded["train"]["prompt"]) == [f"question {i}" for i in range(5)]
    with pytest.raises(DataFileError, match="holds no data file"):
        (tmp_path / "empty").mkdir()
        raw(tmp_path / "empty")


def test_bad_file_in_a_folder_is_named(tmp_path):
    folder = tmp_path / "data"
    write_jsonl(folder / "a.jsonl", rows(3))
    (folder / "b.jsonl").write_text(json.dumps(ROW) + "\n" + json.dumps(ROW)[:20])
    with pytest.raises(DataFileError, match=re.escape(f"{folder / 'b.jsonl'}, line 2: the last line ends")):
        raw(folder)


# ---------------------------------------------------------------------------------------------------------- files
GOOD = json.dumps(ROW)

JSON_CASES = {
    # name: (file name, bytes, pattern of the message, line)
    "empty": ("d.jsonl", b"", r"d\.jsonl is empty \(0 bytes\)", None),
    "blank lines only": ("d.jsonl", b"\n  \n\n", r"d\.jsonl holds no data: only blank lines", None),
    "truncated last line": (
        "d.jsonl", (GOOD + "\n" + GOOD + "\n" + GOOD[:30]).encode(),
        r"d\.jsonl, line 3: the last line ends before its JSON object does .*Unterminated string starting at column "
        r"\d+.*the file looks truncated", 3,
    ),
    "bad line in the middle": (
        "d.jsonl", (GOOD + "\n" + GOOD[:-1] + "\n" + GOOD + "\n").encode(),
        r"d\.jsonl, line 2: the line ends before its JSON object does \(not valid JSON: Expecting ',' delimiter", 2,
    ),
    "not UTF-8": (
        "d.jsonl", (GOOD + "\n").encode() + json.dumps({**ROW, "prompt": "caf#"}).encode().replace(b"#", b"\xe9") + b"\n",
        r"d\.jsonl, line 2: byte \d+ \(column 16 of line 2\) is not UTF-8: b'\\xe9.*iconv", 2,
    ),
    "number beyond float64": (
        "d.jsonl", (GOOD + "\n" + GOOD.replace("0.5", "1e999") + "\n").encode(),
        r"d\.jsonl, line 2: the number 1e999 is beyond float64's range", 2,
    ),
    "integer beyond float64": (
        "d.jsonl", (GOOD.replace("0.5", "1" + "0" * 400) + "\n").encode(),
        r"d\.jsonl, line 1: the number 10000000\.\.\.\(401 digits\) is beyond float64's range", 1,
    ),
    "line that is not an object": (
        "d.jsonl", (GOOD + "\n[1, 2]\n").encode(), r"d\.jsonl, line 2: an array where a row \(a JSON object\)", 2,
    ),
    "several bad lines": (
        "d.jsonl", (GOOD + "\n{\n" + GOOD + "\n{\n" + GOOD + "\n").encode(), r"d\.jsonl: 2 bad lines \(2, 4\)", 2,
    ),
    "truncated JSON array": (
        "d.json", ("[" + GOOD + ",\n" + GOOD[:30]).encode(),
        r"d\.json: not valid JSON: Unterminated string starting at line 2.*looks truncated", 2,
    ),
    "pretty-printed document with a number beyond float64": (
        "d.json", json.dumps({"prompt": ["q"], "completions": [["a", "b"]], "rewards": [[2.5, 1]]}, indent=1)
        .replace("2.5", "-1e400").encode(), r"d\.json, line 13: the number -1e400 is beyond float64's range", 13,
    ),
    "empty csv": ("d.csv", b"", r"d\.csv is empty", None),
    "csv not UTF-8": ("d.csv", b"prompt,chosen,rejected\nq\xe9,a,b\n", r"d\.csv, line 2: byte 24 .* not UTF-8", 2),
    "csv with an unterminated quote": (
        "d.csv", b'prompt,chosen,rejected\n"q,a,b\n', r"Could not load the csv file .*d\.csv: .*EOF inside string", None,
    ),
    "not parquet": ("d.parquet", b"PAR1 not really", r"d\.parquet is not a readable Parquet file", None),
    "not arrow": ("d.arrow", b"not arrow at all", r"d\.arrow is not a readable Arrow file", None),
}


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_broken_file_names_the_file_and_line(tmp_path, case):
    """Before: StopIteration (empty), DatasetGenerationError (truncated, 1e999, bad csv), UnicodeDecodeError during
    conversion (not UTF-8), pyarrow's ArrowInvalid (parquet), or inf loaded as a reward (huge integer)."""
    name, content, pattern, line = JSON_CASES[case]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataFileError, match=pattern) as info:
        raw(path)
    assert str(path) in str(info.value) and info.value.line == line
    assert "Fix:" in str(info.value) or "Could not load" in str(info.value)


def test_good_files_load_unchanged(tmp_path):
    """JSON Lines with blank lines, CRLF and a BOM, a JSON array, a pretty-printed column mapping, CSV and Parquet."""
    from datasets import Dataset

    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + (GOOD + "\r\n\r\n" + GOOD + "\r\n").encode())
    array = tmp_path / "b.json"
    array.write_text(json.dumps(rows(3), indent=2))
    mapping = tmp_path / "c.json"
    mapping.write_text(json.dumps({k: [v] for k, v in ROW.items()}, indent=1))
    parquet = tmp_path / "d.parquet"
    Dataset.from_list(rows(4)).to_parquet(str(parquet))
    csv = write_csv(tmp_path / "e.csv", 5)
    assert [len(raw(p)["train"]) for p in (jsonl, array, mapping, parquet, csv)] == [2, 3, 1, 4, 5]


def test_a_csv_column_of_numeric_answers_is_named_once(tmp_path):
    """Every `chosen` cell a number ("4", "6"): `datasets` read the column as int64, and each row was refused as
    "'chosen' is an int ... give every completion non-empty text", which the file does. Named once, with why."""
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\nWhat is 2+2?,4,five\nWhat is 3+3?,6,seven\n", encoding="utf-8")
    script = SimpleNamespace(dataset_name=str(path), dataset_config=None, dataset_train_split="train",
                             dataset_test_split=None, eval_fraction=None, dataset_format="auto",
                             dataset_format_kwargs=None)
    with pytest.raises(DataFileError, match=r"pairs.csv: column 'chosen' is text to train on, but every cell of it "
                                            r"looks like a number .* read it as int64: a CSV file has no types"):
        load_datasets(script, NO_MIXTURE, SimpleNamespace(seed=0))


def test_a_compressed_file_loads_as_a_folder_of_them_does(tmp_path):
    """A folder of `.jsonl.gz` files loaded; one such file named alone was an unknown type ('.gz'). A broken one is
    still named by its checks."""
    import gzip

    single = tmp_path / "rows.jsonl.gz"
    single.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows(3)).encode()))
    assert list(raw(single)["train"]["prompt"]) == ["question 0", "question 1", "question 2"]
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress((GOOD + "\n" + GOOD[:40]).encode()))
    with pytest.raises(DataFileError, match="looks truncated"):
        raw(broken)
    with pytest.raises(ValueError, match=r"Unknown data file type '.gz' .* \(also compressed: .gz, .bz2, .xz\)"):
        (tmp_path / "notes.txt.gz").write_bytes(gzip.compress(b"x"))
        raw(tmp_path / "notes.txt.gz")


def test_hub_ids_go_to_datasets_as_they_are(monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or "loaded")
    assert raw("openbmb/UltraFeedback", config="default") == "loaded"
    assert calls == [(("openbmb/UltraFeedback",), {"name": "default"})]


def test_load_datasets_reports_the_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD + "\n" + GOOD[:40])
    script = SimpleNamespace(dataset_name=str(path), dataset_config=None)
    with pytest.raises(DataFileError, match="looks truncated"):
        load_datasets(script, NO_MIXTURE, SimpleNamespace(seed=0))


def test_cli_reports_a_data_error_before_loading_the_model(tmp_path, capsys):
    """`nca-trl train` with a broken data file and an empty model folder: the data error comes first (the data is
    loaded and checked before any model, tokenizer included), its message alone (exit 2)."""
    from nca_trl.cli import main

    (tmp_path / "never-loaded").mkdir()
    path = tmp_path / "d.jsonl"
    path.write_bytes((GOOD + "\n").encode() + b'{"prompt": "caf\xe9"}\n')
    argv = [
        "train", "--model_name_or_path", str(tmp_path / "never-loaded"), "--dataset_name", str(path),
        "--output_dir", str(tmp_path / "out"), "--bf16", "false", "--use_cpu", "true", "--report_to", "none",
    ]
    assert main(argv) == 2
    assert re.match(r"nca-trl train: error: .*d\.jsonl, line 2: byte \d+ .* is not UTF-8", capsys.readouterr().err)


def _load(path, **settings):
    args = SimpleNamespace(dataset_name=str(path), dataset_config=None, dataset_train_split="train",
                           dataset_test_split=None, eval_fraction=None, max_train_samples=None, max_eval_samples=None,
                           dataset_format="auto", dataset_format_kwargs=None)
    for key, value in settings.items():
        setattr(args, key, value)
    return load_datasets(args, NO_MIXTURE, SimpleNamespace(seed=0))


def test_messages_name_rows_by_their_place_in_the_data_as_given(tmp_path, tokenizer, caplog):
    """Rows keep their position in the file through `eval_fraction`'s shuffled split and a raw layout's conversion
    that drops rows: the preparation's messages (a prompt that fills max_length, tied rewards) name the file's rows
    (they named positions in the split, or after the dropped rows)."""
    import logging

    from nca_trl.data.tokenize import prepare_rated_dataset

    records = [{**ROW, "prompt": "word " * 200 if i == 14 else f"q{i}",
                "rewards": [1.0, 1.0, 1.0] if i == 7 else ROW["rewards"]} for i in range(20)]
    train, evaluation = _load(write_jsonl(tmp_path / "d.jsonl", records), eval_fraction=0.25)
    split = {name: list(ds[ROW_INDEX]) for name, ds in (("train", train), ("eval", evaluation))}
    assert sorted(split["train"] + split["eval"]) == list(range(20)) and split["train"] != sorted(split["train"])
    settings = SimpleNamespace(max_length=64, truncation_mode="keep_start", dataset_num_proc=None, ties="drop")
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        for name, dataset in (("train", train), ("eval", evaluation)):
            prepare_rated_dataset(dataset, tokenizer, settings, name)
    assert re.search(r"dataset: dropped 1 of \d+ rows whose prompt alone fills max_length=64.*\(rows 14\)", caplog.text)
    assert re.search(r"dataset: dropped 1 of \d+ prompts whose rewards all tie \(ties='drop'; rows 7\)", caplog.text)

    columns = [{"prompt": f"q{i}", "A0": "a", "A1": None if i == 1 else "b", "A0_score": 1.0,
                "A1_score": None if i == 1 else 2.0} for i in range(8)]  # row 1: one completion, dropped
    train, _ = _load(write_jsonl(tmp_path / "columns.jsonl", columns), dataset_format="columns")
    assert list(train[ROW_INDEX]) == [0, 2, 3, 4, 5, 6, 7] and train["prompt"][1] == "q2"


def test_rewards_that_are_strings_in_some_rows_are_refused_in_any_file_type(tmp_path):
    """`datasets` reads a column that mixes numbers and strings as JSON values (and keeps that type in the Parquet
    it writes), turning "1" into 1: refused, naming the line of a JSON Lines file (a Parquet file crashed the line
    search with a UnicodeDecodeError)."""
    import datasets

    mixed = write_jsonl(tmp_path / "mixed.jsonl", [ROW, {**ROW, "rewards": ["1", "0", "0.5"]}])
    with pytest.raises(DataFileError, match=r"mixed\.jsonl: column 'rewards' holds a number in line 1 but a string in "
                                            r"line 2 \(position 0\): '1' \(strings among numbers\)"):
        _load(mixed)
    parquet = tmp_path / "mixed.parquet"
    datasets.load_dataset("json", data_files=str(mixed), split="train").to_parquet(str(parquet))
    with pytest.raises(DataFileError, match=r"mixed\.parquet: column 'rewards' changes type across rows \(strings "
                                            r"or other values among numbers\), which `datasets` reads as JSON values"):
        _load(parquet)


def test_a_row_index_column_of_the_users_own_is_left_alone(tmp_path):
    """The position column is private (`_nca_row_index`): a `row_index` of the user's own ids is neither taken for
    the positions nor changed, and a raw layout's conversion drops it as before (it was carried and cast to int64:
    `ArrowInvalid: Failed to parse string: 'id-2'`)."""
    rated = write_jsonl(tmp_path / "rated.jsonl", [{**r, "row_index": f"id-{i}"} for i, r in enumerate(rows(4))])
    train, _ = _load(rated)
    assert list(train["row_index"]) == ["id-0", "id-1", "id-2", "id-3"] and list(train[ROW_INDEX]) == [0, 1, 2, 3]
    columns = [{"prompt": f"q{i}", "A0": "a", "A1": "b", "A0_score": 1.0, "A1_score": 2.0, "row_index": f"id-{i}"}
               for i in range(4)]
    train, _ = _load(write_jsonl(tmp_path / "columns.jsonl", columns), dataset_format="columns")
    assert "row_index" not in train.column_names and list(train[ROW_INDEX]) == [0, 1, 2, 3]


@pytest.mark.parametrize("name, lines, message", [
    # before: trained (rc 0), the string "9" read as the number 9
    ("scores", [{"prompt": "q", "A0": "4", "A1": "5", "A0_score": 9, "A1_score": 2},
                {"prompt": "q", "A0": "4", "A1": "5", "A0_score": "9", "A1_score": 2}],
     r"column 'A0_score' holds a number in line 1 but a string in line 2: '9' \(strings among numbers\)"),
    # before: "row 0, completion 0 is an int" for the text "4" (decoded as JSON), rows 0-1 being valid
    ("styles", [ROW, ROW, {"prompt": [{"role": "user", "content": "q"}], "rewards": [1, 0],
                           "completions": [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]]}],
     r"column 'prompt' holds a string in line 1 but a list in line 3: .* \(mixed standard/conversational styles"),
    ("completions", [{**ROW, "completions": ["4", "5", "6"]}, {**ROW, "completions": ["4", [{"role": "assistant",
                                                                                            "content": "5"}], "6"]}],
     r"column 'completions' holds a string in line 1 but a list in line 2 \(position 1\)"),
    # before: "(strings among numbers) ... write every reward as a number (not a string)" for a boolean and a list
    ("booleans", [ROW, {**ROW, "rewards": [1.0, True, 0.5]}],
     r"column 'rewards' holds a number in line 1 but a boolean in line 2 \(position 1\): True \(booleans among "
     r"numbers\)"),
    ("nested", [ROW, {**ROW, "rewards": [1.0, [0.0], 0.5]}],
     r"column 'rewards' holds a number in line 1 but a list in line 2 \(position 1\): \[0\.0\] \(lists among "
     r"numbers\)"),
])
def test_columns_read_as_json_values_are_refused_naming_the_line(tmp_path, name, lines, message):
    path = write_jsonl(tmp_path / f"{name}.jsonl", lines)
    with pytest.raises(DataFileError, match=rf"{name}\.jsonl: {message}.*Fix: ") as info:
        _load(path, dataset_format="auto")
    assert info.value.line == int(re.findall(r"in line (\d+)", str(info.value))[1])


def test_messages_read_as_json_values_are_left_alone(tmp_path):
    """A column of messages some of which have 'tool_calls' is read with each message as a JSON value: decoded whole,
    it is what was written, so it is not refused."""
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get", "arguments": {"city": "Paris"}}}]}
    row = {"prompt": [{"role": "user", "content": "weather?"}], "rewards": [1.0, 0.0],
           "completions": [[call], [{"role": "assistant", "content": "sunny"}]]}
    train, _ = _load(write_jsonl(tmp_path / "tools.jsonl", [row] * 3))
    assert train[0]["completions"][0][0]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
