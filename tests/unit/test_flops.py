"""The written-out FLOP count (part/model/flops.py) against torch's FlopCounterMode on the tiny model: forward
and backward, for every kind of stage (what trains decides which backward products run)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_model import make_batch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from part.config import AdapterConfig, AlignmentConfig, CtcConfig, EncoderConfig, LLMConfig, LoraConfig, ModelConfig
from part.model.flops import batch_flops
from part.model.groups import set_trainable
from part.model.speech_llm import SpeechLLM
from part.model.tokenizer import load_tokenizer

STAGES = [["adapter"], ["adapter", "encoder.top.1"], ["adapter", "encoder"], ["adapter", "llm.lora"], ["llm.lora"],
          ["adapter", "llm"]]


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the GPU attention kernels; the CPU's fused one (what sdpa runs here) is registered with the
# same formulas, or the reference would leave attention out.
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}


def _opt_llm(tiny_models, out) -> str:
    """A tiny random OPT (the Whisper-decoder stand-in's architecture: two-product GELU feed-forward, out_proj) with
    the tiny tokenizer."""
    from transformers import OPTConfig, OPTForCausalLM

    tok = load_tokenizer(str(tiny_models / "llm"))
    torch.manual_seed(0)
    # the tiny Qwen2's width and depth, so the encoder's share of the count is the same in both cases
    OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=192, word_embed_proj_dim=192, num_hidden_layers=4,
                             num_attention_heads=6, ffn_dim=768, max_position_embeddings=512,
                             do_layer_norm_before=True, pad_token_id=tok.pad_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module", params=["qwen2", "opt"])
def model_and_batch(tiny_models, tmp_path_factory, request):
    if request.param == "qwen2":
        llm = LLMConfig(pretrained=str(tiny_models / "llm"), lora=LoraConfig(rank=4, alpha=8))
    else:
        llm = LLMConfig(pretrained=_opt_llm(tiny_models, tmp_path_factory.mktemp("opt")),
                        lora=LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "out_proj", "fc1"]))
    cfg = ModelConfig(encoder=EncoderConfig(pretrained=str(tiny_models / "whisper")),
                      adapter=AdapterConfig(hidden=64, layers=2, heads=4), llm=llm,
                      alignment=AlignmentConfig(ctc=CtcConfig(weight=0.5)))
    tok = load_tokenizer(llm.pretrained)
    torch.manual_seed(0)
    model = SpeechLLM(cfg, tok).train()
    batch = make_batch(tok, frames=(600, 420, 300), text_only=True)
    batch = dataclasses.replace(batch, transcript_ids=[t[:-1] for t in batch.target_ids])
    return model, batch


@pytest.mark.parametrize("trainable", STAGES, ids=["+".join(s) for s in STAGES])
def test_count_matches_flop_counter(model_and_batch, trainable):
    model, batch = model_and_batch
    set_trainable(model, trainable)
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as forward_counter:
        loss = model(batch)["loss"]
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as backward_counter:
        loss.backward()
    counted = batch_flops(model, batch)
    forward = sum(c.forward for c in (counted.encoder, counted.adapter, counted.llm, counted.head))
    backward = counted.total - forward
    measured_fwd, measured_bwd = forward_counter.get_total_flops(), backward_counter.get_total_flops()
    assert forward == pytest.approx(measured_fwd, rel=0.10), (forward, measured_fwd)
    assert backward == pytest.approx(measured_bwd, rel=0.10), (backward, measured_bwd)
    if trainable == ["adapter"]:  # a frozen encoder below the adapter has no backward
        assert counted.encoder.backward == 0 and counted.llm.backward > 0
