"""Train/serve parity: the trainer learns exactly what the server will ask for.

For a conversation, the token ids TRL trains on must be the server's prompt
rendering (``tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)``,
via tuneloop.chat.render_prompt, which server/engine.py calls) followed by the
answer's tokens and the EOS token ``<|im_end|>`` — and the loss must cover the
answer and that EOS (so a fine-tuned model learns to stop), never the prompt.
"""

from __future__ import annotations

import pytest
from conftest import require

from tuneloop.chat import render_prompt
from tuneloop.settings import PathSettings

CONVERSATIONS = [
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Hello! How are you today?"},
        {"role": "assistant", "content": "I am fine, thank you."},
        {"role": "user", "content": "And the weather?"},
        {"role": "assistant", "content": "Sunny, with a light breeze."},
    ],
]

SMOLLM2 = PathSettings().models_path / "smollm2-135m-instruct"  # $TUNELOOP_MODEL_CACHE, as the product reads it


@pytest.fixture(scope="module")
def trained_on(tiny_model, tmp_path_factory):
    """The (tokenizer, training rows) TRL's SFTTrainer holds after tuneloop prepared it."""
    from datasets import Dataset

    from tuneloop.trainer.config import TrainConfig
    from tuneloop.trainer.train import _build_trainer

    ds = Dataset.from_list(
        [{"id": str(i), "messages": c, "request_id": None, "origin": "file"} for i, c in enumerate(CONVERSATIONS)]
    )
    cfg = TrainConfig(dataset="inline", max_steps=1).validate()
    trainer, tok = _build_trainer(cfg, tiny_model, ds, None, "sft", tmp_path_factory.mktemp("parity"), progress=False)
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    del trainer
    return tok, rows


def test_server_prompt_rendering_is_the_chat_template_with_generation_prompt(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    for conv in CONVERSATIONS:
        expected = tok.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
        assert render_prompt(tok, conv[:-1]) == list(expected)
        assert tok.decode(render_prompt(tok, conv[:-1])).endswith("<|im_start|>assistant\n")


def test_trained_tokens_are_server_prompt_then_answer_then_eos(trained_on):
    tok, rows = trained_on
    assert len(rows) == len(CONVERSATIONS)
    for conv, row in zip(CONVERSATIONS, rows):
        prompt = render_prompt(tok, conv[:-1])
        answer = tok(conv[-1]["content"], add_special_tokens=False)["input_ids"]
        assert row["input_ids"] == prompt + answer + [tok.eos_token_id]
        # the loss covers the answer and the EOS, nothing of the prompt
        assert row["labels"] == [-100] * len(prompt) + answer + [tok.eos_token_id]
        assert tok.convert_ids_to_tokens(row["labels"][-1]) == "<|im_end|>"


def test_trained_sequence_is_the_full_chat_rendering_up_to_end_of_turn(trained_on):
    """The answer tokens are the ones the chat template itself renders: no tokenization seam at the boundary."""
    tok, rows = trained_on
    for conv, row in zip(CONVERSATIONS, rows):
        full = list(tok.apply_chat_template(conv, tokenize=True, return_dict=False))
        n = len(row["input_ids"])
        assert full[:n] == row["input_ids"]
        assert full[n - 1] == tok.eos_token_id


def test_parity_holds_for_the_default_base_model_tokenizer():
    require((SMOLLM2 / "tokenizer.json").is_file(), "SmolLM2", "tuneloop models pull smollm2-135m-instruct")
    from transformers import AutoTokenizer

    from tuneloop.chat import training_example

    tok = AutoTokenizer.from_pretrained(str(SMOLLM2))
    assert tok.eos_token == "<|im_end|>"
    for conv in CONVERSATIONS:
        ex = training_example(tok, conv)
        prompt = list(tok.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=True, return_dict=False))
        full = list(tok.apply_chat_template(conv, tokenize=True, return_dict=False))
        n = len(ex["input_ids"])
        assert ex["input_ids"][: len(prompt)] == prompt
        assert ex["input_ids"] == full[:n] and full[n - 1] == tok.eos_token_id
        assert ex["completion_mask"] == [0] * len(prompt) + [1] * (n - len(prompt))
