"""Prompts follow the LLM tokenizer's own chat template (Qwen2-, Llama-3- and Gemma-style ones here), ChatML only
for tokenizers without one: the prompt text, the loss mask (target + the template's end-of-turn token) and
generation (stops on that token, never emits the other special tokens), on tiny random LLMs saved with such
tokenizers. No downloads: each tokenizer is a byte-level BPE without merges plus the family's special tokens."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from part.config import AdapterConfig, EncoderConfig, LLMConfig, ModelConfig
from part.data.audio import encode_flac
from part.data.batching import collate
from part.data.samples import encode_text, make_sample
from part.model.speech_llm import SpeechLLM
from part.model.tokenizer import load_tokenizer
from part.prompts import AUDIO_TOKEN, CHATML, TURN_END, TURN_START, PromptFormat, instruction

REPO = Path(__file__).resolve().parents[2]

# Modelled on the families' published templates (tools, multimodal content and dates left out).
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    template: str | None
    special: dict  # bos/eos/pad token names
    extra: tuple[str, ...]  # the template's own control tokens
    end: str  # the end-of-turn token the template closes an assistant reply with
    header: str  # a control token generation must never emit (biased towards in the suppression test)
    asr_prompt: str  # the exact prompt of ("asr", "de")


QWEN2 = Family(
    "qwen2", QWEN2_TEMPLATE, {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
    ("<|im_start|>", "<|im_end|>"), "<|im_end|>", "<|im_start|>",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|audio|>\n"
    "Transcribe the German audio.<|im_end|>\n<|im_start|>assistant\n",
)
LLAMA3 = Family(
    "llama", LLAMA3_TEMPLATE, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
    ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>", "<|start_header_id|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|audio|>\nTranscribe the German audio."
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
)
GEMMA = Family(
    "gemma", GEMMA_TEMPLATE, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
    ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>", "<start_of_turn>",
    "<bos><start_of_turn>user\n<|audio|>\nTranscribe the German audio.<end_of_turn>\n<start_of_turn>model\n",
)
# The shipped template for base models (the demo's Gemma 3 270M): plain text, the reply closed by <eos>.
BASE = Family(
    "base", (REPO / "configs" / "chat_templates" / "base_model.jinja").read_text(),
    {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, (), "<eos>", "<bos>",
    "<bos><|audio|>\nTranscribe the German audio.\n\n",
)
FAMILIES = [QWEN2, LLAMA3, GEMMA, BASE]


def byte_tokenizer(special: dict, extra: tuple[str, ...], template: str | None):
    """A byte-level BPE without merges (one token per byte: any text round-trips) with the given special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    if extra:
        tok.add_special_tokens({"additional_special_tokens": list(extra)})
    if template is not None:
        tok.chat_template = template
    return tok


def save_llm(family: Family, out) -> None:
    """The family's tokenizer and a tiny random LLM of its architecture, saved as a pretrained directory."""
    from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = byte_tokenizer(family.special, family.extra, family.template)
    tok.save_pretrained(out)
    shape = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
               "gemma": (GemmaConfig, GemmaForCausalLM), "base": (GemmaConfig, GemmaForCausalLM)}
    config_class, model_class = classes[family.name]
    config = config_class(**shape, head_dim=16) if config_class is GemmaConfig else config_class(**shape)
    torch.manual_seed(0)
    model_class(config).save_pretrained(out)


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.name)
def family_model(request, tmp_path_factory):
    family = request.param
    out = tmp_path_factory.mktemp(family.name)
    save_llm(family, out)
    tok = load_tokenizer(str(out))
    cfg = ModelConfig(encoder=EncoderConfig(d_model=32, layers=1, heads=2, ffn_dim=64),
                      adapter=AdapterConfig(hidden=32, layers=1, heads=2), llm=LLMConfig(pretrained=str(out)))
    torch.manual_seed(0)
    return family, SpeechLLM(cfg, tok).eval(), tok, out


def user_turn(content: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]


# ---------------------------------------------------------------- prompt text


def test_prompt_is_what_the_template_renders(family_model):
    family, model, tok, _ = family_model
    prompts = PromptFormat.from_tokenizer(tok)
    assert prompts.from_template and prompts == model.prompt_format
    assert prompts.prompt("asr", "de") == family.asr_prompt
    cases = [("asr", "de", None, None), ("s2tt", "zh", "en", None), ("mt", "fr", "en", "Bonjour à tous."),
             ("text", "ru", None, "Привет")]
    bodies = ["<|audio|>\nTranscribe the German audio.", "<|audio|>\nTranslate the Chinese audio into English.",
              "Translate this French text into English:\nBonjour à tous.", "Continue this Russian text:\nПривет"]
    for (task, source, target, text), body in zip(cases, bodies):
        rendered = tok.apply_chat_template(user_turn(body), tokenize=False, add_generation_prompt=True)
        assert prompts.prompt(task, source, target, text) == rendered
    assert prompts.end_token == family.end
    assert set(prompts.markers) >= {family.end, family.header} and AUDIO_TOKEN not in prompts.markers


