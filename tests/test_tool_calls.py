"""Conversational data as TRL takes it: assistant turns with `tool_calls` and empty or missing `content`, tool-result
turns, and a `tools` column handed to the chat template; for chosen/rejected pairs and for rated completions."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer

from nca_trl import InfoNCATrainer, NCATrainer
from nca_trl.data.formats import DataValidationError

from test_trainer import make_args

# A chat template that renders the tools and the tool calls (the tiny model's own renders neither)
TOOL_TEMPLATE = (
    "{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}[INST] {{ message['content'] }} [/INST]"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if message.get('tool_calls') -%}[TOOL_CALLS]{{ message['tool_calls'] | tojson }}{%- endif -%}"
    "{%- if message.get('content') -%}{{ message['content'] }}{%- endif -%}{{ eos_token }}"
    "{%- elif message['role'] == 'tool' -%}[TOOL_RESULTS]{{ message['content'] }}[/TOOL_RESULTS]"
    "{%- else -%}{{ message['content'] }}{%- endif -%}"
    "{%- endfor -%}"
)
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def call(city):
    return [{"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]


def pair_rows():
    """TRL's tool-calling preference format: the chosen answer calls the tool (no `content`), reads its result."""
    rows = []
    for city, temp in (("Paris", 22), ("Oslo", 4), ("Rome", 27), ("Lima", 18)):
        rows.append({
            "prompt": [{"role": "user", "content": f"What is the weather in {city}?"}],
            "chosen": [{"role": "assistant", "tool_calls": call(city)},
                       {"role": "tool", "name": "get_weather", "content": f"{temp} C"},
                       {"role": "assistant", "content": f"It is {temp} C in {city}."}],
            "rejected": [{"role": "assistant", "content": "I cannot know that."}],
            "tools": json.dumps(TOOLS),
        })
    return rows


@pytest.fixture()
def tool_tokenizer(tiny_mistral):
    tokenizer = AutoTokenizer.from_pretrained(tiny_mistral)
    tokenizer.chat_template = TOOL_TEMPLATE
    return tokenizer


@pytest.mark.slow
def test_tool_call_pairs_train_as_with_dpo_trainer(tiny_mistral, tool_tokenizer, tmp_path):
    """Before: refused with "field 'chosen': message 0, has no 'content' key". Now the same token ids as
    trl.DPOTrainer (the tools rendered by the template), and all three train."""
    dataset = Dataset.from_list(pair_rows())
    trainers = {}
    for cls in (DPOTrainer, NCATrainer, InfoNCATrainer):
        args = make_args(DPOConfig, tmp_path / cls.__name__, max_steps=2, max_length=256, learning_rate=1e-2)
        trainer = cls(model=tiny_mistral, args=args, train_dataset=dataset, processing_class=tool_tokenizer)
        before = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.train()
        assert any(not torch.equal(p, b) for p, b in zip(trainer.model.parameters(), before)), cls.__name__
        assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
        trainers[cls] = trainer
    dpo = trainers[DPOTrainer].train_dataset
    for cls in (NCATrainer, InfoNCATrainer):
        ours = trainers[cls].train_dataset
        for i in range(len(dataset)):
            assert ours[i]["prompt_ids"] == dpo[i]["prompt_ids"]
            assert ours[i]["completion_ids"] == [dpo[i]["chosen_ids"], dpo[i]["rejected_ids"]]
    text = tool_tokenizer.decode(dpo[0]["prompt_ids"] + dpo[0]["chosen_ids"])
    assert "[AVAILABLE_TOOLS]" in text and "[TOOL_CALLS]" in text and "[TOOL_RESULTS]22 C" in text


@pytest.mark.slow
def test_tool_call_rated_completions_train(tiny_mistral, tool_tokenizer, tmp_path):
    """K rated completions with tool calls (empty `content`), a tool turn, and `tools` as a list of schemas."""
    rows = [{
        "prompt": [{"role": "user", "content": f"Weather in {city}?"}],
        "completions": [
            [{"role": "assistant", "content": "", "tool_calls": call(city)},
             {"role": "tool", "name": "get_weather", "content": "20 C"},
             {"role": "assistant", "content": f"20 C in {city}."}],
            [{"role": "assistant", "content": "No idea."}],
            [{"role": "assistant", "content": None, "tool_calls": call("Nowhere")}],
        ],
        "rewards": [9.0, 2.0, 4.0],
        "tools": TOOLS,
    } for city in ("Paris", "Oslo", "Rome", "Lima")]
    args = make_args(DPOConfig, tmp_path, max_steps=2, max_length=256, learning_rate=1e-2)
    trainer = NCATrainer(model=tiny_mistral, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tool_tokenizer)
    row = trainer.train_dataset[0]
    assert "[TOOL_CALLS]" in tool_tokenizer.decode(row["completion_ids"][2])
    assert "[AVAILABLE_TOOLS]" in tool_tokenizer.decode(row["prompt_ids"])
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))


@pytest.mark.parametrize("message,problem", [
    ({"role": "assistant"}, "message 0, has neither content nor tool_calls"),
    ({"role": "assistant", "content": None, "tool_calls": None}, "message 0, has neither content nor tool_calls"),
    ({"role": "assistant", "tool_calls": []}, "message 0, has tool_calls [], expected a non-empty list"),
    ({"role": "assistant", "content": ""}, "has empty content in every message"),
])
def test_what_is_really_malformed_still_names_row_and_field(message, problem, tiny_mistral, tmp_path):
    rows = pair_rows()
    rows[1]["chosen"] = [message]
    with pytest.raises(DataValidationError, match="row 1") as error:
        NCATrainer(model=tiny_mistral, args=make_args(DPOConfig, tmp_path), train_dataset=Dataset.from_list(rows))
    assert "'chosen'" in str(error.value) and problem in str(error.value)
