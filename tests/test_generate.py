"""`nca-trl generate`: prefill-once sampling, per-completion seeds, resumable chunks, the command end to end."""

import json
import re

import pytest
import torch

from nca_trl.generation import sampling
from nca_trl.generation.rows import completion_rows, decode_completion, tokenize_prompt
from nca_trl.generation.sampling import (
    completion_uniforms,
    inverse_cdf,
    sample_completions,
    stop_token_ids,
)

PROMPTS = [
    "The quick brown fox jumps over the lazy dog, and then",
    "Hi",
    "Write one sentence about the sea:",
]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_mistral):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_mistral, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_mistral)


def _kwargs(model, tokenizer, **overrides):
    kwargs = dict(num_completions=3, max_new_tokens=6, seed=7, stop_ids=stop_token_ids(model, tokenizer),
                  pad_token_id=tokenizer.eos_token_id, temperature=0.8, top_k=50, top_p=0.95)
    return {**kwargs, **overrides}


def _ids(tokenizer, prompts=PROMPTS):
    ids = [tokenize_prompt({"prompt": p}, tokenizer) for p in prompts]
    assert len({len(x) for x in ids}) == len(ids)  # different lengths: the batch is left-padded
    return ids


# ------------------------------------------------------------------------------------------------ (a) and (d): greedy
@pytest.mark.parametrize("prefill_once", [True, False])
def test_batched_left_padded_greedy_equals_plain_generate_one_prompt_at_a_time(model_and_tokenizer, prefill_once):
    """Left padding + attention mask (d), and prefill-once with the expanded cache (a): greedy completions of a batch
    of prompts of different lengths are token-identical to HF `generate` on each prompt alone (no padding, no
    cache trick)."""
    model, tokenizer = model_and_tokenizer
    ids = _ids(tokenizer)
    batch = sample_completions(model, ids, [0, 1, 2], sampling="greedy", prefill_once=prefill_once,
                               **_kwargs(model, tokenizer))
    for prompt_ids, completions in zip(ids, batch.completions):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.eos_token_id)
        expected = ref[0, len(prompt_ids):].tolist()
        assert all(c == expected for c in completions), (completions, expected)


# ------------------------------------------------------------------------------------------------ (a): sampling
def test_seeded_samples_do_not_depend_on_batching_nor_on_prefill_once(model_and_tokenizer):
    """Prefill-once sampling of a batch gives the same completions as sampling each prompt alone with K prefills
    (what `num_return_sequences` does), in any batch order: each completion has its own seeded stream."""
    model, tokenizer = model_and_tokenizer
    ids = _ids(tokenizer)
    kwargs = _kwargs(model, tokenizer)
    batched = sample_completions(model, ids, [10, 11, 12], **kwargs).completions
    alone = [sample_completions(model, [x], [10 + i], prefill_once=False, **kwargs).completions[0]
             for i, x in enumerate(ids)]
    assert batched == alone
    reordered = sample_completions(model, ids[::-1], [12, 11, 10], **kwargs).completions
    assert reordered[::-1] == batched
    # The K samples differ from one another, and a prompt's samples follow its row number and the seed
    assert all(len({tuple(c) for c in completions}) == 3 for completions in batched)
    assert sample_completions(model, ids, [13, 14, 15], **kwargs).completions != batched
    assert sample_completions(model, ids, [10, 11, 12], **{**kwargs, "seed": 8}).completions != batched
    # More completions per prompt keep the first ones; more tokens extend them (each completion's own stream)
    more = sample_completions(model, ids, [10, 11, 12], **{**kwargs, "num_completions": 4}).completions
    assert [m[:3] for m in more] == batched
    no_stop = {**kwargs, "stop_ids": []}
    short = sample_completions(model, ids[:1], [10], **no_stop).completions[0]
    longer = sample_completions(model, ids[:1], [10], **{**no_stop, "max_new_tokens": 9}).completions[0]
    assert [c[:6] for c in longer] == short


def test_step_logits_of_prefill_once_equal_plain_generation(model_and_tokenizer, monkeypatch):
    """At every generated step, the logits prefill-once generation samples from equal those of plain generation of
    each prompt alone (same prefix, since the samples are the same): the same distribution, step by step."""
    model, tokenizer = model_and_tokenizer
    recorded = []

    class Recording(sampling.SeededSampler):
        def __call__(self, input_ids, scores):
            recorded[-1].append(scores.clone())
            return super().__call__(input_ids, scores)

    monkeypatch.setattr(sampling, "SeededSampler", Recording)
    ids = _ids(tokenizer)
    kwargs = _kwargs(model, tokenizer, stop_ids=[], max_new_tokens=5)  # no stop: every row has every step
    recorded.append([])
    sample_completions(model, ids, [0, 1, 2], **kwargs)
    batched = recorded[-1]
    for i, x in enumerate(ids):
        recorded.append([])
        sample_completions(model, [x], [i], prefill_once=False, **kwargs)
        for step, (b, a) in enumerate(zip(batched, recorded[-1])):
            torch.testing.assert_close(b[3 * i:3 * i + 3], a, atol=1e-4, rtol=1e-4, msg=f"prompt {i}, step {step}")
        assert len(recorded[-1]) == len(batched) == 5


