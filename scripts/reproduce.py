#!/usr/bin/env python
"""Reproduce the NCA paper's claims at small scale on a CPU, with plots, from one command.

The experiments live in the package `scripts/nca_reproduce/` (one module each: `identity.py`, `trend.py`,
`ground_truth.py`; its docstring says what each measures). Python puts this file's folder first on the import path,
so the package imports as is; `nca_trl` must be installed (`pip install -e .`).

```bash
python scripts/reproduce.py --out results/            # all three experiments, ~11 min on 2 busy CPU cores
python scripts/reproduce.py --out /tmp/r --quick      # smoke run, about a minute
python scripts/reproduce.py --out results/ --experiments trend reward
python scripts/reproduce.py --help
```
"""

from nca_reproduce.cli import main

if __name__ == "__main__":
    main()
