"""GPU-only checks of inherited switches: not collected by the CPU suite (the file name does not start with test_).

Run on a machine with a CUDA GPU (and `liger-kernel` for the first):

    python -m pytest tests/gpu_only_switches.py -q
"""

import pytest
import torch

from nca_trl import NCAConfig, NCATrainer
from test_inherited_switches import distinct_rewards, training_step_and_grads
from test_trainer import make_args, record_losses


def test_liger_kernel_on_gpu_same_losses(tiny_mistral, vicuna, tmp_path):
    """GPU only: Liger's layer kernels (RMSNorm, RoPE, SwiGLU; TRL turns its fused cross-entropy off) keep the
    shared-prompt layout and give the losses of the plain modules."""
    data = distinct_rewards(vicuna, 3)
    losses = {}
    for liger in (False, True):
        args = make_args(
            NCAConfig, tmp_path, use_cpu=False, use_liger_kernel=liger, per_device_train_batch_size=1
        )
        trainer = NCATrainer(model=tiny_mistral, args=args, train_dataset=data)
        losses[liger] = record_losses(trainer)
        trainer.train()
        assert trainer.data_collator.shared_prompt
    assert losses[True] == pytest.approx(losses[False], rel=1e-3, abs=1e-4)


def test_activation_offloading_on_gpu_same_step(tiny_mistral, vicuna, tmp_path):
    data = distinct_rewards(vicuna, 2)
    results = []
    for offloading in (False, True):
        args = make_args(NCAConfig, tmp_path, use_cpu=False, activation_offloading=offloading, max_length=48)
        trainer = NCATrainer(model=tiny_mistral, args=args, train_dataset=data)
        batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(2)]))
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        results.append(training_step_and_grads(trainer, batch))
    (loss, grads), (offloaded_loss, offloaded_grads) = results
    assert offloaded_loss.item() == pytest.approx(loss.item(), abs=1e-6)
    for name in grads:
        torch.testing.assert_close(offloaded_grads[name], grads[name], rtol=1e-5, atol=1e-7)
