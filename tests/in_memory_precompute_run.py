"""Launched by tests/test_distributed.py: `NCATrainer` from Python on an in-memory `Dataset` (`Dataset.from_list`,
no cache files) with `precompute_ref_log_probs=True` on every process; each process writes its `ref_logps` column.

    accelerate launch ... tests/in_memory_precompute_run.py MODEL ROWS.json OUT_DIR
"""

import json
import sys
from pathlib import Path

from accelerate import PartialState
from datasets import Dataset

from nca_trl import NCAConfig, NCATrainer

if __name__ == "__main__":
    model, rows, out = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])
    args = NCAConfig(output_dir=str(out / "run"), max_length=64, max_steps=1, per_device_train_batch_size=1,
                     precompute_ref_log_probs=True, report_to="none", save_strategy="no", use_cpu=True,
                     ddp_backend="gloo", activation_checkpointing=False, bf16=False)
    trainer = NCATrainer(model=model, args=args, train_dataset=Dataset.from_list(rows))
    trainer.train()
    state = PartialState()
    (out / f"ref_logps-{state.process_index}.json").write_text(json.dumps([row["ref_logps"] for row in trainer.train_dataset]))
    state.wait_for_everyone()
    state.destroy_process_group()