def test_inverse_cdf_on_a_fixed_grid_of_uniforms():
    """Deterministic: N evenly spaced uniforms give each token within one count of N * p; a token of probability 0
    is never drawn, not even at u = 0 or u close to 1."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]])
    n = 1000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tokens = inverse_cdf(probs.expand(n, -1), u)
    counts = torch.bincount(tokens, minlength=6)
    assert counts.tolist() == [0, 500, 0, 300, 200, 0]
    edges = inverse_cdf(probs.expand(3, -1), torch.tensor([0.0, 0.5, 1 - 1e-16], dtype=torch.float64))
    assert edges.tolist() == [1, 3, 4]


def test_a_nan_distribution_is_an_error_not_token_0():
    """NaN logits (a diverged model's, or a temperature of 1e-45: logits / T overflow) drew token 0, `<unk>`, for
    every token: completions of `<unk>`, exit 0. Now an error naming the step and the rows."""
    from nca_trl.generation.sampling import NonFiniteSamplingError, SeededSampler

    uniforms = torch.full((2, 4), 0.5)
    scores = torch.tensor([[1.0, 2.0, 0.5], [1.0, 2.0, 0.5]])
    sampler = SeededSampler(uniforms, prompt_length=3)
    assert sampler(torch.zeros(2, 4, dtype=torch.long), scores).argmax(-1).tolist() == [1, 1]
    nan = scores.clone()
    nan[1, 0] = float("nan")
    with pytest.raises(NonFiniteSamplingError, match=r"not finite \(NaN\) at new token 1 of batch row\(s\) \[1\]"):
        sampler(torch.zeros(2, 4, dtype=torch.long), nan)
    with pytest.raises(NonFiniteSamplingError, match="`temperature` is so small"):
        SeededSampler(uniforms, prompt_length=3, temperature=1e-45)(torch.zeros(2, 3, dtype=torch.long), scores)


def _expected_distribution(logits, temperature, top_k, top_p):
    """Written out independently of HF's warpers: softmax(logits / T), restricted to the top_k tokens, then to the
    smallest set of the most likely ones with mass >= top_p, renormalised."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = probs.argsort(descending=True)
    keep = order[:top_k] if top_k else order
    kept = probs[keep] / probs[keep].sum()
    if top_p < 1:
        n = int((kept.cumsum(0) < top_p).sum()) + 1
        keep, kept = keep[:n], kept[:n] / kept[:n].sum()
    return {int(t): float(p) for t, p in zip(keep, kept)}


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.05, 5, 1.0), (0.05, 0, 0.3)])
def test_first_token_frequencies_follow_the_sampling_distribution(model_and_tokenizer, temperature, top_k, top_p):
    """1000 first tokens sampled prefill-once (5 batches of K = 200): only tokens of the warped distribution, with
    frequencies within a chi-square bound of its probabilities (4 or fewer degrees of freedom; 20 is p < 0.001),
    and far from the distribution without the temperature (the check can fail)."""
    model, tokenizer = model_and_tokenizer
    prompt_ids = tokenize_prompt({"prompt": "Hello there"}, tokenizer)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0, -1]
    expected = _expected_distribution(logits, temperature, top_k, top_p)
    counts: dict[int, int] = {}
    for call in range(5):
        batch = sample_completions(model, [prompt_ids], [call], **_kwargs(
            model, tokenizer, num_completions=200, max_new_tokens=1, stop_ids=[], temperature=temperature,
            top_k=top_k, top_p=top_p))
        for completion in batch.completions[0]:
            counts[completion[0]] = counts.get(completion[0], 0) + 1
    assert set(counts) <= set(expected), f"sampled tokens outside the distribution: {set(counts) - set(expected)}"
    n = sum(counts.values())

    def chi2(dist):
        return sum((counts.get(t, 0) - n * p) ** 2 / (n * p) for t, p in dist.items())

    assert chi2(expected) < 20, (counts, expected)
    assert chi2(_expected_distribution(logits, 1.0, top_k, top_p) if top_p == 1 else
                {t: 1 / len(expected) for t in expected}) > 20


def test_completion_uniforms_are_per_completion_streams():
    a = completion_uniforms(0, [5, 6], 2, 4)
    assert a.shape == (4, 4) and a.dtype == torch.float64 and bool(((a >= 0) & (a < 1)).all())
    assert torch.equal(completion_uniforms(0, [6], 2, 4), a[2:])  # a prompt's streams do not depend on its batch
    assert torch.equal(completion_uniforms(0, [5], 1, 2), a[:1, :2])  # nor on K or the number of steps
    assert len({tuple(r.tolist()) for r in a}) == 4


