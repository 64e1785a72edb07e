"""`accelerate launch` entry point for the distributed tests: `nca-trl train` plus a probe of the run's internals.

Everything the tests need to know about a launch that a user does not (pids, hostnames, ZeRO-3 leaf-module counts,
checksums of the gathered final weights, the step training resumed from) is collected here, on every rank at the end
of training, and written by the main process to `<output_dir>/probe.json` next to the user-facing `run_info.json`.

    accelerate launch ... tests/launch_probe.py --config recipes/tiny/nca.yaml [--probe_checksums] ...
"""

import contextlib
import json
import os
import socket
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from nca_trl import trainer as trainer_module
from nca_trl.train import train
from nca_trl.runtime.distributed import count_z3_leaf_modules


class Probe(TrainerCallback):
    def __init__(self, trainer, checksums: bool):
        self.trainer, self.checksums = trainer, checksums
        self.start_step, self.logged_steps = None, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logged_steps.append(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        from accelerate.utils import gather_object

        trainer, acc = self.trainer, self.trainer.accelerator
        info = {
            "process_index": acc.process_index,
            "local_process_index": acc.local_process_index,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
        }
        probe = {
            "processes": gather_object([info]) if acc.num_processes > 1 else [info],
            "start_step": self.start_step,
            "steps_logged_this_run": self.logged_steps,
            "z3_leaf_modules": {
                "policy": count_z3_leaf_modules(trainer.model),
                "reference": count_z3_leaf_modules(trainer.ref_model),
                "precompute_engine": count_z3_leaf_modules(getattr(trainer, "_precompute_engine", None)),
                "marked_by_nca_trl": trainer.z3_leaves_marked,
            },
        }
        if self.checksums:
            probe["param_checksums"] = param_checksums(trainer)
        if acc.is_main_process:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.output_dir) / "probe.json").write_text(json.dumps(probe))


def param_checksums(trainer) -> dict:
    """{name: [sum, sum of squares, shape]} of the final weights, gathered across ZeRO-3 shards (all ranks call)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    sums = {}
    for name, param in model.named_parameters():
        gather = contextlib.nullcontext()
        if trainer.is_deepspeed_enabled:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([param], modifier_rank=None)
        with gather:
            t = param.detach().to(torch.float64)
            sums[name] = [t.sum().item(), (t * t).sum().item(), list(t.shape)]
    return sums


def main(argv: list[str]) -> int:
    checksums = "--probe_checksums" in argv
    argv = [a for a in argv if a != "--probe_checksums"]
    original = trainer_module.trainer_for_loss

    def probed_trainer_for_loss(loss):
        base = original(loss)

        class Probed(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.add_callback(Probe(self, checksums))

        Probed.__name__ = Probed.__qualname__ = base.__name__
        return Probed

    trainer_module.trainer_for_loss = probed_trainer_for_loss  # `nca-trl train` looks it up when it runs
    train(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
