"""Data handling for the NCA / InfoNCA trainers: formats, validation and converters (`formats`).

Tokenization (`tokenize`) and the collator (`collator`) live in their own modules and are re-exported here too.
"""

from .formats import (
    PREFERENCE,
    PREFERENCE_IMPLICIT,
    RATED,
    DataValidationError,
    ValidationReport,
    columns_to_rated,
    convert_dataset,
    detect_format,
    is_conversational_example,
    to_rated,
    ultrafeedback_to_rated,
    validate_dataset,
    validate_example,
)
from .collator import DataCollatorForRatedCompletions
from .tokenize import prepare_rated_dataset, select_completions, tokenize_rated_example

__all__ = [
    "DataCollatorForRatedCompletions",
    "prepare_rated_dataset",
    "select_completions",
    "tokenize_rated_example",
    "DataValidationError",
    "PREFERENCE",
    "PREFERENCE_IMPLICIT",
    "RATED",
    "ValidationReport",
    "columns_to_rated",
    "convert_dataset",
    "detect_format",
    "is_conversational_example",
    "to_rated",
    "ultrafeedback_to_rated",
    "validate_dataset",
    "validate_example",
]