def test_decode_keeps_the_leading_space_of_the_first_completion_token(model_and_tokenizer):
    tokenizer = model_and_tokenizer[1]
    prompt_ids = tokenize_prompt({"prompt": "Hello"}, tokenizer)
    completion = tokenizer("Hello world", add_special_tokens=False)["input_ids"][1:]  # "▁world"
    text = decode_completion(tokenizer, prompt_ids, completion)
    assert text == " world"
    assert tokenizer("Hello" + text)["input_ids"] == prompt_ids + completion


def test_completion_rows_from_another_engines_token_ids(tokenizer):
    """What vLLM or `trl vllm-serve` return (token ids, the stop token included) become generate's rows: cut at the
    first EOS, the text after the prompt, assistant messages for conversational prompts, carried columns kept."""
    examples = [{"prompt": "Hello", "id": 1, "rewards": [0.0, 1.0]},
                {"prompt": [{"role": "user", "content": "Hello"}], "id": 2}]
    prompt_ids = [tokenize_prompt(e, tokenizer) for e in examples]
    world = tokenizer("Hello world", add_special_tokens=False)["input_ids"][1:]
    eos = tokenizer.eos_token_id
    rows = completion_rows(examples, prompt_ids, [[world + [eos], world], [world + [eos, 5, 6], [eos]]], tokenizer)
    assert rows == [  # `finished`: whether the sample stopped by itself (False: cut at max_new_tokens)
        {"prompt": "Hello", "completions": [" world", " world"], "finished": [True, False], "id": 1},
        {"prompt": examples[1]["prompt"], "id": 2, "finished": [True, True],
         "completions": [[{"role": "assistant", "content": " world"}], [{"role": "assistant", "content": ""}]]},
    ]
    # An engine that stops on strings says which finished (vLLM: finish_reason == "stop")
    said = completion_rows(examples[:1], prompt_ids[:1], [[world, world]], tokenizer, finished=[[True, False]])
    assert said[0]["finished"] == [True, False] and said[0]["completions"] == [" world", " world"]


# ------------------------------------------------------------------------------------------------ (b): resume
def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_a_killed_run_resumes_with_no_prompt_lost_or_duplicated(tiny_mistral, tmp_path, monkeypatch):
    """chunk_size 2, 6 prompts: the run dies after committing 2 chunks (and while writing a third, leaving a temporary
    file). The restart with the same output generates only the third chunk (with another batch size), and the merged
    output holds the 6 prompts once each, in order, equal to an uninterrupted run's."""
    from nca_trl.generation import run
    from nca_trl.generation.output import ChunkStore

    data = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Prompt number {i} says", "id": i} for i in range(6)])
    common = ["--model_name_or_path", tiny_mistral, "--dataset_name", data, "--num_completions", "2",
              "--max_new_tokens", "4", "--chunk_size", "2", "--seed", "3"]
    reference = run.generate([*common, "--batch_size", "2", "--output", str(tmp_path / "reference.jsonl")])
    assert reference["num_prompts"] == 6

    output = tmp_path / "resumed.jsonl"
    generated, written = [], []
    original_chunk, original_write = run._generate_chunk, ChunkStore.write_chunk

    def generate_chunk(rows, indices, *args):
        generated.append(list(indices))
        return original_chunk(rows, indices, *args)

    def write_chunk(self, chunk, rows, stats):
        if len(written) == 2:  # killed while writing the third chunk
            (self.parts / f".chunk-{chunk:05d}.jsonl.tmp-999").write_text('{"prompt": "half a ro')
            raise KeyboardInterrupt("killed")
        written.append(chunk)
        return original_write(self, chunk, rows, stats)

    monkeypatch.setattr(run, "_generate_chunk", generate_chunk)
    monkeypatch.setattr(ChunkStore, "write_chunk", write_chunk)
    with pytest.raises(KeyboardInterrupt):
        run.generate([*common, "--batch_size", "2", "--output", str(output)])
    parts = tmp_path / "resumed.jsonl.parts"
    assert not output.exists() and sorted(p.name for p in parts.glob("chunk-*.jsonl")) == [
        "chunk-00000.jsonl", "chunk-00001.jsonl"]
    assert generated == [[0, 1], [2, 3], [4, 5]]

    # Other sampling settings cannot continue these chunks
    with pytest.raises(ValueError, match="unfinished generate run with other settings .*seed: 3 -> 4"):
        run.generate([*common, "--seed", "4", "--output", str(output)])

    monkeypatch.setattr(ChunkStore, "write_chunk", original_write)
    generated.clear()
    # A committed chunk cut short afterwards (one row of its two) was merged as it was: 5 rows, exit 0
    chunk = parts / "chunk-00000.jsonl"
    chunk.write_text(chunk.read_text().splitlines(keepends=True)[0])
    sidecar = run.generate([*common, "--batch_size", "1", "--output", str(output)])
    assert generated == [[0, 1], [4, 5]]  # the whole committed chunk was not generated again, the cut one was
    rows = _read_jsonl(output)
    assert [r["id"] for r in rows] == list(range(6))
    assert rows == _read_jsonl(tmp_path / "reference.jsonl")
    assert not parts.exists() and sidecar["stats"]["prompts"] == 6 and sidecar["stats"]["completions"] == 12

    # A finished output is not generated again; other settings are refused
    generated.clear()
    assert run.generate([*common, "--output", str(output)])["settings"] == sidecar["settings"]
    assert generated == []
    with pytest.raises(ValueError, match="finished generate run with other settings .*num_completions: 2 -> 3.*"
                       "--overwrite_output true"):
        run.generate([*common, "--num_completions", "3", "--output", str(output)])
    assert _read_jsonl(output) == rows  # untouched
    # ... unless replaced on purpose
    generated.clear()
    replaced = run.generate([*common, "--num_completions", "3", "--output", str(output), "--overwrite_output", "true"])
    assert replaced["settings"]["num_completions"] == 3 and generated == [[0, 1], [2, 3], [4, 5]]
    assert all(len(r["completions"]) == 3 for r in _read_jsonl(output))


