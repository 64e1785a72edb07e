"""`python -m nca_scale` (from `scripts/`): the same as `python scripts/gpu_scale.py`."""

import sys

from .cli import main

sys.exit(main())
