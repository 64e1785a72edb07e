"""`NCATrainer` and `InfoNCATrainer`: `trl.DPOTrainer` subclasses training on K rated completions per prompt.

Everything that is not pairwise is the parent's: model and reference-model creation, PEFT (reference = adapters
disabled), DeepSpeed/FSDP preparation, the fused LM-head log-probs, the MoE router aux loss (`runtime.router_aux`: on
every MoE family), logging, evaluation and checkpoints. This module overrides the dataset preparation, the signature
columns, the reference log-probs (K values per prompt, live or precomputed and cached) and the loss.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import textwrap
import warnings
from collections.abc import Callable

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from transformers import (
    AutoProcessor, BitsAndBytesConfig, DataCollator, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin,
    TrainerCallback,
)
from transformers.trainer_utils import EvalPrediction
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import get_config_model_id, use_adapter

from .config import InfoNCAConfig, NCAConfig, _RatedCompletionsConfig, check_rated_config, reward_temperature
from .data.collator import ROW_COLUMNS, DataCollatorForRatedCompletions, check_collator
from .data.formats import PAIR_COLUMN
from .data.tokenize import prepare_rated_dataset, refuse_images, with_row_index
from .losses import infonca_loss, nca_loss
from .metrics import PooledMetrics, prompt_metrics, to_slots
from .ref_cache import precompute_ref_logps, reference_adapter
from .runtime.accumulation import PromptWeightedAccumulationMixin
from .runtime.backbone import use_language_backbones
from .runtime.errors import ROW_INDEX
from .runtime.output_dir import check_output_dir
from .runtime.predictions import EvalPredictionsMixin
from .runtime.progress import use_readable_progress
from .runtime.reference import check_reference_vocabulary
from .runtime.router_aux import add_router_aux_loss, check_router_aux, experts_for_fused_head, router_aux_forward
from .runtime.safety import RunSafetyMixin
from .shared_prompt.packing import (SharedPromptLayoutMixin, is_shared_prompt_batch, is_shared_prompt_enabled,
                                    shared_prompt_forward)
from .shared_prompt.families import disable_attention_dropout
from .shared_prompt.varlen import VarlenLayout

__all__ = ["NCATrainer", "InfoNCATrainer", "trainer_for_loss"]

logger = logging.getLogger("nca_trl")

_NCA_PAPER = {
    "title": "Noise Contrastive Alignment of Language Models with Explicit Rewards",
    "id": "2402.05369",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @inproceedings{chen2024noise,
            title        = {{Noise Contrastive Alignment of Language Models with Explicit Rewards}},
            author       = {Huayu Chen and Guande He and Lifan Yuan and Ganqu Cui and Hang Su and Jun Zhu},
            year         = 2024,
            booktitle    = {Advances in Neural Information Processing Systems 37: Annual Conference on Neural Information Processing Systems 2024, NeurIPS 2024},
            url          = {https://arxiv.org/abs/2402.05369},
        }"""),
}


@contextlib.contextmanager
def _activation_checkpointing_off(model):
    """Activation checkpointing off for a forward without gradients (the reference's), pointless there: each module's
    `gradient_checkpointing` flag that is on is set off, then back on, nothing else touched. Re-enabling with
    `activation_checkpointing_enable(kwargs)` (as `trl.models.utils.disable_gradient_checkpointing` does) checkpointed
    every layer from then on, dropped `offload`, and passed `every_n_layers` / `offload` on to torch's checkpoint."""
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for module in flagged:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in flagged:
            module.gradient_checkpointing = True


@contextlib.contextmanager
def _hidden_from_parent(args, name: str, value):
    """Show `DPOTrainer.__init__` `args.<name> = value`; the user's value is back afterwards."""
    if not hasattr(args, name):
        yield
        return
    original = getattr(args, name)
    setattr(args, name, value)
    try:
        yield
    finally:
        setattr(args, name, original)


