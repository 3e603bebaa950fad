"""Builds the tiny default: a sentencepiece tokenizer trained on the corpus text, and a few-million-parameter
Whisper-style encoder and Qwen2-style LLM saved with `save_pretrained`. Training then loads them with
`from_pretrained`, the same path as a local copy of openai/whisper-small and Qwen/Qwen2.5-1.5B.
The command line is `python -m part tiny` (part/cli/tiny.py).
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch

from part.model.tokenizer import load_tokenizer
from part.prompts import AUDIO_TOKEN, CHATML, TURN_END, TURN_START, PromptFormat

IGNORE = -100  # the label of positions without loss (transformers' ignore index)


def train_tokenizer(text_file: Path, out_dir: Path, vocab_size: int = 4000):
    """A BPE sentencepiece model with byte fallback (any script round-trips), wrapped as a HF tokenizer."""
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "spm")
        spm.SentencePieceTrainer.train(
            input=str(text_file), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
            character_coverage=0.995, byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            user_defined_symbols=[AUDIO_TOKEN, TURN_START, TURN_END], input_sentence_size=200000,
            shuffle_input_sentence=True, minloglevel=2, num_threads=2,
        )
        spm_dir = Path(tmp) / "hf"
        spm_dir.mkdir()
        (spm_dir / "tokenizer.model").write_bytes(Path(prefix + ".model").read_bytes())
        tokenizer = LlamaTokenizer.from_pretrained(str(spm_dir), add_bos_token=False, add_eos_token=False, legacy=False)
    tokenizer.pad_token = "<pad>"
    tokenizer.save_pretrained(out_dir)
    return tokenizer


@dataclass
class TextExample:
    """One pretraining sequence: the chat-formatted prompt, a `slot` (text standing where speech will stand),
    the rest of the prompt and the target. The loss covers the prompt and target of text tasks, and only the
    target of slot tasks, as training on speech will."""

    before: str
    after: str
    target: str
    slot: str = ""
    slot_task: bool = False


def text_examples(corpus: Path, translation_targets: tuple[str, ...] = ("en",), seed: int = 0,
                  languages: tuple[str, ...] | None = None, slot_repeats: int = 1,
                  prompts: PromptFormat = CHATML) -> list[TextExample]:
    """Text-only examples from the corpus' training side (never eval/), chat-formatted as training will see them:
    continuation of every transcript and its translation into `translation_targets` (the `text` and `mt` tasks),
    and the
    speech prompts (`asr`, `s2tt`) with the transcript's own text in the audio slot. The last kind stands in for
    what a pretrained LLM brings and a tiny one lacks: reading what its prompt holds and writing it out again or
    in another language. The slot text is what the adapter will have to imitate. `languages` keeps only those
    records; `slot_repeats` > 1 repeats every slot example, for an LLM whose main lesson is reading the slot.
    `prompts` is the LLM's prompt format (ChatML, as the tokenizers built here have no chat template)."""
    import json
    import random
    from collections import Counter

    from part.data.shards import iter_tar_samples
    from part.prompts import split_for_text_task

    examples = []
    counters: Counter = Counter()
    for split in ("train", "text"):
        for shard in sorted((corpus / split).glob("*.tar")):
            for _, members in iter_tar_samples(str(shard), counters):
                record = json.loads(members["json"])
                lang, text = record["language"], record["transcript"]
                if languages is not None and lang not in languages:
                    continue
                translations = record.get("translations", {})
                head, tail = split_for_text_task(text)
                end = prompts.end_token
                examples.append(TextExample(prompts.prompt("text", lang, text=head), "", tail + end))
                for target in translation_targets:  # the directions training will ask for, not all 56
                    if target != lang and translations.get(target):
                        examples.append(TextExample(prompts.prompt("mt", lang, target, text), "",
                                                    translations[target] + end))
                before, after = prompts.prompt("asr", lang).split(AUDIO_TOKEN)
                examples += [TextExample(before, after, text + end, slot=text, slot_task=True)] * slot_repeats
                for target in translation_targets:
                    if target != lang and translations.get(target):
                        before, after = prompts.prompt("s2tt", lang, target).split(AUDIO_TOKEN)
                        examples += [TextExample(before, after, translations[target] + end, slot=text,
                                                 slot_task=True)] * slot_repeats
    random.Random(seed).shuffle(examples)
    return examples


