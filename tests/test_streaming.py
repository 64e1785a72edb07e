"""Streamed data (`datasets.IterableDataset`) trains and evaluates in both trainers, both layouts, with a plain
`trl.DPOConfig`: in one process with and without accelerate's `dispatch_batches`, and on 2 processes."""

import json
import math

import pytest
import torch
from datasets import Dataset

from nca_trl import NCAConfig, NCATrainer
from nca_trl.data import DataCollatorForRatedCompletions

from launching import cpu_config, free_port, launch_cmd, start, wait
from streaming_run import run
from test_trainer import make_args


def check(results: dict, processes: int, trainers=("NCATrainer", "InfoNCATrainer")):
    assert set(results) == {f"{t}/{layout}" for t in trainers for layout in ("shared", "plain")}
    for name, r in results.items():
        assert r["layout"] == name.split("/")[1] and r["processes"] == processes, name
        assert r["dispatch_batches"] is False, name  # the batches never go through accelerate's concatenate/split
        assert len(r["losses"]) == 4 and all(math.isfinite(x) for x in r["losses"]), name
        assert r["param_change"] > 0, name
        # eval_strategy on a dict of two streams, at steps 2 and 4, each under its own prefix; then evaluate()
        assert [sorted(e) for e in r["eval_during"]] == [["eval_rated_loss"], ["eval_pairs_loss"]] * 2 + [
            ["eval_loss"]], name
        assert all(math.isfinite(v) for e in r["eval_during"] for v in e.values()), name
        assert math.isfinite(r["eval_once"]["eval_loss"]), name
        assert "eval_rewards/ranking_accuracy" in r["eval_once"], name
        # A last batch padded with a stream's first row counted it twice in every metric on 2 processes, and the loss
        # was a mean of batch means there (the padding inside a batch weighed in): each prompt once now
        stream, mapped = r["eval_odd"]["stream"], r["eval_odd"]["map"]
        for key in ("odd_loss", "odd_rewards/margins", "odd_logps/chosen", "odd_rewards/ranking_accuracy"):
            assert stream[key] == pytest.approx(mapped[key], rel=1e-5), (name, key)
        assert r["eval_odd"]["predicted_rows"] == 3 + 3 + 2, name  # every completion once, on 2 processes too
    # Both layouts compute the same thing
    for t in trainers:
        shared, plain = results[f"{t}/shared"], results[f"{t}/plain"]
        assert shared["losses"] == pytest.approx(plain["losses"], abs=1e-4), t
        assert shared["eval_once"]["eval_loss"] == pytest.approx(plain["eval_once"]["eval_loss"], abs=1e-4), t


@pytest.mark.slow
@pytest.mark.parametrize("dispatch_batches", [None, True], ids=["default", "dispatch_batches"])
def test_streaming_train_and_evaluate_one_process(dispatch_batches, tiny_mistral, tmp_path, caplog):
    """Before: evaluating (and, with dispatch_batches, training) on an IterableDataset raised in accelerate ("You
    can't use batches of different size with `dispatch_batches=True`"): the batches held 0-dimensional tensors."""
    trainers = ("NCATrainer",) if dispatch_batches else ("NCATrainer", "InfoNCATrainer")
    results = run(tiny_mistral, str(tmp_path), dispatch_batches, trainers)
    check(results, processes=1, trainers=trainers)
    assert ("dispatch_batches=True" in caplog.text) is bool(dispatch_batches)


def test_batches_hold_no_zero_dimensional_tensor_and_lead_with_prompts():
    rows = [{"prompt_ids": [1, 2], "completion_ids": [[3], [4, 5], [6]], "rewards": [1.0, 0.5, 0.0]},
            {"prompt_ids": [7], "completion_ids": [[8, 9], [10]], "rewards": [2.0, 3.0]}]
    for shared in (False, True):
        batch = DataCollatorForRatedCompletions(pad_token_id=0, shared_prompt=shared)(rows)
        assert next(iter(batch)) == "completion_slots" and batch["completion_slots"].shape[0] == 2
        assert not [k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() == 0], shared
        assert batch["sequence_tokens"].tolist() == [3 + 4 + 3, 3 + 2]


def test_precompute_with_a_stream_is_refused_in_trls_words(tiny_mistral, vicuna, tmp_path):
    """DPOTrainer refuses it with "`precompute_ref_log_probs=True` is not supported with IterableDataset": a match
    written for DPOTrainer matches ours, which adds its own words after TRL's."""
    stream = Dataset.from_list(vicuna.select(range(2)).to_list()).to_iterable_dataset()
    args = make_args(NCAConfig, tmp_path, precompute_ref_log_probs=True, max_steps=1)
    with pytest.raises(ValueError, match="`precompute_ref_log_probs=True` is not supported with IterableDataset"):
        NCATrainer(model=tiny_mistral, args=args, train_dataset=stream).train()


@pytest.mark.slow
@pytest.mark.distributed
def test_streaming_two_processes(tiny_mistral, tmp_path, launch_env):
    """With dispatch_batches=True asked for: each process reads its share of the streams (accelerate's
    IterableDatasetShard, the path the default takes too), both layouts train and evaluate alike."""
    out = tmp_path / "results.json"
    cmd = launch_cmd(cpu_config(tmp_path / "ddp.yaml"), free_port(), ("--num_processes", "2"),
                     (str(__import__("streaming_run").__file__), str(tiny_mistral), str(out)))
    log = tmp_path / "launch.log"
    wait([start(cmd + ["--nca_only", "--dispatch_batches"], log, launch_env)], [log])
    check(json.loads(out.read_text()), processes=2, trainers=("NCATrainer",))


@pytest.mark.slow
def test_a_sharded_stream_read_by_several_workers_evaluates_every_row(tiny_mistral, tiny_mistral_ref, vicuna,
                                                                      tmp_path):
    """A stream of 2 shards evaluated with 2 dataloader workers: each worker numbers its shard's rows from 0, and the
    evaluation, counting each row index once, dropped the second worker's rows (eval_loss and every metric of part of
    the set, silently). The same metrics with 0 and 2 workers."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_mistral_ref)
    stream = Dataset.from_list(vicuna.select(range(6)).to_list()).to_iterable_dataset(num_shards=2)
    logged = []
    for workers in (0, 2):
        trainer = NCATrainer(model=tiny_mistral, ref_model=ref, train_dataset=vicuna.select(range(2)),
                             eval_dataset=stream, args=make_args(NCAConfig, tmp_path / str(workers), max_length=64,
                                                                 dataloader_num_workers=workers))
        logged.append({k: v for k, v in trainer.evaluate().items() if "runtime" not in k and "per_second" not in k})
    assert logged[1].keys() == logged[0].keys() and "eval_logps/chosen" in logged[0]
    assert all(logged[1][k] == pytest.approx(logged[0][k], rel=1e-5) for k in logged[0]), logged
