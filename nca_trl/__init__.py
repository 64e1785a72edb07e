"""nca-trl: Noise Contrastive Alignment (NCA, InfoNCA) for TRL, on K rated completions per prompt."""

__version__ = "0.1.0"

from .losses import infonca_loss, nca_loss, reward_targets  # noqa: E402

__all__ = ["infonca_loss", "nca_loss", "reward_targets", "NCAConfig", "InfoNCAConfig", "NCATrainer", "InfoNCATrainer"]


def __getattr__(name):
    # The trainers pull in transformers and TRL: import them only when asked for
    if name in ("NCAConfig", "InfoNCAConfig"):
        from . import config

        return getattr(config, name)
    if name in ("NCATrainer", "InfoNCATrainer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'nca_trl' has no attribute {name!r}")
