#!/usr/bin/env python
"""Training entry point for `accelerate launch` (same as `nca-trl train`).

```bash
accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero3.yaml \
    scripts/train.py --config recipes/mistral-7b/nca_ultrafeedback.yaml
```
"""

import sys

from nca_trl.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    # `scripts/train.py --config X` and `scripts/train.py train --config X` both work
    sys.exit(main(args if args[:1] == ["train"] else ["train", *args]))
