"""Launched by tests/test_distributed.py: `NCATrainer.evaluate()` with `compute_metrics` on every process, on rated
rows whose prompts have different numbers of completions, as a `Dataset` in eval batches of 1 and 2 prompts per
process and streamed (`IterableDataset`); the main process writes what `compute_metrics` got from each.

    accelerate launch ... tests/compute_metrics_run.py MODEL ROWS.json OUT_DIR
"""

import json
import sys
from pathlib import Path

from accelerate import PartialState
from datasets import Dataset

from transformers import AutoTokenizer

from nca_trl import NCAConfig, NCATrainer

SEEN = {}  # what compute_metrics got last


def metrics_for(model: str):
    """A `compute_metrics` recording per completion row its tokens (the labels are the input ids, padded with the
    pad token, EOS where the tokenizer has none as in DPOTrainer, and with -100 where rows were padded to one length)
    and the sum of the logits at them."""
    import numpy as np

    tokenizer = AutoTokenizer.from_pretrained(model)
    pad_token_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id

    def compute_metrics(prediction):
        labels, logits = np.asarray(prediction.label_ids), np.asarray(prediction.predictions)
        real = (labels != -100) & (labels != pad_token_id)
        SEEN["labels"] = [labels[i][real[i]].tolist() for i in range(len(labels))]
        SEEN["logits"] = [float(logits[i, : real.shape[1]][real[i]].sum()) for i in range(len(labels))]
        return {"rows": float(len(labels))}

    return compute_metrics


if __name__ == "__main__":
    model, rows, out = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])
    args = NCAConfig(output_dir=str(out / "run"), max_length=256, per_device_eval_batch_size=1, report_to="none",
                     use_cpu=True, ddp_backend="gloo", activation_checkpointing=False, bf16=False)
    data = Dataset.from_list(rows)
    trainer = NCATrainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                         compute_metrics=metrics_for(model))
    seen = {}
    for name, dataset, batch in (("dataset", data, 1), ("batches_of_2", data, 2),
                                 ("streamed", data.to_iterable_dataset(), 1)):
        trainer.args.per_device_eval_batch_size = batch
        metrics = trainer.evaluate(dataset)
        seen[name] = {"metrics": metrics, **SEEN}
    state = PartialState()
    if state.is_main_process:
        (out / "seen.json").write_text(json.dumps(seen))
    state.wait_for_everyone()
    state.destroy_process_group()
