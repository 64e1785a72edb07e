"""nca-trl: Noise Contrastive Alignment (NCA, InfoNCA) for TRL, on K rated completions per prompt.

`NCATrainer` / `InfoNCATrainer` (`nca_trl.trainer`), `NCAConfig` / `InfoNCAConfig` (`nca_trl.config`) and the pure
losses (`nca_trl.losses`) are imported on first use, so that `nca-trl --help` imports neither torch nor TRL.
"""

__version__ = "0.1.0"

from .runtime.environment import quiet_deepspeed_cpu_notice, quiet_replica_notices, skip_deepspeed_cpu_shm_build
from .runtime.lazy import lazy_exports

# accelerate imports DeepSpeed wherever it is installed, which prints "Setting accelerator to CPU ..." on a CPU for
# users who never use DeepSpeed: dropped before anything imports it (kept under a DeepSpeed launch)
quiet_deepspeed_cpu_notice()
# DeepSpeed on CPU processes: its inference-only shared-memory kernel is not compiled (a minute, and a C++ compiler)
skip_deepspeed_cpu_shm_build()
# Under a launch, nca-trl's notices are said by each machine's first process only (errors by every process)
quiet_replica_notices()

# public name -> the module that defines it
_EXPORTS = {
    "infonca_loss": "losses",
    "nca_loss": "losses",
    "reward_targets": "losses",
    "NCAConfig": "config",
    "InfoNCAConfig": "config",
    "NCATrainer": "trainer",
    "InfoNCATrainer": "trainer",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
