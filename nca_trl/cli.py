"""The `nca-trl` command line: `train`, `generate`, `score`, `iterate` and `make-tiny-model`.

```bash
nca-trl make-tiny-model outputs/tiny-mistral                 # tiny random Mistral + the real Mistral tokenizer
nca-trl train --config recipes/tiny/nca.yaml                 # one process (CPU or one GPU)
nca-trl train --config recipes/tiny/nca.yaml --max_steps 5   # any field can be overridden on the command line
accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero3.yaml \
    -m nca_trl.cli train --config recipes/mistral-7b/nca_ultrafeedback.yaml   # 8 GPUs, ZeRO-3
nca-trl train --config recipes/mistral-7b/nca_ultrafeedback.yaml --dry_run   # parse and print, load nothing
```

Each command lives in its own module: `train` in `nca_trl.training` (the shape of TRL's `scripts/dpo.py`),
`generate` in `nca_trl.generation`, `score` in `nca_trl.scoring`, `iterate` in `nca_trl.iterate`; this module only
dispatches.
"""

from __future__ import annotations

import os
import sys

from .training import train, trainer_for_loss

__all__ = ["main", "train", "trainer_for_loss"]


# ---------------------------------------------------------------------------------------------------------- tiny model
def make_tiny_model_main(argv: list[str]) -> str:
    import argparse

    from .tiny import SIZES, build_tiny_model

    parser = argparse.ArgumentParser(
        prog="nca-trl make-tiny-model",
        description="Build a tiny random-weight Mistral or Mixtral with the real Mistral-7B tokenizer (offline).",
    )
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=("mistral", "mixtral"), default="mistral")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--vocab", choices=("mistral", "digits"), default="mistral",
                        help="the real Mistral-7B tokenizer, or 14 character tokens for the sorting task "
                        "(recipes/tiny/iterate_nca.yaml)")
    ns = parser.parse_args(argv)
    path = build_tiny_model(ns.out_dir, arch=ns.arch, seed=ns.seed, size=ns.size, vocab=ns.vocab,
                            max_position_embeddings=64 if ns.vocab == "digits" else 4096)
    print(f"[nca-trl] tiny {ns.arch} ({ns.size}, {ns.vocab} vocabulary, seed {ns.seed}) written to "
          f"{os.path.abspath(path)}")
    return path


_USAGE = """usage: nca-trl <command> [options]

commands:
  train             train NCA / InfoNCA from a recipe:  nca-trl train --config RECIPE.yaml [--field value ...]
                    (distributed: accelerate launch --config_file ACCEL.yaml -m nca_trl.cli train --config RECIPE.yaml)
  make-tiny-model   build a tiny random model + the Mistral tokenizer:  nca-trl make-tiny-model OUT_DIR [--arch mixtral]
                    (or 14 digit tokens for the sorting task: --vocab digits)
  generate          sample K completions per prompt:  nca-trl generate --model_name_or_path M --dataset_name PROMPTS
                    --output OUT.jsonl [--num_completions 4 ...]   (`nca-trl generate --help` lists the fields)
  score             add rewards from a reward model and/or reward functions:  nca-trl score --dataset_name OUT.jsonl
                    --reward_funcs my_module:my_reward --output RATED.jsonl   (`nca-trl score --help`)
  iterate           rounds of generate -> score -> train:  nca-trl iterate --config RECIPE.yaml [--rounds N]

`nca-trl train --help` lists every recipe field.
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `nca-trl` console script, of `python -m nca_trl.cli` and of `scripts/train.py`."""
    from .arguments import ScriptArguments, _peek, make_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        if rest and rest[0] in ("-h", "--help"):
            make_parser(_peek(rest, "loss") or ScriptArguments.loss).print_help()
            return 0
        train(rest)
        return 0
    if command == "generate":
        from .generation import generate
        from .generation.arguments import make_generate_parser

        if rest and rest[0] in ("-h", "--help"):
            make_generate_parser().print_help()
            return 0
        generate(rest)
        return 0
    if command == "score":
        from .scoring import score
        from .scoring.arguments import make_score_parser

        if rest and rest[0] in ("-h", "--help"):
            make_score_parser().print_help()
            return 0
        score(rest)
        return 0
    if command == "iterate":
        from .iterate import iterate
        from .iterate.arguments import make_iterate_parser

        if rest and rest[0] in ("-h", "--help"):
            make_iterate_parser().print_help()
            return 0
        iterate(rest)
        return 0
    if command in ("make-tiny-model", "make_tiny_model"):
        make_tiny_model_main(rest)
        return 0
    print(f"nca-trl: unknown command {command!r}\n\n{_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
