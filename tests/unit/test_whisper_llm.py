"""part.model.whisper_llm: Whisper's decoder minus its cross-attention as an OPTForCausalLM, on a small random
Whisper (the mapping is the same for every size). The converted LLM's logits must equal Whisper's own decoder
forward with the cross-attention block contributing nothing (or a constant vector per layer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import WhisperConfig, WhisperModel

from part.model.whisper_llm import whisper_decoder_reference, whisper_decoder_to_opt

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
