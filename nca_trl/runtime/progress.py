"""The training progress bar, readable in a terminal and in a log file.

transformers' `ProgressCallback`, with three changes: a log line is `step 5/90  loss 1.386  rewards/margins 0.0121 ...`
(not a dict of quoted strings); an evaluation during training gets no bar nested in the training bar where the
output is not a terminal (a log file showed both bars interleaved, with escape codes; its log line, with its
`*_runtime`, says it ran); and the training bar's clock restarts after the evaluation at step 0 (`eval_on_start`), whose time made the first ETA
read over an hour. With `disable_tqdm` (no bars), transformers' `PrinterCallback` printed the same dicts: its
replacement prints the same log lines.
"""

from __future__ import annotations

import sys

from transformers.trainer_callback import PrinterCallback, ProgressCallback

__all__ = ["ReadablePrinterCallback", "ReadableProgressCallback", "format_log_line", "use_readable_progress"]


def format_log_line(step: int, max_steps: int, logs: dict) -> str:
    """`step 5/90  loss 1.386  grad_norm 0.31  ...`: floats with 4 significant digits, `total_flos` left out."""
    parts = [f"step {step}/{max_steps}"]
    for key, value in logs.items():
        if key == "total_flos":
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return "  ".join(parts)


class ReadableProgressCallback(ProgressCallback):
    """`ProgressCallback` with readable log lines, no nested evaluation bar in a log file, and an ETA of training
    steps only."""

    def __init__(self, max_str_len: int = 100, stream=None):
        super().__init__(max_str_len)
        self.stream = stream if stream is not None else sys.stderr  # where tqdm draws the bars

    def _nested(self) -> bool:
        return self.training_bar is not None and not getattr(self.stream, "isatty", lambda: False)()

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not self._nested():
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_evaluate(self, args, state, control, **kwargs):
        super().on_evaluate(args, state, control, **kwargs)
        if state.is_world_process_zero and self.training_bar is not None and state.global_step == 0:
            self.training_bar.reset(total=state.max_steps)  # the ETA counts training steps, not this evaluation

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(format_log_line(state.global_step, state.max_steps, logs))


class ReadablePrinterCallback(PrinterCallback):
    """`PrinterCallback` (used with `disable_tqdm`) printing `format_log_line` lines instead of dicts."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs:
            print(format_log_line(state.global_step, state.max_steps, logs), flush=True)


def use_readable_progress(trainer) -> None:
    """Swap transformers' `ProgressCallback` of `trainer` (present unless `disable_tqdm`), or its `PrinterCallback`
    (with `disable_tqdm`), for the readable one."""
    handler = trainer.callback_handler
    for old, new in ((ProgressCallback, ReadableProgressCallback), (PrinterCallback, ReadablePrinterCallback)):
        default = next((cb for cb in handler.callbacks if type(cb) is old), None)
        if default is not None:  # the instance: by class, `remove_callback` took a user's subclass of it first
            handler.remove_callback(default)
            handler.add_callback(new())