def test_tokenizer_keeps_the_template_tokens_and_adds_only_the_placeholder(family_model):
    family, model, tok, out = family_model
    from transformers import PreTrainedTokenizerFast

    original = PreTrainedTokenizerFast.from_pretrained(str(out))
    added = set(tok.get_vocab()) - set(original.get_vocab())
    assert added == {AUDIO_TOKEN}  # ChatML's markers are not added to a tokenizer with its own template
    if family.name != "qwen2":
        assert TURN_START not in tok.get_vocab() and TURN_END not in tok.get_vocab()
    prompt_ids = tok(family.asr_prompt, add_special_tokens=False)["input_ids"]
    assert prompt_ids.count(tok.convert_tokens_to_ids(AUDIO_TOKEN)) == 1
    assert model.end_token_id == tok.convert_tokens_to_ids(family.end)
    assert (model.end_token_id == tok.eos_token_id) == (family is BASE)  # a chat model's turn ends before its text
    for token in (family.end, family.header):
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1


def test_system_turn(family_model):
    family, _, tok, _ = family_model
    system = "You transcribe and translate speech."
    if family.name == "gemma":  # its template refuses system turns: the error says so
        with pytest.raises(ValueError, match="System role not supported"):
            PromptFormat.from_tokenizer(tok, system=system)
        return
    prompts = PromptFormat.from_tokenizer(tok, system=system)
    body = "<|audio|>\nTranscribe the German audio."
    assert prompts.prompt("asr", "de") == tok.apply_chat_template(user_turn(body, system), tokenize=False,
                                                                    add_generation_prompt=True)
    assert system in prompts.before and prompts.end_token == family.end


# ---------------------------------------------------------------- loss mask through the data pipeline


def members(record: dict, seconds: float | None = 1.0) -> dict[str, bytes]:
    out = {"json": json.dumps(record).encode()}
    if seconds:
        t = np.arange(int(16000 * seconds)) / 16000
        out["flac"] = encode_flac((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))
    return out


def test_loss_covers_the_target_and_the_templates_end_token(family_model):
    """Samples made by the data pipeline with the tokenizer's format, collated, assembled by the model: the
    scored labels of every sample are exactly its target's tokens and the template's end-of-turn token, and the
    whole sequence is how the template itself writes the conversation with that reply."""
    from transformers import WhisperFeatureExtractor

    family, model, tok, _ = family_model
    prompts = PromptFormat.from_tokenizer(tok)
    end_id = tok.convert_tokens_to_ids(prompts.end_token)
    record = {"transcript": "Guten Tag", "language": "de", "duration": 1.0, "translations": {"en": "Good day"}}
    counters: Counter = Counter()
    samples = []
    for task, data in (("asr", members(record)), ("s2tt", members(record, 0.7)), ("mt", members(record, None))):
        sample = make_sample(task, "de", f"k-{task}", data, "shard", random.Random(0), ["en"], 30.0, counters,
                             prompts)
        encode_text(tok, sample, end_id)
        samples.append(sample)
    batch = collate(samples, WhisperFeatureExtractor(feature_size=80), counters,
                    layout=model.layout_spec(packed=False))  # rows in batch order
    assert batch is not None and len(batch) == 3 and not counters
    targets, ends = batch.layout.targets.tolist(), torch.tensor([len(t) for t in batch.target_ids]).cumsum(0)
    for i, sample in enumerate(samples):
        scored = targets[int(ends[i]) - len(batch.target_ids[i]):int(ends[i])]
        assert scored == tok(sample.target, add_special_tokens=False)["input_ids"] + [end_id]
        assert tok.decode(scored) == sample.target + family.end
        assert tok.decode(batch.prompt_ids[i].tolist()) == sample.prompt
        user = sample.prompt[len(prompts.before):-len(prompts.after)]
        dialogue = tok.apply_chat_template(user_turn(user) + [{"role": "assistant", "content": sample.target}],
                                           tokenize=False)
        assert dialogue.startswith(sample.prompt + sample.target + family.end), dialogue
    assert [s.target for s in samples] == ["Guten Tag", "Good day", "Good day"]
    assert samples[0].prompt == family.asr_prompt
    out = model(batch)
    assert int(out["tokens"]) == sum(len(s.target_ids) for s in samples) and torch.isfinite(out["loss"])


# ---------------------------------------------------------------- generation


def speech_batch(tok, prompts: PromptFormat):
    from transformers import WhisperFeatureExtractor

    end_id = tok.convert_tokens_to_ids(prompts.end_token)
    record = {"transcript": "Hallo", "language": "de", "duration": 1.0, "translations": {"en": "Hello"}}
    samples = []
    for task, seconds in (("asr", 1.0), ("s2tt", 0.6)):
        sample = make_sample(task, "de", task, members(record, seconds), "shard", random.Random(0), ["en"], 30.0,
                             Counter(), prompts)
        encode_text(tok, sample, end_id)
        samples.append(sample)
    return collate(samples, WhisperFeatureExtractor(feature_size=80), Counter())