class _RatedCompletionsTrainer(RunSafetyMixin, EvalPredictionsMixin, PromptWeightedAccumulationMixin,
                               SharedPromptLayoutMixin, DPOTrainer):
    """Shared K-completion machinery; a subclass sets its config class (which names the loss) and its loss function.
    `RunSafetyMixin` (`nca_trl.runtime.safety`): non-finite stops, the output_dir lock, complete checkpoints and saves;
    `EvalPredictionsMixin` (`nca_trl.runtime.predictions`): every completion's logits reach `compute_metrics`;
    `PromptWeightedAccumulationMixin` (`nca_trl.runtime.accumulation`): an accumulated step's loss weighs prompts;
    `SharedPromptLayoutMixin` (`nca_trl.shared_prompt.packing`): the batches' layout, decided at construction."""

    _config_class: type[_RatedCompletionsConfig]
    _paper = _NCA_PAPER

    @staticmethod
    def _loss_fn(logratios, rewards, beta, alpha, mask):  # pragma: no cover - set by subclasses
        raise NotImplementedError

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # The loss's name comes from its config class alone (model card tags, default output_dir, run_info.json)
        cls._name = cls._config_class.display_name()
        cls.loss_name = cls._config_class.loss
        cls._tag_names = ["trl", cls.loss_name, "nca-trl"]

    def __init__(
        self,
        model: "str | PreTrainedModel | PeftModel",  # noqa: F821
        ref_model: PreTrainedModel | None = None,
        args: DPOConfig | None = None,
        data_collator: DataCollator | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset
        | IterableDataset
        | DatasetDict
        | IterableDatasetDict
        | dict[str, Dataset | IterableDataset]
        | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        quantization_config: "BitsAndBytesConfig | None" = None,
        peft_config: "PeftConfig | None" = None,  # noqa: F821
    ):
        self._pooled = {"train": PooledMetrics(), "eval": PooledMetrics(once_per_row=True)}  # until logged (`log`)
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = self._config_class(f"{model_name.split('/')[-1]}-{self._name}")
        check_rated_config(args, self._config_class)
        check_output_dir(args)  # writable, before anything is loaded
        args = self._say_what_is_trained(args)
        # A plain DPOConfig has no `alpha` / `max_completions`: they take the NCA defaults. `alpha` applies to rated
        # completions only: preference pairs are one-hot on the chosen (`_compute_loss`)
        self.alpha = reward_temperature(args)
        self.max_completions = getattr(args, "max_completions", None)

        named = eval_dataset.items() if isinstance(eval_dataset, dict) else [(None, eval_dataset)]
        evals = [(f"eval ({n!r})" if n is not None else "eval", d) for n, d in named]
        for name, dataset in [("train", train_dataset), *evals]:
            refuse_images(dataset, name, type(self).__name__)
        # `padding_free=True` means our own padding-free layout (shared prompt), required (see `_setup_layout`)
        self._padding_free = bool(getattr(args, "padding_free", False))

        if data_collator is None:
            # The parent builds a pairwise collator when none is given: build ours, with the parent's pad-token rule
            if processing_class is None:
                model_id = model if isinstance(model, str) else get_config_model_id(model.config)
                revision = (args.model_init_kwargs or {}).get("revision") if isinstance(model, str) else None
                processing_class = AutoProcessor.from_pretrained(
                    model_id, revision=revision, trust_remote_code=args.trust_remote_code
                )
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            pad_token = args.pad_token or tokenizer.pad_token or tokenizer.eos_token
            if pad_token not in tokenizer.get_vocab():
                raise ValueError(  # DPOTrainer's words
                    f"The specified `pad_token` ('{pad_token}') is not found in the vocabulary of the given "
                    f"`processing_class` ({processing_class.__class__.__name__}). Ensure that the `pad_token` exists "
                    "in the vocabulary before using it as a padding token."
                )
            tokenizer.pad_token = pad_token
            data_collator = DataCollatorForRatedCompletions(
                pad_token_id=tokenizer.pad_token_id,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of if isinstance(args.pad_to_multiple_of, int) else None,
            )

        check_reference_vocabulary(ref_model, getattr(processing_class, "tokenizer", processing_class))
        # TRL's own padding-free path is disabled in TRL (it warns that it falls back to padding): it never sees the
        # flag, which this trainer implements with the shared-prompt layout instead
        with self._zero3_moe_leaves(args), _hidden_from_parent(args, "padding_free", False):
            super().__init__(model=model, ref_model=ref_model, args=args, data_collator=data_collator,
                             train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                             compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
                             quantization_config=quantization_config, peft_config=peft_config)
        if args.disable_dropout:  # TRL's reaches nn.Dropout modules only, not an attention dropout passed as a float
            disable_attention_dropout(*[self.accelerator.unwrap_model(m) for m in (self.model, self.ref_model)
                                        if m is not None])
        use_language_backbones(self)  # where TRL's fused LM head would not find it (Llama 4's language model)
        check_router_aux(self)  # the number of MoE experts TRL's fused head reads, where the loss is computed
        check_collator(self.data_collator, self.train_dataset, args.remove_unused_columns)  # not at the first step
        self._setup_layout()
        self._no_batch_dispatch()
        use_readable_progress(self)  # log lines without quoted strings, no nested evaluation bar in a log file
        # DPOTrainer's flag, here whether the batches are padding-free (the shared-prompt layout runs)
        self.padding_free = bool(getattr(self.data_collator, "shared_prompt", False))
        self._say_if_alpha_unused(args)

    def _say_what_is_trained(self, args):
        """A config that is not ours (a plain `trl.DPOConfig`, or a pipeline's subclass of it) names another loss in
        `loss_type`: log once what is trained, and train with a copy of `args` whose `loss_type` names it, so that the
        logs and the saved `training_args.bin` say what was trained (the caller's object is left as it is)."""
        trained = [self.loss_name]
        if list(args.loss_type if isinstance(args.loss_type, list) else [args.loss_type]) == trained:
            return args
        logger.warning(
            "%s trains the %s loss (loss_type %s; on chosen/rejected pairs it equals TRL's %r), not the given %s's "
            "loss_type=%s: the trainer's arguments, its saved training_args.bin and its model card say %s.",
            type(self).__name__, self._name, trained, self._config_class.pairwise_loss_type, type(args).__name__,
            args.loss_type, trained,
        )
        args = copy.copy(args)
        args.loss_type = trained
        return args

    def _say_if_alpha_unused(self, args) -> None:
        """`alpha` set explicitly while every training row is a chosen/rejected pair: say once that it does not apply."""
        if getattr(args, "alpha", None) is None or not isinstance(self.train_dataset, Dataset):
            return
        if PAIR_COLUMN in self.train_dataset.column_names and all(self.train_dataset[PAIR_COLUMN]):
            logger.warning(
                "alpha=%s does not apply here: every row of the train dataset is a chosen/rejected pair, whose targets "
                "are one-hot on the chosen completion whatever alpha is (alpha is the reward temperature of rated "
                "completions). %s trains TRL's %r loss on these pairs.",
                args.alpha, type(self).__name__, self._config_class.pairwise_loss_type,
            )

    @contextlib.contextmanager
    def _zero3_moe_leaves(self, args):
        """Under DeepSpeed ZeRO-3, every engine built in the block (the reference model and the precompute engine in
        `__init__`, the policy in `train`) gets its sparse MoE blocks marked as ZeRO-3 leaves first
        (`nca_trl.runtime.distributed`). `self.z3_leaves_marked` gets, per engine, the number of blocks marked."""
        if not hasattr(self, "z3_leaves_marked"):
            self.z3_leaves_marked: list[int] = []
        plugin = getattr(args, "deepspeed_plugin", None)
        if plugin is None or plugin.zero_stage != 3:
            yield
            return
        from .runtime.distributed import zero3_moe_leaf_guard

        with zero3_moe_leaf_guard(getattr(args, "zero3_leaf_modules", None), marked=self.z3_leaves_marked):
            yield

    def train(self, *args, **kwargs):
        with self._zero3_moe_leaves(self.args):
            return super().train(*args, **kwargs)

    # ------------------------------------------------------------------------------------------------ data
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return prepare_rated_dataset(with_row_index(dataset), processing_class, args, dataset_name, self.max_completions)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(ROW_COLUMNS)

    # ------------------------------------------------------------------------------------------------ log-probs
    def _sequence_logps(self, model, inputs, **model_kwargs):
        """One forward over all N completions of the batch, in either layout.

        Returns `(outputs, take, token_sequence, logps)`: `take(outputs.field)` reads a per-token output field
        (`log_probs`, `entropy`, ...) at the M scored completion tokens, `token_sequence` `[M]` gives each scored
        token's sequence, and `logps` `[N]` is each sequence's summed log-prob (slot-major order).
        """
        if is_shared_prompt_batch(inputs):  # shared-prompt layout: one flat row
            if not is_shared_prompt_enabled(unwrapped := self.accelerator.unwrap_model(model)):
                raise RuntimeError("A shared-prompt batch reached a model whose attention was not set up for it.")
            input_ids = inputs["input_ids"]
            with shared_prompt_forward(unwrapped, int(inputs["max_seqlen_k"])):  # checks what the attention got
                outputs = model(
                    input_ids=input_ids,
                    position_ids=inputs["position_ids"],
                    # A 4D mask counts as prepared and skips the model's own mask creation (the layout carries the real
                    # attention pattern); as [1, 1, 1, T] ones it also tells the MoE aux loss that every token is real
                    attention_mask=torch.ones(1, 1, 1, input_ids.size(1), dtype=torch.bool, device=input_ids.device),
                    shift_labels=inputs["shift_labels"],
                    nca_layout=VarlenLayout.from_batch(inputs),
                    use_cache=False,
                    fused_lm_head=True,
                    **model_kwargs,
                )
            index = (inputs["token_sequence"] >= 0).nonzero().squeeze(1)
            token_sequence = inputs["token_sequence"][index]

            def take(field):
                return field.reshape(-1)[index]

            # Sum each sequence's token log-probs from the plain layout's [N, L - 1] row, at the same columns: the
            # same float32 reduction as DPOTrainer's `per_token_logps.sum(dim=1)`, whose rounding on sums of
            # hundreds of tokens (~1e-4 on -2000) would otherwise show in the loss.
            token_logps = take(outputs.log_probs)
            n = int(inputs["completion_slots"].sum())
            rows = token_logps.new_zeros(n, int(inputs["plain_width"]))
            rows = rows.index_put((token_sequence, inputs["token_column"][index]), token_logps)
            return outputs, take, token_sequence, rows.sum(dim=1)

        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            labels=labels,
            use_cache=False,
            fused_lm_head=True,
            **model_kwargs,
        )
        # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens
        seq_len = completion_mask.size(1) - 1
        index = completion_mask[:, 1:].reshape(-1).nonzero().squeeze(1)

        def take(field):
            return field[:, -seq_len:].reshape(-1)[index]

        logps = outputs.log_probs[:, -seq_len:].sum(dim=1)  # as DPOTrainer sums, for identical numerics
        return outputs, take, index // seq_len, logps

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs `[B, Kmax]` (0 in empty slots) of one collated batch, from `model` or, under PEFT with
        no reference model, from the policy with its adapter disabled."""
        adapter_context = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter_context = use_adapter(unwrapped, adapter_name=reference_adapter(unwrapped))
        with (
            torch.no_grad(),
            _activation_checkpointing_off(self.model),
            adapter_context,
            experts_for_fused_head(model),  # no MoE aux loss in a reference forward (TRL computes one by the config)
            self.accelerator.autocast(),
        ):
            logps = self._sequence_logps(model, inputs)[-1]
        return to_slots(logps, inputs["completion_slots"])

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        return precompute_ref_logps(self, dataset, name, batch_size)  # `nca_trl.ref_cache`: K values, full cache key

    # ------------------------------------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        slots, rewards = inputs["completion_slots"], inputs["rewards"]

        with router_aux_forward(self) as model_kwargs:  # the MoE load-balancing loss, where it is on
            outputs, take, token_sequence, seq_logps = self._sequence_logps(model, inputs, **model_kwargs)
        logps = to_slots(seq_logps, slots)
        if self.precompute_ref_logps:
            ref_logps = inputs["ref_logps"]
        else:
            ref_logps = self.compute_ref_log_probs(self.model if self.ref_model is None else self.ref_model, inputs)
        self._ref_logps = ref_logps.detach(), slots  # which rows' are not finite, if the loss is not (`safety`)
        logratios = logps.float() - ref_logps.float()

        # Per prompt: the reward temperature for rated completions, one-hot (0) for a chosen/rejected pair
        pairs = inputs.get(PAIR_COLUMN)  # absent from a collator of the user's own that does not set it: all rated
        alpha = self.alpha if pairs is None else torch.where(pairs, 0.0, self.alpha)
        row_losses = self._loss_fn(logratios, rewards, self.beta, alpha, slots)
        self._row_losses = row_losses.detach()  # which rows are not finite, if the loss is not (`nca_trl.runtime.safety`)
        loss = add_router_aux_loss(self, row_losses.mean(), outputs, mode) * self._window_weight(inputs)

        self._log_metrics(mode, inputs, outputs, take, token_sequence, logps.detach(), logratios.detach(),
                          (row_losses + (loss - row_losses.mean())).detach() if mode == "eval" else None)

        if return_outputs:
            warnings.warn(
                "`return_outputs=True` recomputes the logits with an extra forward pass (the fused LM head does not "
                "build them).",
                FutureWarning,
                stacklevel=2,
            )
            if is_shared_prompt_batch(inputs):
                raise ValueError(
                    "`return_outputs=True` needs each sequence's padded logits, which a shared-prompt batch does not "
                    "have: set compute_metrics before constructing the trainer (its layout is then plain), or "
                    "shared_prompt=False."
                )
            with torch.no_grad(), experts_for_fused_head(model):  # no router aux loss in this forward
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return (loss, outputs) if return_outputs else loss

    def _log_metrics(self, mode, inputs, outputs, take, token_sequence, logps, logratios, losses=None):
        """DPOTrainer's metrics with chosen = the highest-reward completion and rejected = the mean of the others,
        plus the pairwise ranking accuracy over completion pairs whose rewards differ: per prompt, pooled over the
        logged step's prompts of every micro-batch and process (`nca_trl.metrics.prompt_metrics`); in an evaluation
        the loss too (`losses`: each prompt's, with its batch's router aux loss), each prompt once."""
        slots = inputs["completion_slots"]
        # Training: every prompt trained on (`gather_for_metrics` cut each micro-batch of an epoch's last accumulation
        # window to the remainder: transformers reads a window's batches first). An evaluation: each prompt once
        gather = self.accelerator.gather if mode == "train" else self.accelerator.gather_for_metrics
        if mode == "train":
            tokens = gather(inputs["sequence_tokens"].sum()).sum()
            self._total_train_tokens += tokens.item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        names, numerators, denominators = prompt_metrics(
            self.beta * logratios, logps, inputs["rewards"], slots, token_sequence, take(outputs.entropy.detach()),
            take(outputs.mean_logits.detach()), take(outputs.is_top1), losses)
        # An evaluation counts a launch's padding rows once (several processes); a stream's row indices restart in
        # each dataloader worker's shards, so they tell rows apart only without workers
        once = self.accelerator.num_processes > 1 and self.args.dataloader_num_workers <= 1
        rows = (inputs[ROW_INDEX],) if ROW_INDEX in inputs and once else ()
        self._pooled[mode].add(names, *gather((numerators, denominators, *rows)))

    # ------------------------------------------------------------------------------------------------ logging
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if isinstance(eval_dataset, dict):  # DPOTrainer's evaluates each set without coming back here: its prefix
            return {key: value for name, dataset in eval_dataset.items() for key, value in self.evaluate(
                self._prepare_dataset(dataset, self.processing_class, self.args, name), ignore_keys,
                f"{metric_key_prefix}_{name}").items()}
        self._metric_key_prefix = metric_key_prefix
        self._pooled["eval"].clear()  # nothing of a forward outside an evaluation (a `compute_loss` call of the user's)
        try:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._metric_key_prefix = "eval"

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        """DPOTrainer's `predict`, on raw rows too (DPOTrainer's takes tokenized rows only; ours raised KeyError):
        prepared as `evaluate` prepares a dataset, with its reference log-probs under `precompute_ref_log_probs`."""
        test_dataset = self._prepare_dataset(test_dataset, self.processing_class, self.args, metric_key_prefix)
        if self.precompute_ref_logps:
            if self.ref_model is None and not is_peft_model(self.model) and self.state.global_step > 0:
                raise ValueError("predict() needs this dataset's reference log-probs (precompute_ref_log_probs=True), "
                                 "and after training has started the policy is no longer its reference: pass the "
                                 "dataset as eval_dataset at construction, or give an explicit ref_model.")
            batch = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
            test_dataset = self._precompute_ref_logps(test_dataset, metric_key_prefix, batch)
        return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """DPOTrainer's `log` with the pooled metrics, and the evaluated set's own prefix (`eval_heldout_`, or
        `metric_key_prefix`) where DPOTrainer's puts "eval_" in front of every evaluation's metrics."""
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(values) / len(values) for key, values in self._metrics[mode].items()}
        metrics.update(self._pooled[mode].values())  # an evaluation's loss too: each prompt once
        prefix = f"{getattr(self, '_metric_key_prefix', 'eval')}_" if mode == "eval" else ""
        logs.update({prefix + key: value for key, value in metrics.items()})
        if "train_loss" in logs:  # the end of `train()`: a resumed run's whole-run mean (`ResumeAtTheEndMixin`)
            logs["train_loss"] = self._whole_run_train_loss(logs["train_loss"])
        super(DPOTrainer, self).log(logs, start_time)
        self._metrics[mode].clear()
        self._pooled[mode].clear()


class NCATrainer(_RatedCompletionsTrainer):
    """
    Trainer for Noise Contrastive Alignment (NCA), [Chen et al. 2024](https://huggingface.co/papers/2402.05369).

    A drop-in [`trl.DPOTrainer`] (same constructor) whose dataset holds, per prompt, K >= 2 completions with scalar
    rewards (`{"prompt", "completions", "rewards"}`), or TRL preference pairs (K = 2, one-hot on the chosen: TRL's
    `nca_pair` loss, whatever `alpha` is). Each completion is a binary real-vs-noise decision weighted by
    `softmax(rewards / alpha)`, which keeps the likelihood of good completions from falling (see
    `nca_trl.losses.nca_loss`). `per_device_train_batch_size` counts prompts.

    Example:
    ```python
    >>> from datasets import load_dataset
    >>> from nca_trl import NCAConfig, NCATrainer

    >>> dataset = load_dataset("json", data_files="data/vicuna_rated.jsonl", split="train")
    >>> trainer = NCATrainer(model="path/to/model", args=NCAConfig(output_dir="out"), train_dataset=dataset)
    >>> trainer.train()
    ```
    """

    _config_class = NCAConfig
    _loss_fn = staticmethod(nca_loss)


class InfoNCATrainer(_RatedCompletionsTrainer):
    """
    Trainer for InfoNCA, [Chen et al. 2024](https://huggingface.co/papers/2402.05369).

    A drop-in [`trl.DPOTrainer`] (same constructor) on K >= 2 rated completions per prompt: a K-way soft-label
    classification of which completion is best, with targets `softmax(rewards / alpha)` (see
    `nca_trl.losses.infonca_loss`). On chosen/rejected pairs (one-hot targets, whatever `alpha` is) it is exactly DPO.

    Example:
    ```python
    >>> from nca_trl import InfoNCAConfig, InfoNCATrainer

    >>> trainer = InfoNCATrainer(model="path/to/model", args=InfoNCAConfig(output_dir="out"), train_dataset=dataset)
    >>> trainer.train()
    ```
    """

    _config_class = InfoNCAConfig
    _loss_fn = staticmethod(infonca_loss)


def trainer_for_loss(loss: str) -> type[_RatedCompletionsTrainer]:
    """The trainer class of a loss: `"nca"` -> `NCATrainer`, `"infonca"` -> `InfoNCATrainer` (`nca-trl train --loss`,
    a pipeline that reads the loss from its recipe)."""
    from .config import config_for_loss

    config_class = config_for_loss(loss)
    return next(t for t in (NCATrainer, InfoNCATrainer) if t._config_class is config_class)
