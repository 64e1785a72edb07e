"""A conversational row through the tokenizer's chat template: its template arguments (`tools`,
`chat_template_kwargs`) checked, and the template's refusals turned into a `DataValidationError` naming the row.

Used by tokenization (`nca_trl.data.tokenize`), which applies the template to the prompt alone and to the prompt
followed by each completion, as `trl.DPOTrainer` does.
"""

from __future__ import annotations

import json

import jinja2
from trl.data_utils import _tokenize

from .formats import DataValidationError, _kind, _short

__all__ = ["apply_chat_template", "template_kwargs"]

_TOOLS_FIX = ("give 'tools' a list of tool definitions (JSON-schema dicts, e.g. [{'type': 'function', 'function': "
              "{...}}]), a JSON string of one, or None")


def template_kwargs(example: dict, row=None, dataset_name: str = "train") -> dict:
    """The chat template's keyword arguments of a row: `tools` (a list of dicts, or a JSON string of one, parsed
    here; None when absent) and the row's `chat_template_kwargs` (a dict, or None), each checked, naming the row.

    Example:
    ```python
    >>> template_kwargs({"tools": '[{"type": "function"}]', "chat_template_kwargs": {"enable_thinking": False}})
    {'tools': [{'type': 'function'}], 'enable_thinking': False}
    ```
    """
    tools = example.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError as e:
            raise DataValidationError(f"'tools' is the string {_short(tools)}, which is not JSON ({e})", _TOOLS_FIX,
                                      row=row, field="tools", dataset_name=dataset_name) from None
    if tools is not None and not (isinstance(tools, (list, tuple)) and all(isinstance(t, dict) for t in tools)):
        raise DataValidationError(f"'tools' is {_kind(tools)}, expected a list of tool definitions (dicts)",
                                  _TOOLS_FIX, row=row, field="tools", dataset_name=dataset_name)
    extra = example.get("chat_template_kwargs")
    if extra is not None and not isinstance(extra, dict):
        raise DataValidationError(
            f"'chat_template_kwargs' is {_kind(extra)}, expected a dict of keyword arguments for the chat template",
            "give 'chat_template_kwargs' a dict, e.g. {'enable_thinking': False}, or None",
            row=row, field="chat_template_kwargs", dataset_name=dataset_name,
        )
    return {"tools": tools, **(extra or {})}


def apply_chat_template(processing_class, messages: list, what: str, field: str, row=None, dataset_name="train",
                        **kwargs) -> list[int]:
    """`trl.data_utils._tokenize(processing_class, messages, **kwargs)["input_ids"]` for a conversation, with the
    template's errors (jinja2's, and the `TypeError` / `KeyError` / `ValueError` of applying it) re-raised as a
    `DataValidationError` naming the row, `field` and `what` was rendered (e.g. "prompt + completion 1")."""
    try:
        return _tokenize(processing_class, messages, **kwargs)["input_ids"]
    except (jinja2.TemplateError, TypeError, KeyError, ValueError) as e:
        raise DataValidationError(
            f"the tokenizer's chat template refused this row ({what}: {type(e).__name__}: {e})",
            "make the messages fit the model's chat template (some templates refuse a 'system' turn, need user and "
            "assistant turns to alternate, or cannot render an assistant turn with 'tool_calls' and no content), use "
            "a tokenizer whose chat template renders them (or set its `chat_template`), or drop the row",
            row=row, field=field, dataset_name=dataset_name,
        ) from e
