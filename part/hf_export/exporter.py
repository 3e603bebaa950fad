"""Exports a trained Speech LLM directory to a self-contained Hugging Face directory (the command line is
`python -m part export`, part/cli/export.py).

The source is a directory `SpeechLLM.from_pretrained` loads (`<output_dir>/final`, a checkpoint's `step_N`), or
a run's output directory (its `final/`), or a checkpoint directory (the step its `latest` names). Written to OUT:

  config.json              PartSpeechLLMConfig: the encoder's and the LLM's configs nested, the adapter's settings,
                           the audio placeholder's id, the frame vocabulary's size; auto_map for AutoConfig,
                           AutoModel, AutoModelForCausalLM and AutoProcessor
  generation_config.json   the decoding settings of `SpeechLLM.generate` (greedy, penalties, suppressed tokens, eos
                           at the chat format's end-of-turn token) and `python -m part infer`'s default length
  model.safetensors        encoder.*, adapter.*, llm.* (LoRA merged into the LLM's weights), frame_token_ids
  processor_config.json, tokenizer files
                           the processor: the encoder family's feature extractor, the tokenizer with a chat
                           template (ChatML's when the LLM's tokenizer has none) and the prompts' text
  configuration_part.py, modeling_part.py, processing_part.py
                           the modelling code, copied from part/hf_export/template (torch and transformers only)

OUT is written to `OUT.partial` and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

TEMPLATE = Path(__file__).parent / "template"
TEMPLATE_FILES = ("configuration_part.py", "modeling_part.py", "processing_part.py")
MODEL_CLASS = "PartSpeechLLMForConditionalGeneration"
AUTO_MAP = {
    "AutoConfig": "configuration_part.PartSpeechLLMConfig",
    "AutoModel": f"modeling_part.{MODEL_CLASS}",
    "AutoModelForCausalLM": f"modeling_part.{MODEL_CLASS}",
}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_part.PartSpeechProcessor"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SOURCE_FILES = ("part_model.json", "model.safetensors", "tokenizer", "encoder_config", "llm_config")


class ExportError(ValueError):
    """A source that cannot be exported, or an output that cannot be written; the message names the path."""


def resolve_source(path: str | Path) -> Path:
    """The model directory `path` names: itself, its `final/` (a run's output directory), or the checkpoint its
    `latest` names (a checkpoint directory)."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path}: no such directory")
    if not (path / "part_model.json").is_file():
        if (path / "final" / "part_model.json").is_file():
            path = path / "final"
        elif (path / "latest").is_file():
            path = path / (path / "latest").read_text().strip()
    missing = [name for name in SOURCE_FILES if not (path / name).exists()]
    if missing:
        raise ExportError(f"{path} is not a trained model directory (missing {', '.join(missing)}): expected a "
                          "run's output directory (with final/), its final/, a checkpoint directory or one of its "
                          "step_N")
    return path


def chatml_template() -> str:
    """A Jinja chat template that renders ChatML, the prompt format of tokenizers without a template."""
    from part.prompts import TURN_END, TURN_START

    return ("{% for message in messages %}{{ '" + TURN_START + "' + message['role'] + '\\n' + message['content'] + '"
            + TURN_END + "' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '" + TURN_START
            + "assistant\\n' }}{% endif %}")


def task_messages() -> dict[str, str]:
    """The user's message of each speech task, with `{source}` and `{target}` where the language names go."""
    from part.prompts import user_message

    return {"asr": user_message("asr", "{source}"), "s2tt": user_message("s2tt", "{source}", "{target}")}


def merged_llm(model) -> tuple[torch.nn.Module, int]:
    """The LLM with its LoRA adapters merged into the weights they adapt (W + B A alpha / r, through peft), and
    how many weight matrices changed."""
    if model.cfg.llm.lora is None:
        return model.llm, 0
    adapted = sum(1 for name, _ in model.llm.named_modules() if name.endswith("lora_A"))
    return model.llm.merge_and_unload(), adapted


