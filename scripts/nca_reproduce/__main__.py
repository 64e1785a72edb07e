"""`python -m nca_reproduce` (from `scripts/`): the same as `python scripts/reproduce.py`."""

from .cli import main

main()