def test_a_second_run_of_the_same_output_is_refused(tiny_mistral, tmp_path, monkeypatch, capsys):
    """Two generate runs of one output: the second merged the first's chunks and removed them, and the first then
    waited for them forever ("waiting for 8 chunk(s) from other processes"). The output is locked for the run."""
    from nca_trl.cli import main
    from nca_trl.generation import run
    from nca_trl.runtime.output_dir import OutputDirLockedError

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Sort 3 1 2"}) + "\n")
    output = tmp_path / "new" / "out.jsonl"
    argv = ["--model_name_or_path", str(tiny_mistral), "--dataset_name", str(prompts), "--output", str(output),
            "--num_completions", "2", "--max_new_tokens", "2"]
    seen = {}

    def second_run(*args, **kwargs):  # while the first run holds the output
        with pytest.raises(OutputDirLockedError, match=rf"output '{re.escape(str(output))}' is in use by another"):
            run.generate(argv)
        seen["main"] = main(["generate", *argv])
        seen["err"] = capsys.readouterr().err
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "load_prompts", second_run)
    with pytest.raises(KeyboardInterrupt):
        run.generate(argv)
    assert seen["main"] == 2 and "in use by another nca-trl run" in seen["err"] and "Traceback" not in seen["err"]
    assert not (tmp_path / "new").exists()  # the first run stopped before writing: its folder is removed again
    monkeypatch.undo()
    assert run.generate(argv)["num_prompts"] == 1 and not list((tmp_path / "new").glob(".*lock"))


def test_a_chunk_that_is_not_whole_stops_the_merge(tmp_path):
    """A chunk changed after its commit (a torn last line, a row missing, a line that is no row) is named and the
    output is not written; it was concatenated as it was (a torn line glued to the next chunk's first)."""
    from nca_trl.generation.output import ChunkStore

    store = ChunkStore(tmp_path / "out.jsonl", {"seed": 0}, 3, 2)
    store.open()
    store.write_chunk(0, [{"prompt": "a", "completions": []}, {"prompt": "b", "completions": []}], {})
    store.write_chunk(1, [{"prompt": "c", "completions": []}], {})
    whole = store.chunk_path(0).read_text()
    for text, problem in ((whole[:-5], "its last line is cut short"), (whole.split("\n")[0] + "\n", "1 rows, expected 2"),
                          ('{"prompt": "a"}\n[1]\n', "line 2 is not a row")):
        store.chunk_path(0).write_text(text)
        with pytest.raises(RuntimeError, match=rf"chunk-00000.jsonl: {re.escape(problem)}.*output was not written"):
            store.merge({})
        assert not store.output.exists() and not store.sidecar.exists()
    store.chunk_path(0).write_text(whole)
    store.merge({})
    assert [r["prompt"] for r in _read_jsonl(store.output)] == ["a", "b", "c"]


# ------------------------------------------------------------------------------------------------ (c): end to end
def _check_rows(rows, prompts, k, conversational):
    from nca_trl.data import validate_example

    assert [r["prompt"] for r in rows] == [p["prompt"] for p in prompts]
    for i, (row, source) in enumerate(zip(rows, prompts)):
        assert list(row)[:2] == ["prompt", "completions"] and len(row["completions"]) == k
        assert len(row["finished"]) == k and all(isinstance(f, bool) for f in row["finished"])
        carried = {key: value for key, value in source.items() if key not in ("prompt", "chosen", "rejected")}
        assert {key: row[key] for key in carried} == carried
        assert "chosen" not in row and "rejected" not in row
        for completion in row["completions"]:
            if conversational:
                assert isinstance(completion, list) and len(completion) == 1
                assert completion[0]["role"] == "assistant" and isinstance(completion[0]["content"], str)
            else:
                assert isinstance(completion, str)
        if all(c if isinstance(c, str) else c[0]["content"] for c in row["completions"]):  # empty ones are refused
            validate_example({**row, "rewards": [float(j) for j in range(k)]}, i, "generated")


