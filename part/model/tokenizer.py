"""The LLM's tokenizer, with the prompt's special tokens (defined in part.prompts only) added where missing."""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from part.prompts import AUDIO_TOKEN, PromptFormat

ROUND_TRIP_PROBE = "Grüße aus München, hello world. 你好世界"


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The LLM's tokenizer, with the audio placeholder and the prompt format's markers added where missing: none
    of the latter for a tokenizer with a chat template (its own turn markers are in its vocabulary), ChatML's
    `<|im_start|>`/`<|im_end|>` for one without (`PromptFormat.from_tokenizer`).

    AutoTokenizer may pick a class from the model type rather than from the saved tokenizer (transformers 5 maps
    qwen2 to a byte-level tokenizer even for a sentencepiece vocabulary), which silently mangles text; so the
    tokenizer must round-trip a multilingual probe, else the saved tokenizer.json is loaded as it is.
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer = AutoTokenizer.from_pretrained(path)
    if not _round_trips(tokenizer):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        if not _round_trips(tokenizer):
            raise ValueError(f"tokenizer in {path} does not round-trip text ({ROUND_TRIP_PROBE!r})")
    vocab = tokenizer.get_vocab()
    missing = [t for t in (AUDIO_TOKEN, *PromptFormat.from_tokenizer(tokenizer).markers) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _round_trips(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer(ROUND_TRIP_PROBE, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=True).strip() == ROUND_TRIP_PROBE


def suppressed_token_ids(tokenizer: PreTrainedTokenizerBase, prompts: PromptFormat) -> list[int]:
    """Ids generation must never emit: every special token (named, extra and added special ones), the audio
    placeholder and the prompt format's markers, except its end token, the stop token. Sorted.

    The placeholder and the markers are listed by name because a tokenizer may have them as ordinary vocabulary
    entries (the tiny sentencepiece model defines ChatML's as user symbols, not special tokens), and emitting one
    corrupts the hypothesis: decoding with skip_special_tokens would drop some and keep others.
    """
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    ids |= {tokenizer.convert_tokens_to_ids(t) for t in (AUDIO_TOKEN, *prompts.markers)}
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        ids.add(getattr(tokenizer, name, None))
    ids.discard(None)
    ids.discard(tokenizer.convert_tokens_to_ids(prompts.end_token))
    return sorted(int(i) for i in ids)
