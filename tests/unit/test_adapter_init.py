"""The adapter's output projection starts at the LLM's token-embedding statistics (model.adapter.init_from_embeddings):
a frozen LLM first reads the audio frames as ordinary tokens, not as vectors ~20x larger than any token."""

from __future__ import annotations

import torch

from part.config import AdapterConfig
from part.model.adapter import Adapter


def _embeddings(vocab: int = 500, dim: int = 48) -> torch.Tensor:
    torch.manual_seed(0)
    shared = torch.randn(dim) * 0.1  # token embeddings share a large common direction, as real LLMs' do
    return shared + 0.02 * torch.randn(vocab, dim)


def test_outputs_match_the_embeddings_mean_and_spread():
    emb = _embeddings()
    adapter = Adapter(AdapterConfig(hidden=32, layers=1, heads=4), in_dim=24, out_dim=48)
    x, lengths = torch.randn(3, 40, 24), torch.tensor([40, 33, 12])
    before, _ = adapter(x, lengths)
    spread = (emb - emb.mean(0)).norm(dim=1).mean()
    assert before.norm(dim=-1).mean() > 3 * emb.norm(dim=1).mean()  # PyTorch's default: far off the embeddings

    adapter.init_from_embeddings(emb)
    out, out_lengths = adapter(x, lengths)
    assert out_lengths.tolist() == [10, 9, 3]
    frames = torch.cat([out[i, :n] for i, n in enumerate(out_lengths.tolist())])
    assert torch.allclose(frames.mean(0), emb.mean(0), atol=0.5 * spread / 48**0.5 * 4)
    assert 0.7 < ((frames - emb.mean(0)).norm(dim=1).mean() / spread).item() < 1.3
    # Frames still differ from each other (the audio's content passes through), at the embeddings' scale.
    assert (frames - frames.mean(0)).norm(dim=1).mean() > 0.5 * spread


def test_speech_llm_applies_it_only_to_a_fresh_adapter(tiny_models, tmp_path):
    from part.config import EncoderConfig, LLMConfig, ModelConfig
    from part.model.speech_llm import SpeechLLM
    from part.model.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tiny_models / "llm"))
    cfg = ModelConfig(encoder=EncoderConfig(pretrained=str(tiny_models / "whisper")),
                      adapter=AdapterConfig(hidden=32, layers=1, heads=4),
                      llm=LLMConfig(pretrained=str(tiny_models / "llm")))
    torch.manual_seed(0)
    model = SpeechLLM(cfg, tok)
    emb = model.llm.get_input_embeddings().weight.detach()[: len(tok)]
    assert torch.allclose(model.adapter.proj.bias.detach(), emb.mean(0), atol=1e-6)

    cfg_off = ModelConfig(encoder=cfg.encoder, adapter=AdapterConfig(hidden=32, layers=1, heads=4,
                                                                     init_from_embeddings=False), llm=cfg.llm)
    torch.manual_seed(0)
    default = SpeechLLM(cfg_off, tok)
    assert not torch.allclose(default.adapter.proj.bias.detach(), emb.mean(0), atol=1e-3)

    # A saved model loads its trained projection unchanged (the init does not run over loaded weights).
    with torch.no_grad():
        model.adapter.proj.bias.add_(1.0)
    model.save_pretrained(tmp_path / "m", tok)
    loaded, _ = SpeechLLM.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.adapter.proj.bias, model.adapter.proj.bias.detach())