def boost(model, boosts: dict[int, float]):
    """A forward hook on the LM head adding `boosts` to those ids' logits (remove the returned handle)."""
    def hook(module, args, output):
        output = output.clone()
        for token_id, value in boosts.items():
            output[..., token_id] += value
        return output

    return model.llm.get_output_embeddings().register_forward_hook(hook)


def test_generation_stops_on_the_templates_end_token(family_model):
    family, model, tok, _ = family_model
    end = tok.convert_tokens_to_ids(family.end)
    assert model.end_token_id == end
    batch = speech_batch(tok, model.prompt_format)
    handle = boost(model, {end: 2000.0, tok.convert_tokens_to_ids(family.header): 1000.0})
    try:
        assert model.generate(batch, max_new_tokens=5) == [[], []]
        assert model.generate(batch, max_new_tokens=5, num_beams=2) == [[], []]
    finally:
        handle.remove()


def test_generation_never_emits_the_other_special_tokens(family_model):
    family, model, tok, _ = family_model
    suppressed = set(model.suppressed_token_ids)
    header = tok.convert_tokens_to_ids(family.header)
    assert model.end_token_id == tok.convert_tokens_to_ids(family.end) and model.end_token_id not in suppressed
    named = [AUDIO_TOKEN, family.header, *family.extra, *family.special.values()]
    assert {tok.convert_tokens_to_ids(t) for t in named} - {model.end_token_id} <= suppressed
    assert not suppressed & set(tok("Guten Tag, hello", add_special_tokens=False)["input_ids"])
    batch = speech_batch(tok, model.prompt_format)
    boosts = {i: 500.0 for i in suppressed}
    boosts[header] = 1000.0
    boosts[tok.convert_tokens_to_ids("a")] = 100.0  # an ordinary token: decoding goes on, not to the end token
    handle = boost(model, boosts)
    try:
        kept, model.suppressed_token_ids = model.suppressed_token_ids, []
        try:  # control: without suppression the biased head emits the template's header token
            assert all(ids[0] == header for ids in model.generate(batch, max_new_tokens=2))
        finally:
            model.suppressed_token_ids = kept
        for beams in (1, 2):
            for ids in model.generate(batch, max_new_tokens=4, num_beams=beams):
                assert len(ids) == 4 and not set(ids) & suppressed, ids
    finally:
        handle.remove()


def test_saved_model_keeps_the_template(family_model, tmp_path):
    _, model, tok, _ = family_model
    model.save_pretrained(tmp_path / "saved", tok)
    loaded, tok2 = SpeechLLM.from_pretrained(tmp_path / "saved")
    assert loaded.prompt_format == model.prompt_format
    assert (loaded.end_token_id, loaded.suppressed_token_ids) == (model.end_token_id, model.suppressed_token_ids)
    assert len(tok2) == len(tok)


# ---------------------------------------------------------------- tokenizers without a (usable) template


def test_without_a_chat_template_prompts_are_todays_chatml(tmp_path):
    byte_tokenizer({"eos_token": "</s>"}, (), None).save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    prompts = PromptFormat.from_tokenizer(tok)
    assert prompts == CHATML and not prompts.from_template
    assert prompts.prompt("asr", "de") == (
        "<|im_start|>user\n<|audio|>\nTranscribe the German audio.<|im_end|>\n<|im_start|>assistant\n")
    assert prompts.prompt("s2tt", "de", "en") == ("<|im_start|>user\n<|audio|>\nTranslate the German audio into "
                                                  "English.<|im_end|>\n<|im_start|>assistant\n")
    assert prompts.prompt("mt", "de", "en", "Hallo") == (
        "<|im_start|>user\nTranslate this German text into English:\nHallo<|im_end|>\n<|im_start|>assistant\n")
    assert prompts.prompt("text", "en", text="Once upon") == (
        "<|im_start|>user\nContinue this English text:\nOnce upon<|im_end|>\n<|im_start|>assistant\n")
    assert instruction("asr", "de") == prompts.prompt("asr", "de")
    assert prompts.end_token == TURN_END
    for token in (AUDIO_TOKEN, TURN_START, TURN_END):  # added, as before
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1
    assert PromptFormat.from_tokenizer(tok, system="Be brief.").before == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_a_template_without_an_end_token_falls_back_to_im_end(tmp_path):
    plain = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    byte_tokenizer({"eos_token": "</s>"}, (), plain).save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    prompts = PromptFormat.from_tokenizer(tok)
    assert prompts.prompt("asr", "de") == "user: <|audio|>\nTranscribe the German audio.\nassistant: "
    assert prompts.end_token == TURN_END and prompts.markers == (TURN_END,)
    assert TURN_END in tok.get_vocab() and TURN_START not in tok.get_vocab()  # only the end token is added


def test_a_template_that_rewrites_the_message_is_refused():
    tok = byte_tokenizer({"eos_token": "</s>"}, ("<eot>",),
                         "{% for m in messages %}{{ m['content'] | upper + '<eot>' }}{% endfor %}")
    with pytest.raises(ValueError, match="changes the user's message"):
        PromptFormat.from_tokenizer(tok)
