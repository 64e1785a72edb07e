"""Train and evaluate on streamed data (`datasets.IterableDataset`), as a pipeline does: the in-process tests of
tests/test_streaming.py call `run`, and `accelerate launch` runs this file on 2 processes.

    accelerate launch --num_processes 2 tests/streaming_run.py MODEL OUT_JSON [--dispatch_batches] [--nca_only]

`run` trains NCATrainer and InfoNCATrainer on a plain `trl.DPOConfig`, for each layout, on a stream of rated rows
mixed with chosen/rejected pairs, evaluates every 2 steps through `eval_strategy` on a dict of two streams and once
through `trainer.evaluate(eval_dataset=...)`, and returns what it saw: the step losses, the evaluation metrics and the
parameters' change, per (trainer, layout).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VICUNA = REPO / "data" / "vicuna_rated.jsonl"
HH = REPO / "tests" / "data" / "hh_helpful_test.jsonl"


def streams():
    """(train, eval dict, one eval stream): rated Vicuna rows and HH pairs, as `IterableDataset`s."""
    from datasets import Dataset, load_dataset

    vicuna = load_dataset("json", data_files=str(VICUNA), split="train")
    hh = load_dataset("json", data_files=str(HH), split="train")
    rated = [{"prompt": r["prompt"], "completions": r["completions"][:3], "rewards": r["rewards"][:3]}
             for r in vicuna.select(range(8))]
    pairs = [{"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]], "rewards": [1.0, 0.0]}
             for r in hh if len(r["prompt"]) < 120][:4]  # prompts well within max_length
    train = Dataset.from_list(rated[:6] + pairs[:2]).to_iterable_dataset()
    evals = {"rated": Dataset.from_list(rated[6:]).to_iterable_dataset(),
             "pairs": Dataset.from_list(pairs[2:]).to_iterable_dataset()}
    return train, evals, Dataset.from_list(rated[6:] + pairs[2:]).to_iterable_dataset()


def run(model: str, out_dir: str, dispatch_batches: bool | None = None, trainers=("NCATrainer", "InfoNCATrainer")):
    import torch
    from trl import DPOConfig

    import nca_trl

    results = {}
    for cls in (getattr(nca_trl, name) for name in trainers):
        for shared in (True, False):
            train, evals, one = streams()
            args = DPOConfig(
                output_dir=f"{out_dir}/{cls.__name__}-{shared}", report_to="none", use_cpu=True, bf16=False,
                per_device_train_batch_size=2, per_device_eval_batch_size=2, max_length=64, max_steps=4,
                learning_rate=5e-3, beta=0.1, logging_steps=1, eval_strategy="steps", eval_steps=2,
                save_strategy="no", activation_checkpointing=False, seed=0, dataloader_num_workers=0,
                accelerator_config={"dispatch_batches": dispatch_batches},
            )
            args.shared_prompt = shared  # a plain DPOConfig has no such field: the trainers read it if set
            trainer = cls(model=model, args=args, train_dataset=train, eval_dataset=evals)
            before = [p.detach().clone() for p in trainer.model.parameters()]
            trainer.train()
            metrics = trainer.evaluate(eval_dataset=one)
            # 3 prompts in batches of 2: a last batch of 1, padded on 2 processes (a stream's with its first row, which
            # gather_for_metrics cannot drop): the stream and the map-style set must give the same metrics
            from datasets import Dataset

            rows = list(streams()[1]["rated"]) + list(streams()[1]["pairs"])[:1]
            odd = {name: trainer.evaluate(eval_dataset=data, metric_key_prefix="odd")
                   for name, data in (("stream", Dataset.from_list(rows).to_iterable_dataset()),
                                      ("map", Dataset.from_list(rows)))}
            odd["predicted_rows"] = trainer.predict(Dataset.from_list(rows)).predictions.shape[0]  # gloo aborted
            change = sum((p.detach() - b).abs().sum().item() for p, b in zip(trainer.model.parameters(), before))
            results[f"{cls.__name__}/{'shared' if shared else 'plain'}"] = {
                "layout": "shared" if trainer.data_collator.shared_prompt else "plain",
                "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                "eval_during": [{k: v for k, v in h.items() if k.endswith("_loss")}
                                for h in trainer.state.log_history
                                if any(k.startswith("eval") and k.endswith("_loss") for k in h)],
                "eval_once": metrics,
                "eval_odd": odd,
                "param_change": change,
                "dispatch_batches": trainer.accelerator.dataloader_config.dispatch_batches,
                "processes": trainer.accelerator.num_processes,
            }
            del trainer
            torch.manual_seed(0)
    return results


if __name__ == "__main__":
    model, out = sys.argv[1], sys.argv[2]
    results = run(model, str(Path(out).parent / "runs"), True if "--dispatch_batches" in sys.argv else None,
                  ("NCATrainer",) if "--nca_only" in sys.argv else ("NCATrainer", "InfoNCATrainer"))
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        Path(out).write_text(json.dumps(results, indent=1))
    # As `nca-trl train` does: a gloo process group left to the interpreter's exit can abort it ("terminate called
    # without an active exception", exit status -6) after the results are written
    state.wait_for_everyone()
    state.destroy_process_group()
