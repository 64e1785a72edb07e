"""Data handling for the NCA / InfoNCA trainers.

- `formats`: the accepted layouts, their detection and `DataValidationError`;
- `rewards`: `check_rewards`, the one check of a reward;
- `validation`: row and dataset validation (`validate_example`, `validate_dataset`) and `to_rated`;
- `ultrafeedback`, `columns`: one raw row to rated completions (`ultrafeedback_to_rated`, `columns_to_rated`);
- `converters`: a whole dataset of any layout to rated completions (`convert_dataset`, `resolve_format`);
- `datafiles`, `folders`, `loading`: local data files checked (`DataFileError`), folders read whole, `dataset_name`
  and mixtures loaded and converted (`load_datasets`, `load_split`);
- `tokenize` and `collator`: what the trainers feed the model.
"""

from .collator import DataCollatorForRatedCompletions
from .columns import columns_to_rated
from .converters import convert_dataset
from .formats import (
    DATASET_FORMATS,
    FINISHED_COLUMN,
    MIXED,
    PAIR_COLUMN,
    PREFERENCE,
    PREFERENCE_IMPLICIT,
    RATED,
    DataValidationError,
    detect_format,
    is_conversational_example,
)
from .rewards import check_rewards
from .tokenize import prepare_rated_dataset, select_completions, tokenize_rated_example
from .ultrafeedback import ultrafeedback_to_rated
from .validation import ValidationReport, to_rated, validate_dataset, validate_example

__all__ = [
    "DataCollatorForRatedCompletions",
    "prepare_rated_dataset",
    "select_completions",
    "tokenize_rated_example",
    "DATASET_FORMATS",
    "DataValidationError",
    "FINISHED_COLUMN",
    "MIXED",
    "PAIR_COLUMN",
    "PREFERENCE",
    "PREFERENCE_IMPLICIT",
    "RATED",
    "ValidationReport",
    "check_rewards",
    "columns_to_rated",
    "convert_dataset",
    "detect_format",
    "is_conversational_example",
    "to_rated",
    "ultrafeedback_to_rated",
    "validate_dataset",
    "validate_example",
]