def export_state(model, llm: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights under the exported model's names, floating ones in `dtype`; a tied output head is left out
    (transformers ties it to the embeddings on loading)."""
    head, embeddings = llm.get_output_embeddings(), llm.get_input_embeddings()
    tied = head is not None and head.weight is embeddings.weight
    head_names = {f"{name}.weight" for name, module in llm.named_modules() if module is head}
    state = {}
    for prefix, module in (("encoder", model.encoder), ("adapter", model.adapter), ("llm", llm)):
        for name, tensor in module.state_dict().items():
            if prefix == "llm" and tied and name in head_names:
                continue
            value = tensor.detach().cpu()  # the model's own memory where nothing changes: no second copy
            state[f"{prefix}.{name}"] = (value.to(dtype) if value.is_floating_point() else value).contiguous()
    if (token_ids := readout_token_ids(model)) is not None:
        state["frame_token_ids"] = token_ids.detach().cpu()
    return state


def readout_settings(model) -> dict:
    """How the exported model reads the adapter's frames: as they are, or through the vocabulary readout
    (`model.alignment.readout`, part/objectives/frames.py) at its temperature over its top tokens."""
    alignment = model.cfg.alignment
    if alignment is None or alignment.readout is None:
        return {"readout": "embeddings", "readout_temperature": 1.0, "readout_top_k": 0}
    from part.objectives.frames import READOUT_TOP_K

    return {"readout": "vocabulary", "readout_temperature": alignment.readout.temperature,
            "readout_top_k": READOUT_TOP_K}


def unexported_settings(cfg) -> list[str]:
    """The settings of a model that the exported modelling code does not implement."""
    readout = cfg.alignment.readout if cfg.alignment is not None else None
    if readout is None:
        return []
    return ([f"model.alignment.readout.blank_as={readout.blank_as!r}"] if readout.blank_as is not None else []) \
        + (["model.alignment.readout.compress=true"] if readout.compress else [])


def readout_token_ids(model) -> torch.Tensor | None:
    """The token id of each frame class of the vocabulary readout (None: the classes are the token ids)."""
    if readout_settings(model)["readout"] != "vocabulary":
        return None
    from part.objectives.frames import frame_alignment

    return frame_alignment(model).token_ids


def export(source: str | Path, out: str | Path, dtype: str = "float32", max_new_tokens: int = 128,
           overwrite: bool = False, report: Callable[[str], None] = print) -> Path:
    """Writes the Hugging Face directory of the trained model at `source` to `out`; returns `out`.
    `report` receives the progress lines."""
    from transformers import GenerationConfig

    from part.hf_export.template.configuration_part import PartSpeechLLMConfig
    from part.hf_export.template.processing_part import PartSpeechProcessor
    from part.model.speech_llm import SpeechLLM
    from part.prompts import AUDIO_TOKEN, LANGUAGE_NAMES, PromptFormat

    start = time.time()
    src = resolve_source(source)
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out} exists and is not empty (--overwrite replaces it)")
    if dtype not in DTYPES:
        raise ExportError(f"dtype: one of {', '.join(DTYPES)}, not '{dtype}'")
    report(f"[export] loading {src}")
    try:
        model, tokenizer = SpeechLLM.from_pretrained(src)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load the model in {src}: {exc}") from exc
    model.eval()
    cfg = model.cfg
    if (unsupported := unexported_settings(cfg)):
        raise ExportError(f"{src}: the exported model cannot read its frames as it was trained: "
                          f"{', '.join(unsupported)} (the transformers modelling code has no such reading)")
    llm, adapted = merged_llm(model)
    if adapted:
        report(f"[export] merged LoRA (rank {cfg.llm.lora.rank}, alpha {cfg.llm.lora.alpha}) into {adapted} LLM "
               "weight matrices")

    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chatml_template()
    prompts, rendered = model.prompt_format, PromptFormat.from_tokenizer(tokenizer)
    if (rendered.before, rendered.after, rendered.end_token) != (prompts.before, prompts.after, prompts.end_token):
        raise ExportError(f"{src / 'tokenizer'}: its chat template renders prompts other than the model's")

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        state = export_state(model, llm, DTYPES[dtype])
        size = sum(t.numel() * t.element_size() for t in state.values())
        report(f"[export] writing weights: {len(state)} tensors, {size / 2**20:.1f} MiB ({dtype}) -> "
               "model.safetensors")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del state

        config = PartSpeechLLMConfig(
            encoder_config=model.encoder.config.to_dict(), llm_config=llm.config.to_dict(),
            adapter={"downsample": cfg.adapter.downsample, "kind": cfg.adapter.kind, "hidden": cfg.adapter.hidden,
                     "layers": cfg.adapter.layers, "heads": cfg.adapter.heads, **readout_settings(model)},
            audio_token_id=model.audio_token_id,
            frame_vocabulary_size=0 if (ids := readout_token_ids(model)) is None else len(ids),
            architectures=[MODEL_CLASS], dtype=dtype,
        )
        config.auto_map = dict(AUTO_MAP, **PROCESSOR_AUTO_MAP)
        config.save_pretrained(tmp)
        GenerationConfig(num_beams=1, max_new_tokens=max_new_tokens,
                         **model.generation_settings()).save_pretrained(tmp)
        report("[export] wrote config.json and generation_config.json")

        processor = PartSpeechProcessor(model.audio_features.extractor, tokenizer, prompt_before=prompts.before,
                                        prompt_after=prompts.after, end_token=prompts.end_token,
                                        task_messages=task_messages(), language_names=dict(LANGUAGE_NAMES),
                                        audio_token=AUDIO_TOKEN)
        processor.auto_map = dict(PROCESSOR_AUTO_MAP)
        processor.save_pretrained(tmp)
        report(f"[export] wrote the processor ({type(processor.feature_extractor).__name__}, the tokenizer with "
               "its chat template)")

        for name in TEMPLATE_FILES:
            shutil.copyfile(TEMPLATE / name, tmp / name)
        (tmp / "part_export.json").write_text(json.dumps({"source": str(src.resolve()), "dtype": dtype},
                                                         indent=1))
        report(f"[export] copied the modelling code ({', '.join(TEMPLATE_FILES)})")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    report(f"[export] done in {time.time() - start:.1f} s: {out}")
    return out


def main_report(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
