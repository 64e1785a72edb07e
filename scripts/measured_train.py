#!/usr/bin/env python
"""`nca-trl train` with its steps measured: the training entry point of the GPU scale run's training stages.

    accelerate launch --config_file CONFIG --num_processes 1 scripts/measured_train.py \
        --measure_out MEASURE.json --config RECIPE.yaml [nca-trl train arguments]
    python scripts/measured_train.py --measure_out MEASURE.json --config RECIPE.yaml      # no launcher

It runs `nca_trl.train.train` (what `nca-trl train` runs) with one more callback, added the way tests/launch_probe.py
adds its probe. The main process writes MEASURE.json when training ends (before the final save), holding per step the
wall time (after a CUDA synchronize) and the work of its batch (`benchmark.batch_work`: tokens, scored tokens,
attention pairs, plain-layout tokens), and for the run: peak GPU memory allocated and reserved by PyTorch, the GPU's
used and total memory, the peak host RSS of this process, the model's config and parameter count, the distributed
type and ZeRO stage, the ZeRO-3 leaf modules, the optimizer's class and the log history. `--no_final_save` skips
`nca-trl train`'s final `save_model` (for a stage that measures steps, not the save). Exit status 1 when training
ended without the main process writing MEASURE.json.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from benchmark import record_work  # scripts/ is on sys.path: this file's folder
from nca_trl import trainer as trainer_module
from nca_trl.runtime.distributed import count_z3_leaf_modules
from nca_trl.runtime.files import write_atomic
from nca_trl.train import train

GB = 1e9


def _gpu_memory() -> dict:
    if not torch.cuda.is_available():
        return {"peak_gpu_allocated_gb": None, "peak_gpu_reserved_gb": None, "gpu_used_gb": None, "gpu_total_gb": None}
    free, total = torch.cuda.mem_get_info()
    return {
        "peak_gpu_allocated_gb": torch.cuda.max_memory_allocated() / GB,
        "peak_gpu_reserved_gb": torch.cuda.max_memory_reserved() / GB,
        "gpu_used_gb": (total - free) / GB,  # every process on the GPU, the CUDA context included
        "gpu_total_gb": total / GB,
    }


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux: kilobytes


class Measure(TrainerCallback):
    """Step times and batch work of one trainer; the main process writes them to `path` at the end of training."""

    def __init__(self, trainer, path: str):
        self.trainer, self.path = trainer, path
        self.work = record_work(trainer)
        self.times: list[float] = []
        self._start = None
        self.started = time.time()

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)

    def on_train_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        acc = trainer.accelerator
        model = acc.unwrap_model(trainer.model)
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
        inner = getattr(optimizer, "optimizer", None)  # DeepSpeed's ZeRO optimizer wraps the real one
        dtype = acc.distributed_type
        record = {
            "step_seconds": self.times,
            "work": self.work,
            **_gpu_memory(),
            "peak_host_rss_gb": _peak_rss_gb(),
            "config": model.config.to_dict(),
            "parameters": int(sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())),
            "distributed_type": getattr(dtype, "value", str(dtype)),
            "num_processes": acc.num_processes,
            "zero_stage": acc.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
            "z3_leaf_modules": {"policy": count_z3_leaf_modules(trainer.model),
                                "reference": count_z3_leaf_modules(trainer.ref_model),
                                "marked_by_nca_trl": getattr(trainer, "z3_leaves_marked", [])},
            "optimizer": type(inner if inner is not None else optimizer).__name__,
            "shared_prompt": bool(trainer.data_collator.shared_prompt),
            "log_history": state.log_history,
            "train_seconds": time.time() - self.started,
        }
        if acc.is_main_process:
            write_atomic(self.path, json.dumps(record, indent=1, default=str))


def main(argv: list[str]) -> int:
    if "--measure_out" not in argv:
        sys.exit("measured_train.py: give --measure_out PATH (where the measurements go), then nca-trl train's "
                 "arguments")
    i = argv.index("--measure_out")
    path, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    save = "--no_final_save" not in argv
    argv = [a for a in argv if a != "--no_final_save"]
    original = trainer_module.trainer_for_loss

    def measured_trainer_for_loss(loss):
        base = original(loss)

        class Measured(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.add_callback(Measure(self, path))

            def save_model(self, *args, **kwargs):
                return super().save_model(*args, **kwargs) if save else None

        Measured.__name__ = Measured.__qualname__ = base.__name__
        return Measured

    trainer_module.trainer_for_loss = measured_trainer_for_loss  # `nca-trl train` looks it up when it runs
    os.environ.setdefault("TQDM_DISABLE", "1")
    train(argv)
    if not Path(path).exists() and int(os.environ.get("RANK", "0")) == 0:
        sys.exit(f"measured_train.py: training ended without writing {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
