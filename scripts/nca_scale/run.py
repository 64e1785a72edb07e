"""`Run`: one stage's context (sizes, device, folders, the time left, the result it fills) and what the stages do
through it: get a model and the training data, write a `nca-trl train` recipe, train it through
scripts/measured_train.py, plan it with scripts/plan_memory.py."""

from __future__ import annotations

import json
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

from .common import ENTRY, FULL, SCRIPTS, SMOKE, StageError, free_port, model_request, run_child
from .measure import long_prompt_rows, measure_peak
from .models import build


class Run:
    """One stage's context: sizes, device, folders, the time left, and the result it fills as it goes."""

    def __init__(self, work: Path, smoke: bool, budget: float, results: Path | None):
        import torch

        self.work, self.smoke, self.sizes = work, smoke, SMOKE if smoke else FULL
        self.gpu = torch.cuda.is_available()
        if not (self.gpu or smoke):
            raise StageError("no CUDA GPU here: run on the GPU machine, or pass --smoke for the CPU dry run")
        self.deadline = time.time() + budget
        self.results = results
        self.result: dict = {"shape": {}, "settings": {}, "numbers": {}}
        (work / "runs").mkdir(parents=True, exist_ok=True)

    def left(self, reserve: float = 0.0) -> float:
        """Seconds left of the stage's budget, less `reserve` for the work after the child process."""
        return self.deadline - time.time() - reserve

    def peak_flops(self) -> float:
        """The matmul peak the environment step measured (bf16 on a GPU, fp32 on a CPU), else measured now."""
        if self.results and self.results.exists():
            env = json.loads(self.results.read_text()).get("environment", {})
            if env.get("matmul_peak_tflops"):
                return env["matmul_peak_tflops"] * 1e12
        return measure_peak(self.gpu)

    # -------------------------------------------------------------------------------------------- models and data
    def model(self, arch: str) -> tuple[Path, dict]:
        """(path, shape) of the stage's random model ("mistral", "mixtral" or "digits"), built once per WORK by a child
        process (so that this one holds no GPU memory while a training runs)."""
        path = self.work / f"model-{arch}"
        wanted = model_request(self.sizes, arch)
        shape_file = path / "shape.json"
        if not (shape_file.exists() and json.loads(shape_file.read_text())["request"] == wanted):
            if arch == "digits":  # tiny, on the CPU: no GPU memory to hold
                build(self.work, arch, self.smoke)
            else:
                cmd = [sys.executable, str(ENTRY), "build", "--work", str(self.work), "--arch", arch]
                run_child(cmd + (["--smoke"] if self.smoke else []), self.left(30), f"building the {arch} model")
        return path, json.loads(shape_file.read_text())

    def train_data(self, model: Path) -> tuple[Path, dict]:
        """Rated rows (K = 4, the bundled Vicuna answers) whose prompts (a reference document, then the question) fill
        `prompt_fraction` of max_length, so that most sequences reach max_length: the planner's assumption."""
        path = self.work / f"train-{self.sizes.max_length}.jsonl"
        stats_file = path.with_suffix(".json")
        if not stats_file.exists():
            target = int(self.sizes.prompt_fraction * self.sizes.max_length)
            rows, stats = long_prompt_rows(model, target, self.sizes.max_length - 32, completions=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            lengths = [min(p + c, self.sizes.max_length) for p, cs in stats.pop("lengths") for c in cs]
            stats.update(mean_sequence_tokens=statistics.mean(lengths),
                         sequences_at_max_length=sum(n == self.sizes.max_length for n in lengths) / len(lengths))
            stats_file.write_text(json.dumps(stats))
        return path, json.loads(stats_file.read_text())

    # -------------------------------------------------------------------------------------------- training
    def recipe(self, name: str, model: Path, data: Path, accelerate_config: Path, *, batch: int, steps: int,
               learning_rate: float, gpu_mem_gb: float = 80.0, **extra) -> Path:
        """The stage's `nca-trl train` recipe (also what scripts/plan_memory.py plans)."""
        import yaml

        values = {
            "loss": "nca", "model_name_or_path": str(model), "dtype": "bfloat16" if self.gpu else "float32",
            "dataset_name": str(data), "dataset_format": "rated", "max_length": self.sizes.max_length,
            "beta": 0.01, "alpha": 1.0, "learning_rate": learning_rate, "lr_scheduler_type": "constant",
            "warmup_steps": 0, "max_steps": steps, "per_device_train_batch_size": batch,
            "gradient_accumulation_steps": 1, "bf16": self.gpu, "activation_checkpointing": True,
            "activation_checkpointing_kwargs": {"use_reentrant": False}, "shared_prompt": False,
            "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no", "report_to": "none",
            "report_train_prompts": 0, "seed": 42, "output_dir": str(self.work / "runs" / name),
            "accelerate_config": str(accelerate_config), "hardware": f"1 node x 1 GPUs x {gpu_mem_gb:.1f} GB",
            "model_config_file": str(model / "config.json"), **extra,
        }
        path = self.work / "runs" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(values, sort_keys=False))
        return path

    def train(self, name: str, recipe: Path, launch_config: Path | None, reserve: float = 20.0,
              save: bool = True) -> dict:
        """Run the recipe under `accelerate launch --config_file launch_config --num_processes 1` (or, without a
        config, as one plain process) through scripts/measured_train.py; returns its measurements, its run_info.json
        and the command. Without `save`, the final save of `nca-trl train` is skipped (seconds to a minute of
        gathering and writing the model, which the stages that check a save do)."""
        out = self.work / "runs" / name
        shutil.rmtree(out, ignore_errors=True)
        measure = self.work / "runs" / f"{name}.measure.json"
        measure.unlink(missing_ok=True)
        cmd = [sys.executable]
        if launch_config is not None:
            cmd += ["-m", "accelerate.commands.launch", "--config_file", str(launch_config), "--num_processes", "1",
                    "--main_process_port", str(free_port())]
            cmd += [] if self.gpu else ["--mixed_precision", "no"]
        cmd += [str(SCRIPTS / "measured_train.py"), "--measure_out", str(measure), "--config", str(recipe),
                "--output_dir", str(out)] + ([] if save else ["--no_final_save"])
        deepspeed = launch_config is not None and "deepspeed" in Path(launch_config).read_text()
        if not self.gpu:
            cmd += ["--ddp_backend", "gloo"] if deepspeed else ["--use_cpu", "true"]
        seconds = run_child(cmd, self.left(reserve), f"the {name} training")
        if not measure.exists():
            raise StageError(f"the {name} training wrote no {measure.name}: see gpu_scale.log")
        return {"measure": json.loads(measure.read_text()), "run_info": json.loads((out / "run_info.json").read_text()),
                "output_dir": out, "command": shlex.join(cmd), "launch_seconds": seconds}

    def plan(self, recipe: Path, completions: int) -> dict:
        from plan_memory import plan

        return plan(str(recipe), gpus=1, nodes=1, completions=completions)