def ctc_like(ids: list[int], blank: int, rng) -> list[int]:
    """The slot as a CTC-trained adapter will present it: each token once (sometimes twice), followed by 0-3
    blanks, about 2.5 frames per token as at 12.5 adapter frames per second of speech."""
    out: list[int] = []
    for t in ids:
        out += [t] * (2 if rng.random() < 0.15 else 1)
        out += [blank] * rng.choice((0, 1, 1, 2, 2, 3))
    return out


def encode_example(tokenizer, example: TextExample, max_length: int, rng=None,
                   slot_noise: float = 0.0) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE where no loss) of one example, truncated to `max_length`. The prompt is
    tokenized whole with the audio placeholder, as training tokenizes it, and the slot's ids replace the
    placeholder. With probability `slot_noise` the slot is written CTC-style (`ctc_like`, pad as the blank)."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    target = ids(example.target)
    if not example.slot_task:
        prompt = ids(example.before + example.after)
        tokens = prompt + target
        return tokens[:max_length], tokens[:max_length]  # two slices: two lists
    prompt = ids(example.before + AUDIO_TOKEN + example.after)
    slot = ids(example.slot)
    if rng is not None and rng.random() < slot_noise:
        slot = ctc_like(slot, tokenizer.pad_token_id, rng)
    at = prompt.index(tokenizer.convert_tokens_to_ids(AUDIO_TOKEN))
    prompt = prompt[:at] + slot + prompt[at + 1 :]
    tokens = prompt + target
    labels = [IGNORE] * len(prompt) + target
    return tokens[:max_length], labels[:max_length]