def test_cli_generate_string_prompts_to_jsonl(tiny_mistral, tmp_path, hh):
    from nca_trl.cli import main
    from nca_trl.generation.output import sidecar_path

    prompts = [{**hh[i], "source": "hh", "n": i} for i in range(3)]  # chosen / rejected are dropped
    data = _write_jsonl(tmp_path / "prompts.jsonl", prompts)
    output = tmp_path / "out" / "samples.jsonl"
    assert main(["generate", "--model_name_or_path", tiny_mistral, "--dataset_name", data, "--output", str(output),
                 "--num_completions", "3", "--max_new_tokens", "5", "--batch_size", "2", "--temperature", "0.9",
                 "--top_k", "20", "--top_p", "0.9"]) == 0
    rows = _read_jsonl(output)
    _check_rows(rows, prompts, 3, conversational=False)
    sidecar = json.loads(sidecar_path(output).read_text())
    assert sidecar_path(output).name == "samples.generation.json"
    assert sidecar["model_name_or_path"] == tiny_mistral and sidecar["num_prompts"] == 3
    assert {k: sidecar["settings"][k] for k in ("num_completions", "max_new_tokens", "temperature", "top_k", "top_p",
                                                "seed", "dtype")} == dict(num_completions=3, max_new_tokens=5,
                                                                          temperature=0.9, top_k=20, top_p=0.9,
                                                                          seed=0, dtype="auto")
    assert {"torch", "transformers", "trl", "nca-trl"} <= set(sidecar["versions"])
    assert sidecar["stats"]["completions"] == 9 and not (tmp_path / "out" / "samples.jsonl.parts").exists()
    # the samples cut at max_new_tokens are the ones marked unfinished, which `train` gives no EOS
    assert sum(not f for row in rows for f in row["finished"]) == sidecar["stats"]["truncated_completions"] > 0


def test_empty_completions_are_counted_as_what_happens_to_them(tiny_mistral, tmp_path, monkeypatch, capsys):
    """Before: "N completion(s) are empty ...: drop or rescore them before training", an instruction to the user,
    printed every round of `nca-trl iterate`, whose own score stage then drops them. Now the log says what happens."""
    from nca_trl.cli import main
    from nca_trl.generation import sampling

    # every token stops a completion: each one is empty
    monkeypatch.setattr(sampling, "stop_token_ids", lambda model, tokenizer: list(range(model.config.vocab_size)))
    data = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS[:2]])
    assert main(["generate", "--model_name_or_path", tiny_mistral, "--dataset_name", data, "--output",
                 str(tmp_path / "samples.jsonl"), "--num_completions", "2", "--max_new_tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert ("[nca-trl generate] 4 completion(s) are empty (the model stopped at once): kept here; `nca-trl score` "
            "drops them, as `nca-trl train` refuses them (`--evaluation` scores them)") in out
    assert "rescore" not in out
    assert all(row["completions"] == ["", ""] and row["finished"] == [True, True]
               for row in _read_jsonl(tmp_path / "samples.jsonl"))


def test_cli_generate_conversational_prompts_from_a_yaml_config_to_parquet(tiny_mistral, tmp_path, tokenizer):
    import datasets
    import yaml

    from nca_trl.cli import main
    from nca_trl.data import tokenize_rated_example

    prompts = [
        {"prompt": [{"role": "user", "content": "Hi there"}], "id": "a"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
         "id": "b"},
    ]
    data = _write_jsonl(tmp_path / "chat.jsonl", prompts)
    output = tmp_path / "chat.parquet"
    config = tmp_path / "gen.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": tiny_mistral, "dataset_name": data,
                                      "output": str(output), "num_completions": 2, "max_new_tokens": 4}))
    assert main(["generate", "--config", str(config), "--seed", "5"]) == 0
    rows = datasets.load_dataset("parquet", data_files=str(output), split="train").to_list()
    _check_rows(rows, prompts, 2, conversational=True)
    assert json.loads((tmp_path / "chat.generation.json").read_text())["settings"]["seed"] == 5
    # `train` tokenizes the prompt to the ids the completions were sampled after
    tokenized = tokenize_rated_example({**rows[0], "rewards": [1.0, 0.0]}, tokenizer, tokenizer.eos_token)
    assert tokenized["prompt_ids"] == tokenize_prompt(rows[0], tokenizer)


def test_generate_arguments_are_checked(tmp_path):
    from nca_trl.generation import parse_generate_args

    base = ["--model_name_or_path", "m", "--dataset_name", "d"]
    with pytest.raises(ValueError, match="`output` must end with one of"):
        parse_generate_args([*base, "--output", "x.csv"])
    with pytest.raises(ValueError, match="`temperature` must be > 0"):
        parse_generate_args([*base, "--output", "x.jsonl", "--temperature", "0"])
    with pytest.raises(ValueError, match="needs `output`"):
        parse_generate_args(base)
    config = tmp_path / "c.yaml"
    config.write_text("num_completion: 3\n")
    with pytest.raises(ValueError, match="did you mean 'num_completions'"):
        parse_generate_args([*base, "--output", "x.jsonl", "--config", str(config)])


