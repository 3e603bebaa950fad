"""An LLM whose embedding module scales its output (Gemma multiplies by the square root of its width) and whose
head is tied to the unscaled rows: the adapter starts at the scale the LLM reads, the frame objectives score with
the head's own rows (through the embedding module, not the whole head), and the readout mixes what the LLM reads."""

import math

import pytest
import torch
from torch import nn

from part.config import AdapterConfig, AlignmentConfig, CtcConfig, EncoderConfig, LLMConfig, LoraConfig, ModelConfig
from part.embeddings import embedding_rows, embedding_scale
from part.model.speech_llm import SpeechLLM
from part.model.tokenizer import load_tokenizer
from part.objectives.frame_vocabulary import write_frame_vocabulary
from part.objectives.frames import FrameAlignment


@pytest.fixture(scope="module")
def gemma(tiny_gemma_models):
    cfg = ModelConfig(encoder=EncoderConfig(pretrained=str(tiny_gemma_models / "whisper")),
                      adapter=AdapterConfig(hidden=64, layers=1, heads=4, init_from_embeddings=True),
                      llm=LLMConfig(pretrained=str(tiny_gemma_models / "llm"), lora=LoraConfig(rank=4, alpha=8)))
    tok = load_tokenizer(str(tiny_gemma_models / "llm"))
    torch.manual_seed(0)
    return SpeechLLM(cfg, tok).eval(), tok


def test_the_scale_is_read_from_the_module_s_output(gemma):
    model, _ = gemma
    width = model.base_llm.config.hidden_size
    assert embedding_scale(model.llm.get_input_embeddings()) == pytest.approx(math.sqrt(width), rel=1e-5)
    assert embedding_scale(nn.Embedding(10, 4)) == pytest.approx(1.0)
    with torch.device("meta"):
        assert embedding_scale(nn.Embedding(10, 4)) == 1.0


def test_the_adapter_starts_at_the_scale_the_llm_reads(gemma):
    model, tok = gemma
    embeddings = model.llm.get_input_embeddings()
    rows = embedding_rows(embeddings, len(tok), chunk=100)  # several chunks
    assert torch.allclose(rows, embeddings.weight[: len(tok)] * embedding_scale(embeddings))
    # init_from_embeddings: the projection's bias is the mean of the rows the LLM reads (scaled), not of `.weight`
    assert torch.allclose(model.adapter.proj.bias, rows.mean(0), atol=1e-5)
    assert not torch.allclose(model.adapter.proj.bias, embeddings.weight[: len(tok)].mean(0), atol=1e-3)


def test_frame_logits_are_the_tied_head_s_own_scores_over_the_classes(gemma, tmp_path):
    model, tok = gemma
    ids = sorted({model.pad_token_id, *tok("Guten Tag hello world", add_special_tokens=False)["input_ids"]})
    write_frame_vocabulary(tmp_path / "vocabulary.json", ids)
    objective = FrameAlignment(AlignmentConfig(vocabulary=str(tmp_path / "vocabulary.json"), ctc=CtcConfig()),
                               model.cfg, model, tok)
    assert objective.rows_from_embeddings  # the embedding module's rows, not the whole head cut afterwards
    frames = torch.randn(2, 7, model.base_llm.config.hidden_size)
    with torch.no_grad():
        got = objective.logits(model, frames)
        full = model.base_llm.get_output_embeddings()(model.llm_final_norm(frames))[..., ids]
    assert got.shape == (2, 7, len(ids))
    assert torch.allclose(got, full, atol=1e-4)
