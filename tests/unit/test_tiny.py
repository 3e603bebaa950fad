"""The tiny stand-in LLM's pretraining data: text tasks and the speech prompts with the text in the audio slot."""

from __future__ import annotations

import random

import torch

from part.convert.tiny import IGNORE, ctc_like, encode_example, pretrain_llm, text_examples
from part.model.tokenizer import load_tokenizer
from part.prompts import AUDIO_TOKEN, TURN_END, instruction


def test_examples_cover_the_tasks_from_the_training_side_only(corpus):
    examples = text_examples(corpus)
    slot = [e for e in examples if e.slot_task]
    text = [e for e in examples if not e.slot_task]
    assert slot and text
    assert {e.after.split("\n")[1].split(" ")[0] for e in slot} == {"Transcribe", "Translate"}
    assert all(e.target.endswith(TURN_END) for e in examples)
    # ASR-in-the-slot targets are the slot text itself; S2TT ones go into English only.
    assert all(e.target == e.slot + TURN_END for e in slot if "Transcribe" in e.after)
    assert all(e.after.rstrip().endswith("into English.<|im_end|>\n<|im_start|>assistant") for e in slot
               if "Translate" in e.after)
    import json
    import tarfile

    held_out = set()
    for shard in (corpus / "eval").glob("*.tar"):
        with tarfile.open(shard) as tar:
            held_out |= {json.loads(tar.extractfile(m).read())["transcript"] for m in tar if m.name.endswith(".json")}
    assert not held_out & {e.slot for e in slot}  # FLORES devtest never reaches the LLM


def test_slot_example_matches_training_tokenization(tiny_models):
    tok = load_tokenizer(str(tiny_models / "llm"))
    before, after = instruction("asr", "de").split(AUDIO_TOKEN)
    from part.convert.tiny import TextExample

    ex = TextExample(before, after, "Guten Tag" + TURN_END, slot="Guten Tag", slot_task=True)
    ids, labels = encode_example(tok, ex, max_length=200)
    prompt = tok(instruction("asr", "de"), add_special_tokens=False)["input_ids"]  # as part.data tokenizes it
    slot = tok("Guten Tag", add_special_tokens=False)["input_ids"]
    at = prompt.index(tok.convert_tokens_to_ids(AUDIO_TOKEN))
    assert ids[: len(prompt) - 1 + len(slot)] == prompt[:at] + slot + prompt[at + 1 :]
    target = tok("Guten Tag" + TURN_END, add_special_tokens=False)["input_ids"]
    assert labels == [IGNORE] * (len(ids) - len(target)) + target  # loss on the target only

    text = TextExample(instruction("mt", "de", "en", "Hallo"), "", "Hello" + TURN_END)
    ids, labels = encode_example(tok, text, max_length=200)
    assert labels == ids  # text tasks: plain language modelling


def test_ctc_like_keeps_the_order_and_adds_only_repeats_and_blanks():
    rng = random.Random(0)
    ids = list(range(10, 40))
    noisy = ctc_like(ids, blank=0, rng=rng)
    collapsed = [t for i, t in enumerate(noisy) if t != 0 and (i == 0 or t != noisy[i - 1])]
    assert collapsed == ids
    assert 1.5 * len(ids) < len(noisy) < 4 * len(ids)


def test_pretraining_lowers_the_loss(corpus, tiny_models):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(tiny_models / "llm"))
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_pretrained(str(tiny_models / "llm"))
    examples = text_examples(corpus)[:64]
    losses = pretrain_llm(llm, tok, examples, steps=30, batch_tokens=1024, lr=3e-3, log_every=100)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