# ------------------------------------------------------------------------------------------------ several processes
@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_split_the_chunks_and_merge_them_in_prompt_order(tiny_mistral, tmp_path, launch_env):
    """`accelerate launch` 2 CPU processes: each samples every other missing chunk; the main process merges them in
    prompt order, into the rows one process writes (the samples do not depend on the number of processes)."""
    from launching import cpu_config, free_port, launch_cmd, start, wait

    from nca_trl.generation import run

    data = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Question {i}: why", "id": i} for i in range(5)])
    common = ["--model_name_or_path", tiny_mistral, "--dataset_name", data, "--num_completions", "2",
              "--max_new_tokens", "3", "--chunk_size", "1", "--batch_size", "1"]
    single = run.generate([*common, "--output", str(tmp_path / "single.jsonl")])
    output = tmp_path / "two.jsonl"
    log = tmp_path / "two.log"
    cmd = launch_cmd(cpu_config(tmp_path / "ddp.yaml"), free_port(), ("--num_processes", "2"),
                     ("-m", "nca_trl.cli", "generate"))
    wait([start([*cmd, *common, "--output", str(output)], log, launch_env)], [log])
    sidecar = json.loads((tmp_path / "two.generation.json").read_text())
    assert sidecar["num_processes"] == 2 and sidecar["stats"]["chunks_per_process"] == {"0": 3, "1": 2}
    assert sidecar["settings"] == single["settings"]
    assert _read_jsonl(output) == _read_jsonl(tmp_path / "single.jsonl")
    assert [r["id"] for r in _read_jsonl(output)] == list(range(5))


def test_benchmark_runs_every_method_on_the_same_number_of_tokens(model_and_tokenizer):
    from nca_trl.generation.benchmark import METHODS, benchmark_generate

    model, tokenizer = model_and_tokenizer
    results = benchmark_generate(model, tokenizer, PROMPTS[:2], num_completions=2, max_new_tokens=2, repeats=1)
    assert {m: results[m]["tokens"] for m in METHODS} == dict.fromkeys(METHODS, 2 * 2 * 2)
    assert all(results[m]["tokens_per_s"] > 0 for m in METHODS)


# ------------------------------------------------------------------------------------------------ refused up front
def test_inputs_the_next_step_would_refuse_are_refused_before_anything_is_written(tiny_mistral, tmp_path,
                                                                                   monkeypatch):
    """Before: K = 1, a null or an empty prompt were sampled (or failed inside transformers after the model loaded,
    naming no row) and exit 0, and `score` / `train` refused them later; a missing local model was the Hub's "Repo id
    must be in the form ..." after `<output>.parts/` was written. Now each is refused first, naming file, row and
    field, and nothing is written."""
    from nca_trl.generation import run
    from nca_trl.generation.arguments import GenerateArguments

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    output = tmp_path / "outputs" / "samples.jsonl"
    common = dict(model_name_or_path=str(tiny_mistral), output=str(output), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"`num_completions` must be at least 2, got 1: `nca-trl train`"):
        GenerateArguments(dataset_name="p.jsonl", num_completions=1, **common)
    with pytest.raises(ValueError, match=r"^no such file or folder: outputs/no-model \(model_name_or_path\)$"):
        GenerateArguments(**{**common, "model_name_or_path": "outputs/no-model"}, dataset_name="p.jsonl")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    GenerateArguments(**{**common, "model_name_or_path": "org/model"}, dataset_name="p.jsonl")  # may be a Hub id
    with pytest.raises(ValueError, match=r"^no such file or folder: outputs/none.jsonl \(dataset_name\)$"):
        run.generate(GenerateArguments(dataset_name="outputs/none.jsonl", **common))
    for prompt, what in ((None, "null"), ("  ", "empty"), ([], "empty")):
        data = tmp_path / "prompts.jsonl"
        data.write_text(json.dumps({"prompt": "Sort 3 1 2"}) + "\n" + json.dumps({"prompt": prompt}) + "\n")
        with pytest.raises(ValueError, match=rf"prompts.jsonl, row 1, field 'prompt': the prompt is {what}"):
            run.generate(GenerateArguments(dataset_name=str(data), **common))
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == []



