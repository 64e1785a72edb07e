"""The `trl.DPOConfig` fields that NCA / InfoNCA refuse, and why: anything but their default is an error, never
ignored. Without imports, so that `nca-trl train` can say why before importing anything heavy."""

__all__ = ["UNSUPPORTED_DPO_FIELDS"]

# DPOConfig fields that only shape DPO-family pairwise losses: anything but the default is an error, never ignored.
UNSUPPORTED_DPO_FIELDS = {
    "loss_weights": (None, "it weights a combination of DPO `loss_type`s; NCA/InfoNCA is a single loss"),
    "ld_alpha": (None, "LD-DPO down-weights the tail of the longer of two completions; there is no pair here"),
    "f_divergence_type": ("reverse_kl", "the f-DPO reparameterisation only cancels in a chosen-rejected difference"),
    "f_alpha_divergence_coef": (0.5, "it only applies with `f_divergence_type='alpha_divergence'`"),
    "label_smoothing": (0.0, "robust DPO / EXO label smoothing; soften the targets with `alpha` instead"),
    "use_weighting": (False, "WPO weights multiply a chosen and a rejected probability"),
    "discopop_tau": (0.05, "it only applies to `loss_type='discopop'`"),
    # A TrainingArguments field: `Trainer.compute_loss`'s token-level smoothing, which DPOTrainer's loss replaces
    "label_smoothing_factor": (0.0, "transformers' token-level label smoothing is applied by `Trainer.compute_loss`, "
                               "which `trl.DPOTrainer`'s loss (and ours) replaces, so it was ignored; soften the "
                               "targets with `alpha` instead"),
    # Not a DPOConfig field in TRL 1.16; refused should a TRL version bring it back
    "use_liger_loss": (False, "Liger's fused DPO loss is a pairwise chosen-rejected loss, not a K-completion loss"),
}