def pretrain_llm(llm, tokenizer, examples: list[TextExample], steps: int, batch_tokens: int = 2048,
                 lr: float = 3e-3, max_length: int = 160, log_every: int = 50, slot_noise: float = 0.5,
                 freeze_embeddings: bool = False, log_prefix: str = "[tiny] LLM pretraining") -> list[float]:
    """Stands in for the LLM's pretraining: next-token training on the text examples, a few CPU minutes.
    Batches hold about `batch_tokens` padded tokens (examples of similar length together). Returns the loss per
    step. The output head runs only where a label is (over a large vocabulary it would dominate the step);
    `freeze_embeddings` keeps the (tied) token embeddings as they are, for fine-tuning a pretrained LLM."""
    import random
    import time

    rng = random.Random(0)
    encoded = [encode_example(tokenizer, ex, max_length, rng, slot_noise) for ex in examples]
    # An example cut before its target has nothing to learn from (and a batch of them no loss at all).
    encoded = [(t, lab) for t, lab in encoded if any(x != IGNORE for x in lab[1:])]
    # Length-sorted chunks, shuffled: little padding, and every batch still mixes tasks and languages.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    batches, current, longest = [], [], 0
    for i in order:
        longest_next = max(longest, len(encoded[i][0]))
        if current and longest_next * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, longest_next = [], len(encoded[i][0])
        current.append(i)
        longest = longest_next
    if current:
        batches.append(current)
    random.Random(0).shuffle(batches)

    pad = tokenizer.pad_token_id
    torch.set_flush_denormal(True)  # on CPU, denormal activations late in training make steps ~10x slower
    embeddings = llm.get_input_embeddings().weight
    if freeze_embeddings:
        embeddings.requires_grad_(False)
    params = [p for p in llm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    losses, start = [], time.time()
    llm.train()
    for step in range(steps):
        rows = [encoded[i] for i in batches[step % len(batches)]]
        width = max(len(t) for t, _ in rows)
        input_ids = torch.tensor([t + [pad] * (width - len(t)) for t, _ in rows])
        labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in rows])
        mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t, _ in rows])
        hidden = llm.get_decoder()(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        scored = targets != IGNORE
        logits = llm.get_output_embeddings()(hidden[:, :-1][scored])
        loss = torch.nn.functional.cross_entropy(logits.float(), targets[scored])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            recent = losses[-log_every:]
            elapsed = time.time() - start
            print(f"{log_prefix} step {step + 1}/{steps} loss {sum(recent) / len(recent):.3f} "
                  f"({elapsed:.0f}s, eta {elapsed / (step + 1) * (steps - step - 1):.0f}s)",
                  file=sys.stderr, flush=True)
    llm.eval()
    embeddings.requires_grad_(True)
    return losses


LLM_FAMILIES = ("qwen2", "gemma3")


def tiny_llm(family: str, vocab_size: int, hidden: int, layers: int, heads: int, **token_ids):
    """A randomly initialised causal LM of `family`'s architecture (LLM_FAMILIES) at the given size."""
    shape = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                 num_hidden_layers=layers, num_attention_heads=heads,
                 num_key_value_heads=2 if heads % 2 == 0 else 1, max_position_embeddings=1024,
                 tie_word_embeddings=True, **token_ids)
    if family == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2ForCausalLM(Qwen2Config(**shape))
    if family == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        # Gemma 3's layer pattern at this depth: sliding-window layers with a global one last; a window shorter
        # than the tests' sequences, so that the sliding layers really cut.
        pattern = ["sliding_attention"] * (layers - 1) + ["full_attention"]
        return Gemma3ForCausalLM(Gemma3TextConfig(**shape, head_dim=hidden // heads, sliding_window=64,
                                                  layer_types=pattern, query_pre_attn_scalar=hidden // heads))
    raise ValueError(f"unknown tiny LLM family {family!r} (one of {LLM_FAMILIES})")


def build_tiny(text_file: Path, out_dir: Path, vocab_size: int = 4000, seed: int = 0, corpus: Path | None = None,
               pretrain_steps: int = 0, llm_hidden: int = 192, llm_layers: int = 4, llm_heads: int = 6,
               pretrain_lr: float = 3e-3, pretrain_batch_tokens: int = 2048,
               llm_family: str = "qwen2") -> tuple[Path, Path]:
    """Writes `<out>/whisper` and `<out>/llm` (with its tokenizer); returns both paths. With `corpus` and
    `pretrain_steps`, the LLM is first trained on the corpus' text tasks, as a real LLM would come pretrained.
    `llm_family`: "qwen2" (Qwen2.5's architecture) or "gemma3" (Gemma 3's, the demo's LLM: embeddings scaled by
    the square root of the width, the head tied to them, sliding-window and global attention layers)."""
    from transformers import WhisperConfig, WhisperModel

    torch.manual_seed(seed)
    whisper_dir, llm_dir = out_dir / "whisper", out_dir / "llm"
    train_tokenizer(text_file, llm_dir, vocab_size)
    tokenizer = load_tokenizer(str(llm_dir))  # as training will load it
    whisper = WhisperModel(WhisperConfig(
        d_model=128, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=512, decoder_layers=1,
        decoder_attention_heads=4, decoder_ffn_dim=256, num_mel_bins=80, max_source_positions=1500,
        max_target_positions=64, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, dropout=0.0,
    ))
    whisper.save_pretrained(whisper_dir)
    llm = tiny_llm(llm_family, len(tokenizer), llm_hidden, llm_layers, llm_heads, pad_token_id=tokenizer.pad_token_id,
                   eos_token_id=tokenizer.convert_tokens_to_ids(TURN_END), bos_token_id=tokenizer.bos_token_id)
    if corpus is not None and pretrain_steps > 0:
        pretrain_llm(llm, tokenizer, text_examples(corpus, seed=seed), pretrain_steps,
                     batch_tokens=pretrain_batch_tokens, lr=pretrain_lr)
    llm.save_pretrained(llm_dir)
    return whisper_dir, llm_dir