def test_an_output_that_cannot_be_written_or_shares_its_record_is_refused_first(tiny_mistral, tmp_path, monkeypatch,
                                                                                capsys):
    """`out.jsonl` and `out.parquet` share the sidecar `out.generation.json`: the Parquet run replaced the JSONL
    run's record, and a rerun of the JSONL settings then said "nothing to do" over the first run's stale samples,
    exit 0. An output that is a folder or under a file failed after the data and tokenizer loaded (a traceback)."""
    from nca_trl.cli import main
    from nca_trl.generation import run
    from nca_trl.generation.output import ChunkStore

    monkeypatch.setattr(run, "load_prompts", lambda args: pytest.fail("the prompts were read"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Sort 3 1 2"}) + "\n")
    first = tmp_path / "out.jsonl"
    first.write_text("{}\n")
    (tmp_path / "out.generation.json").write_text(json.dumps({"output": str(first), "settings": {}}))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder.jsonl").mkdir()
    base = ["generate", "--model_name_or_path", str(tiny_mistral), "--dataset_name", str(prompts)]
    for output, words in ((tmp_path / "out.parquet", "is the record of"), (tmp_path / "afile" / "o.jsonl", "is a file"),
                          (tmp_path / "folder.jsonl", "is a folder")):
        assert main([*base, "--output", str(output)]) == 2
        assert words in capsys.readouterr().err
    assert json.loads((tmp_path / "out.generation.json").read_text())["output"] == str(first)
    # A record path that is a folder, a `.parts` path that is a file: tracebacks after (or before) every prompt was
    # sampled. An output inside the prompts folder: read back as prompts by the rerun (a cast error; a killed run
    # could not resume)
    (tmp_path / "r.generation.json").mkdir()
    (tmp_path / "c.jsonl.parts").write_text("")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "p.jsonl").write_text(prompts.read_text())
    for output, words in ((tmp_path / "r.jsonl", "r.generation.json is a folder where the record of the run is"),
                          (tmp_path / "c.jsonl", "c.jsonl.parts is a file where the run's chunks go"),
                          (tmp_path / "folder" / "o.jsonl", "is inside the data folder")):
        dataset = str(tmp_path / "folder") if output.parent.name == "folder" else str(prompts)
        assert main([*base[:-1], dataset, "--output", str(output)]) == 2
        assert words in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["p.jsonl"]
    # A sidecar recording another output of the stem is not this output's record: not "done"
    (tmp_path / "out.parquet").write_text("")
    store = ChunkStore(tmp_path / "out.parquet", {}, 1, 1)
    with pytest.raises(ValueError, match="a finished generate run"):
        store.open()
    # A merge stopped before its rename left a full-size hidden copy that no rerun removed
    (tmp_path / ".new.jsonl.tmp-123").write_text("{}\n")
    ChunkStore(tmp_path / "new.jsonl", {}, 1, 1).open()
    assert not (tmp_path / ".new.jsonl.tmp-123").exists()
    # No prompt to sample: an empty output, exit 0, which score then refused as "empty ... fully written?"
    monkeypatch.undo()
    assert main([*base, "--output", str(tmp_path / "o.jsonl"), "--max_prompts", "0"]) == 2
    assert "`max_prompts` must be at least 1" in capsys.readouterr().err
    (tmp_path / "none.jsonl").write_text("")
    assert main([*base[:-1], str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert not (tmp_path / "o.jsonl").exists()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # `~` is expanded once, for the check and the writes
    from nca_trl.generation.arguments import GenerateArguments
    assert GenerateArguments(model_name_or_path=str(tiny_mistral), dataset_name=str(prompts),
                             output="~/o.jsonl").output == str(tmp_path / "home" / "o.jsonl")

def test_chat_prompts_need_a_chat_template_and_long_prompts_are_counted(tokenizer):
    import copy

    from nca_trl.generation.rows import check_prompts

    rows = [{"prompt": "short"}, {"prompt": "word " * 40}, {"prompt": [{"role": "user", "content": "hi"}]}]
    no_template = copy.copy(tokenizer)
    no_template.chat_template = None
    with pytest.raises(ValueError, match=r"p.jsonl, row 2, field 'prompt': a list of chat messages, but the tokenizer "
                       r"of tiny has no chat template"):
        check_prompts(rows, no_template, "p.jsonl", "tiny")
    found = check_prompts(rows[:2], tokenizer, "p.jsonl", "tiny", context=32, max_new_tokens=8)
    assert found == {"context": 32, "count": 1, "rows": [1]}
    # A prompt of another type was a TypeError without the row (exit 1)
    for prompt, got in ((12, "int"), (["Hi", "there"], "a list of str")):
        with pytest.raises(ValueError, match=rf"p.jsonl, row 1, field 'prompt': a prompt is a string or a list of chat "
                           rf"messages .*, not {got}\."):
            check_prompts([rows[0], {"prompt": prompt}], tokenizer, "p.jsonl", "tiny")


def test_prompts_overrunning_learned_positions_are_refused_before_sampling(tiny_mistral, tmp_path, capsys):
    """Prompts that with `max_new_tokens` overrun the context are sampled on a rotary model (logged); a model with
    learned position embeddings (GPT-2: 16 positions here) has none past them, and sampling failed mid-run with an
    IndexError inside torch. Now refused before the model loads, naming the rows and the fix; exit 2."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from nca_trl.cli import main

    gpt = tmp_path / "gpt"
    config = GPT2Config(vocab_size=32768, n_positions=16, n_embd=32, n_layer=1, n_head=2, bos_token_id=1,
                        eos_token_id=2, pad_token_id=2)
    GPT2LMHeadModel(config).save_pretrained(gpt)
    AutoTokenizer.from_pretrained(tiny_mistral).save_pretrained(gpt)
    data = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi"}, {"prompt": "word " * 12}])
    argv = ["generate", "--model_name_or_path", str(gpt), "--dataset_name", data, "--output",
            str(tmp_path / "samples.jsonl"), "--num_completions", "2"]
    capsys.readouterr()
    assert main([*argv, "--max_new_tokens", "8"]) == 2
    assert re.search(r"prompts.jsonl: 1 prompt\(s\) and their 8 new tokens overrun the context of .*gpt \(16 "
                     r"positions, which it cannot go past; rows \[1\]\)\. Lower `max_new_tokens`",
                     capsys.readouterr().err)
    assert not (tmp_path / "samples.jsonl").exists()
    assert main([*argv, "--max_new_tokens", "2"]) == 0  # within the context: sampled


def test_generate_loads_a_model_as_trl_trains_it(tiny_mistral, tmp_path, hh):
    """A Mistral 3 checkpoint (Mistral Small 3.x, Magistral, Ministral 3) is `Mistral3ForConditionalGeneration`, which
    `nca-trl train` loads (TRL reads the architecture from the config) but `AutoModelForCausalLM` does not: `nca-trl
    generate` stopped at "Unrecognized configuration class". It samples from its text model now."""
    from model_families import build_family
    from transformers import AutoTokenizer

    from nca_trl.cli import main

    model_dir = tmp_path / "tiny-mistral3"
    build_family("mistral3_multimodal").save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny_mistral).save_pretrained(model_dir)
    data = _write_jsonl(tmp_path / "prompts.jsonl", [hh[i] for i in range(2)])
    output = tmp_path / "samples.jsonl"
    assert main(["generate", "--model_name_or_path", str(model_dir), "--dataset_name", data, "--output", str(output),
                 "--num_completions", "2", "--max_new_tokens", "4"]) == 0
    _check_rows(_read_jsonl(output), [hh[i] for i in range(2)], 2, conversational=False)


def test_the_main_process_joins_the_others_when_its_first_block_raises():
    """`nca-trl generate` under a launch reads the prompts on the main process first: a bad file raised there left the
    other processes waiting at accelerate's barrier until the process group timed out. Now the main process joins
    them, and they read the file and meet the same error."""
    from types import SimpleNamespace

    from nca_trl.runtime.environment import main_process_first

    waits = []
    main = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: waits.append("main"))
    with pytest.raises(ValueError, match="bad prompts"):
        with main_process_first(main):
            raise ValueError("bad prompts")
    other = SimpleNamespace(is_main_process=False, wait_for_everyone=lambda: waits.append("other"))
    with main_process_first(other):
        waits.append("read")
    assert waits == ["main", "other", "read"]


def test_a_rerun_compares_the_carried_columns_too(tiny_mistral, tmp_path, capsys):
    """A rerun compared the prompts only: an edited carried column (a `solution` a reward function reads, or `tools`,
    which changes the prompt's tokens) was "nothing to do", and the output kept the old values. Now other settings,
    refused. An output of an nca-trl that did not record the carried columns still counts as done. Columns that
    `datasets` would decode from their text ("0012" as 12) are refused, naming the line."""
    from nca_trl.cli import main

    data, output = tmp_path / "prompts.jsonl", tmp_path / "samples.jsonl"
    argv = ["generate", "--model_name_or_path", str(tiny_mistral), "--dataset_name", str(data), "--output",
            str(output), "--num_completions", "2", "--max_new_tokens", "2"]
    _write_jsonl(data, [{"prompt": "Hi", "solution": "wrong"}])
    assert main(argv) == 0
    _write_jsonl(data, [{"prompt": "Hi", "solution": "right"}])
    capsys.readouterr()
    assert main(argv) == 2 and "other settings (carried_sha256: " in capsys.readouterr().err
    assert _read_jsonl(output)[0]["solution"] == "wrong"

    sidecar = output.with_name("samples.generation.json")
    recorded = json.loads(sidecar.read_text())
    _write_jsonl(data, [{"prompt": "Hi", "solution": "wrong"}])
    del recorded["settings"]["carried_sha256"]
    sidecar.write_text(json.dumps(recorded))
    assert main(argv) == 0 and "(settings match): nothing to do" in capsys.readouterr().out

    _write_jsonl(data, [{"prompt": "Hi", "answer": 12}, {"prompt": "Yo", "answer": "0012"}])
    assert main([*argv[:-5], str(tmp_path / "other.jsonl"), *argv[-4:]]) == 2
    assert "prompts.jsonl, line 2, column 'answer': the text '0012' would be read as 12" in capsys.readouterr().err
