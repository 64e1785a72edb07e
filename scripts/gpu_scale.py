#!/usr/bin/env python
"""The stages of the GPU scale run, one process each: scripts/gpu_scale.sh runs them (see it for the whole run).

The stages live in the package `scripts/nca_scale/` (its docstring says what each measures; `training_stages.py`
and `other_stages.py` hold them). Python puts this file's folder first on the import path, so the package imports
as is, and so do benchmark.py and plan_memory.py beside it.

    python scripts/gpu_scale.py environment --work WORK --result ENV.json [--smoke]
    python scripts/gpu_scale.py STAGE --work WORK --result RESULT.json [--results OUT_DIR/gpu_scale.json]
                                [--budget SECONDS] [--smoke]
    python scripts/gpu_scale.py build --work WORK --arch mistral|mixtral|digits [--smoke]
"""

import sys

from nca_scale.cli import main

if __name__ == "__main__":
    sys.exit(main())
