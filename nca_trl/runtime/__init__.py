"""What every command and the trainers share at run time, one home per job.

- `files`: atomic writes, fsync of a folder, JSON for any column (`write_atomic`, `fsync_tree`, `json_default`);
- `environment`: versions of the stack, the process group under `accelerate launch` (`versions`,
  `distributed_state`, `broadcast`);
- `recipes`: `--config RECIPE.yaml` reading and its unknown-key check, repeated flags merged, shared value sets
  (`DTYPES`, `OUTPUT_SUFFIXES`);
- `bundled`: the recipes, accelerate configs and data shipped with the package, by name; `nca-trl recipes`;
- `errors`: `SettingsError`, a setting refused before anything is written or loaded (one line on the command line);
- `output_dir`: the writable check and the lock that keeps two runs out of one `output_dir` (or generate's output);
- `checkpoints`: checkpoints and final models that count only once complete (their marker written last);
- `safety`: the trainers' run safety (non-finite stops naming step and rows, the lock, complete saves);
- `accumulation`: gradient accumulation that weighs each prompt alike, an epoch's last, uneven window too;
- `predictions`: what `compute_metrics` and `predict` get: every completion's logits once, the loss over prompts;
- `launch`: checks of an `accelerate launch` before anything is loaded, and the summary of the process group;
- `distributed`: DeepSpeed ZeRO-3 leaf marking of Mixture-of-Experts blocks;
- `router_aux`: the MoE load-balancing loss through TRL's fused LM head, on families that name their experts otherwise;
- `backbone`: the language backbone TRL's fused LM head runs, where `base_model_prefix` names no submodule (Llama 4);
- `models`: the transformers class that loads a checkpoint (`AutoModelForCausalLM`, or Mistral 3's
  `AutoModelForImageTextToText`); a local model of remote code refused without `trust_remote_code`.

Nothing here imports a command package (`train`, `generation`, `scoring`, `iterate`) or the data package.
"""
