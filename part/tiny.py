"""Builds the tiny default: a sentencepiece tokenizer trained on the corpus text, and a few-million-parameter
Whisper-style encoder and Qwen2-style LLM saved with `save_pretrained`. Training then loads them with
`from_pretrained`, the same path as a local copy of openai/whisper-small and Qwen/Qwen2.5-1.5B.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch

from part.model import load_tokenizer
from part.prompts import AUDIO_TOKEN, TURN_END, TURN_START


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


def text_examples(corpus: Path, seed: int = 0) -> list[str]:
    """Chat-formatted text-only examples from the corpus' training side (never eval/): continuation of every
    transcript, and translation of every aligned pair (FLORES dev and Tatoeba). No audio prompts."""
    import json
    import random
    from collections import Counter

    from part.data import iter_tar_samples
    from part.prompts import instruction, split_for_text_task

    examples = []
    counters: Counter = Counter()
    for split in ("train", "text"):
        for shard in sorted((corpus / split).glob("*.tar")):
            for _, members in iter_tar_samples(str(shard), counters):
                record = json.loads(members["json"])
                lang, text = record["language"], record["transcript"]
                head, tail = split_for_text_task(text)
                examples.append(instruction("text", lang, text=head) + tail + TURN_END)
                for target, translation in record.get("translations", {}).items():
                    examples.append(instruction("mt", lang, target, text) + translation + TURN_END)
    random.Random(seed).shuffle(examples)
    return examples


def pretrain_llm(llm, tokenizer, examples: list[str], steps: int, batch_size: int = 16, lr: float = 3e-3,
                 log_every: int = 50) -> list[float]:
    """Stands in for the LLM's pretraining: plain next-token training on text tasks, a few CPU minutes.
    Returns the loss per step."""
    import time

    opt = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    losses, start = [], time.time()
    llm.train()
    for step in range(steps):
        batch = [examples[(step * batch_size + i) % len(examples)] for i in range(batch_size)]
        enc = tokenizer(batch, add_special_tokens=False, padding=True, truncation=True, max_length=128,
                        return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = llm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            recent = losses[-log_every:]
            print(f"[tiny] LLM pretraining step {step + 1}/{steps} loss {sum(recent) / len(recent):.3f} "
                  f"({time.time() - start:.0f}s)", file=sys.stderr, flush=True)
    llm.eval()
    return losses


def build_tiny(text_file: Path, out_dir: Path, vocab_size: int = 4000, seed: int = 0, corpus: Path | None = None,
               pretrain_steps: int = 0) -> tuple[Path, Path]:
    """Writes `<out>/whisper` and `<out>/llm` (with its tokenizer); returns both paths. With `corpus` and
    `pretrain_steps`, the LLM is first trained on the corpus' text tasks, as a real LLM would come pretrained."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig, WhisperModel

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
    llm = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.convert_tokens_to_ids(TURN_END),
        bos_token_id=tokenizer.bos_token_id,
    ))
    if corpus is not None and pretrain_steps > 0:
        pretrain_llm(llm, tokenizer, text_examples(corpus, seed), pretrain_steps)
    llm.save_pretrained(llm_dir)
    return whisper_dir, llm_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--text", type=Path, required=True, help="text file to train the tokenizer on")
    parser.add_argument("--out", type=Path, required=True, help="output directory (gets whisper/ and llm/)")
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--corpus", type=Path, help="corpus directory (train/, text/) for the LLM's pretraining")
    parser.add_argument("--pretrain-steps", type=int, default=0, help="LLM pretraining steps on text tasks")
    args = parser.parse_args(argv)
    whisper_dir, llm_dir = build_tiny(args.text, args.out, args.vocab_size, corpus=args.corpus,
                                      pretrain_steps=args.pretrain_steps)
    print(f"tiny encoder: {whisper_dir}\ntiny LLM + tokenizer: {llm_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
