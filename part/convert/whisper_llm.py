"""Whisper's pretrained text decoder as a decoder-only LLM (cross-attention dropped).

A Whisper decoder layer is a pre-LayerNorm transformer block with self-attention, cross-attention to the audio and
a GELU feed-forward; its embeddings are learned (tokens and up to `max_target_positions` positions) and the output
head is tied to the token embeddings. Without the cross-attention block that is exactly an OPT decoder
(`OPTForCausalLM` with `do_layer_norm_before`, GELU, biases, learned positions, tied head), and OPT even keeps
Whisper's module names (q_proj/k_proj/v_proj/out_proj, fc1/fc2, self_attn_layer_norm/final_layer_norm), so the
project's LLM groups (`llm.layers.N`) and LoRA target modules apply unchanged. Mapping details:
  - Whisper's k_proj has no bias; OPT's gets a zero bias (a constant added to every key shifts each query's scores
    by the same amount, and is zero here anyway).
  - Both scale the queries by head_dim**-0.5 after q_proj; both LayerNorms use eps 1e-5; neither scales embeddings.
  - OPT's position table has an offset of 2 (rows 0 and 1 are never read): Whisper's 448 rows go to rows 2..449,
    and OPT numbers positions from the attention mask, so left-padded batches get the right positions.
The tokenizer is Whisper's multilingual byte-level BPE plus this project's prompt tokens (`<|audio|>`,
`<|im_start|>`, `<|im_end|>`); their embeddings start as copies of `<|endoftext|>` (for `<|im_end|>`, the token the
decoder already ends a text with) and `<|startoftranscript|>` (for `<|im_start|>` and `<|audio|>`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM, WhisperConfig

from part.prompts import AUDIO_TOKEN, TURN_END, TURN_START

OPT_POSITION_OFFSET = 2
_LAYER_MAP = {  # OPT name under model.decoder.layers.i -> Whisper name under model.decoder.layers.i
    "self_attn.q_proj": "self_attn.q_proj",
    "self_attn.k_proj": "self_attn.k_proj",
    "self_attn.v_proj": "self_attn.v_proj",
    "self_attn.out_proj": "self_attn.out_proj",
    "self_attn_layer_norm": "self_attn_layer_norm",
    "fc1": "fc1",
    "fc2": "fc2",
    "final_layer_norm": "final_layer_norm",
}


def _whisper_decoder_state(whisper_dir: Path) -> dict[str, torch.Tensor]:
    """The decoder's tensors, named as under WhisperDecoder (saved by WhisperForConditionalGeneration as
    `model.decoder.*`, by WhisperModel as `decoder.*`)."""
    state = load_file(str(whisper_dir / "model.safetensors"))
    for prefix in ("model.decoder.", "decoder."):
        out = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
        if out:
            return out
    raise ValueError(f"{whisper_dir / 'model.safetensors'} holds no Whisper decoder (no 'model.decoder.*' tensors)")


def opt_config_for(wcfg: WhisperConfig, vocab_size: int, pad_token_id: int, eos_token_id: int,
                   bos_token_id: int) -> OPTConfig:
    return OPTConfig(
        vocab_size=vocab_size, hidden_size=wcfg.d_model, word_embed_proj_dim=wcfg.d_model,
        num_hidden_layers=wcfg.decoder_layers, num_attention_heads=wcfg.decoder_attention_heads,
        ffn_dim=wcfg.decoder_ffn_dim, max_position_embeddings=wcfg.max_target_positions,
        activation_function=wcfg.activation_function, do_layer_norm_before=True, enable_bias=True,
        layer_norm_elementwise_affine=True, dropout=0.0, attention_dropout=0.0, layerdrop=0.0,
        tie_word_embeddings=True, pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
    )


def whisper_decoder_to_opt(whisper_dir: Path, vocab_size: int | None = None, pad_token_id: int | None = None,
                           eos_token_id: int | None = None, bos_token_id: int | None = None,
                           cross_attention_means: list[torch.Tensor] | None = None) -> OPTForCausalLM:
    """An OPTForCausalLM holding the Whisper decoder's weights minus its cross-attention (vocabulary as Whisper's
    unless `vocab_size` is larger: extra rows start as copies of the end-of-text embedding).

    `cross_attention_means` (one [d_model] vector per layer): the cross-attention block is replaced by this constant
    (its mean output over real audio) instead of nothing; it is added to the self-attention's output bias, which
    is the same thing since both blocks add to the residual stream one after the other."""
    whisper_dir = Path(whisper_dir)
    wcfg = WhisperConfig.from_pretrained(whisper_dir)
    src = _whisper_decoder_state(whisper_dir)
    n_vocab = src["embed_tokens.weight"].shape[0]
    vocab_size = vocab_size or n_vocab
    if vocab_size < n_vocab:
        raise ValueError(f"vocab_size {vocab_size} is smaller than Whisper's {n_vocab}")
    eot = wcfg.eos_token_id
    cfg = opt_config_for(wcfg, vocab_size, pad_token_id if pad_token_id is not None else wcfg.pad_token_id,
                         eos_token_id if eos_token_id is not None else eot,
                         bos_token_id if bos_token_id is not None else wcfg.bos_token_id)
    model = OPTForCausalLM(cfg).eval()
    d = wcfg.d_model
    emb = torch.cat([src["embed_tokens.weight"], src["embed_tokens.weight"][eot].expand(vocab_size - n_vocab, d)])
    pos = src["embed_positions.weight"]
    dst: dict[str, torch.Tensor] = {
        "model.decoder.embed_tokens.weight": emb,
        "model.decoder.embed_positions.weight": torch.cat([torch.zeros(OPT_POSITION_OFFSET, d), pos]),
        "model.decoder.final_layer_norm.weight": src["layer_norm.weight"],
        "model.decoder.final_layer_norm.bias": src["layer_norm.bias"],
    }
    for i in range(wcfg.decoder_layers):
        for opt_name, w_name in _LAYER_MAP.items():
            for kind in ("weight", "bias"):
                key = f"layers.{i}.{w_name}.{kind}"
                if key in src:
                    dst[f"model.decoder.layers.{i}.{opt_name}.{kind}"] = src[key]
                elif w_name == "self_attn.k_proj" and kind == "bias":
                    dst[f"model.decoder.layers.{i}.{opt_name}.{kind}"] = torch.zeros(d)
                else:
                    raise ValueError(f"Whisper decoder tensor {key} is missing")
        if cross_attention_means is not None:
            key = f"model.decoder.layers.{i}.self_attn.out_proj.bias"
            dst[key] = dst[key] + cross_attention_means[i].float()
    used = {k for k in src if ".encoder_attn" not in k}
    mapped = {"embed_tokens.weight", "embed_positions.weight", "layer_norm.weight", "layer_norm.bias"}
    mapped |= {f"layers.{i}.{w}.{kind}" for i in range(wcfg.decoder_layers) for w in _LAYER_MAP.values()
               for kind in ("weight", "bias")}
    if unmapped := sorted(used - mapped):
        raise ValueError(f"Whisper decoder tensors not mapped: {unmapped[:5]}")
    own = model.state_dict()
    missing = [k for k in own if k not in dst and k != "lm_head.weight"]
    if missing:
        raise ValueError(f"OPT parameters left at their random init: {missing[:5]}")
    for k, v in dst.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{k}: shape {tuple(v.shape)} does not fit {tuple(own[k].shape)}")
    model.load_state_dict(dst, strict=False)
    model.tie_weights()
    return model


def whisper_decoder_reference(whisper_dir: Path, input_ids: torch.Tensor,
                              cross_attention_means: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Logits of Whisper's own decoder modules on `input_ids` [B, T] (no padding) with every layer's
    encoder_attn block skipped (or replaced by the constant `cross_attention_means[i]`): the reference the
    converted LLM must equal."""
    from transformers import WhisperModel

    whisper = WhisperModel.from_pretrained(whisper_dir, dtype=torch.float32).eval()
    dec = whisper.decoder
    T = input_ids.shape[1]
    h = dec.embed_tokens(input_ids) + dec.embed_positions.weight[:T]
    causal = torch.full((T, T), float("-inf")).triu(1)
    for i, layer in enumerate(dec.layers):
        a = layer.self_attn
        x = layer.self_attn_layer_norm(h)
        B, nh = x.shape[0], a.num_heads
        hd = x.shape[-1] // nh
        q = a.q_proj(x).view(B, T, nh, hd).transpose(1, 2) * hd**-0.5
        k = a.k_proj(x).view(B, T, nh, hd).transpose(1, 2)
        v = a.v_proj(x).view(B, T, nh, hd).transpose(1, 2)
        w = (q @ k.transpose(-1, -2) + causal).softmax(-1)
        h = h + a.out_proj((w @ v).transpose(1, 2).reshape(B, T, -1))
        if cross_attention_means is not None:
            h = h + cross_attention_means[i]
        x = layer.final_layer_norm(h)
        h = h + layer.fc2(torch.nn.functional.gelu(layer.fc1(x)))
    h = dec.layer_norm(h)
    return h @ dec.embed_tokens.weight.T


def build_whisper_llm(whisper_dir: Path, out_dir: Path, cross_attention_means: list[torch.Tensor] | None = None,
                      log: Callable[[str], None] = print) -> Path:
    """Write the converted decoder (OPTForCausalLM, float32 safetensors) and Whisper's tokenizer with the prompt's
    special tokens to `out_dir`; the directory loads with AutoModelForCausalLM and part.model.tokenizer."""
    whisper_dir, out_dir = Path(whisper_dir), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(whisper_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [AUDIO_TOKEN, TURN_START, TURN_END]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    end = tokenizer.convert_tokens_to_ids(TURN_END)
    model = whisper_decoder_to_opt(whisper_dir, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=end, bos_token_id=tokenizer.bos_token_id,
                                   cross_attention_means=cross_attention_means)
    emb = model.get_input_embeddings().weight
    sot = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    with torch.no_grad():
        for token in (AUDIO_TOKEN, TURN_START):
            emb[tokenizer.convert_tokens_to_ids(token)] = emb[sot]
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    n = sum(p.numel() for p in model.parameters())
    log(f"Whisper decoder -> {out_dir} (OPTForCausalLM, {n / 1e6:.1f}M parameters, vocabulary {len(tokenizer)})")
    return out_dir


@torch.no_grad()
def cross_attention_means(whisper_dir: Path, clips: list[tuple[object, str, str]],
                          log: Callable[[str], None] = print) -> list[torch.Tensor]:
    """Each decoder layer's cross-attention output averaged over every transcript position of real clips: the
    constant that stands in for the audio once the cross-attention is gone (`whisper_decoder_to_opt`).

    `clips`: (16 kHz waveform, language code, transcript). Whisper reads each clip (padded to its 30 s window)
    and its transcript teacher-forced after its own prompt (start, language, transcribe, no timestamps)."""
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    whisper_dir = Path(whisper_dir)
    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(whisper_dir)
    features = WhisperFeatureExtractor.from_pretrained(whisper_dir)
    layers = model.model.decoder.layers
    sums = [torch.zeros(model.config.d_model) for _ in layers]
    count = 0

    def keep(i: int):
        def hook(module, inputs, output):
            first = output[0] if isinstance(output, tuple) else output
            sums[i].add_(first[0].sum(0))
        return hook

    handles = [layer.encoder_attn.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    try:
        for wave, lang, text in clips:
            mel = features(wave, sampling_rate=16000, return_tensors="pt").input_features
            prompt = [tokenizer.convert_tokens_to_ids(t) for t in
                      ("<|startoftranscript|>", f"<|{lang}|>", "<|transcribe|>", "<|notimestamps|>")]
            ids = prompt + tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"]
            ids = ids[: model.config.max_target_positions]
            model(input_features=mel, decoder_input_ids=torch.tensor([ids]), use_cache=False)
            count += len(ids)
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("cross_attention_means needs at least one clip")
    log(f"cross-attention means over {len(clips)} clips ({count} decoder positions)")
    return [s / count for s in sums]


def corpus_clips(corpus: Path, languages: tuple[str, ...], per_language: int) -> list[tuple[object, str, str]]:
    """The first `per_language` training clips of each language in a shard corpus (`train/*.tar`): (16 kHz
    waveform, language, transcript)."""
    import json
    from collections import Counter

    from part.data.audio import load_audio
    from part.data.shards import AUDIO_EXTENSIONS, iter_tar_samples

    taken: dict[str, list] = {lang: [] for lang in languages}
    counters: Counter = Counter()
    for shard in sorted((Path(corpus) / "train").glob("*.tar")):
        for key, members in iter_tar_samples(str(shard), counters):
            try:
                record = json.loads(members["json"])
                lang = record.get("language")
            except (KeyError, ValueError, AttributeError) as exc:
                raise ValueError(f"{shard}:{key}: not a readable sample record ({exc})") from exc
            audio = next((members[ext] for ext in AUDIO_EXTENSIONS if ext in members), None)
            if lang in taken and len(taken[lang]) < per_language and audio is not None:
                taken[lang].append((load_audio(audio, name=f"{shard}:{key}"), lang, record["transcript"]))
        if all(len(v) >= per_language for v in taken.values()):
            break
    if missing := [lang for lang, v in taken.items() if not v]:
        raise ValueError(f"{corpus}/train: no clips of {', '.join(missing)}")
    return [clip for lang in languages for clip in taken[lang]]


def build_standin_llm(whisper_dir: Path, corpus: Path, out_dir: Path, languages: tuple[str, ...],
                      mean_clips_per_language: int = 16, copy_steps: int = 300, copy_lr: float = 3e-4,
                      batch_tokens: int = 1024, slot_repeats: int = 3, max_length: int = 384, seed: int = 0,
                      log: Callable[[str], None] = print) -> list[float]:
    """The demo's stand-in LLM: Whisper's decoder with its cross-attention replaced by the mean over real clips of
    `corpus`, then fine-tuned for `copy_steps` on the corpus' training text with the prompts training will use
    (the slot tasks, speech prompts with the transcript as text in the audio slot, repeated `slot_repeats` times,
    half of them written CTC-style), the token embeddings frozen. What it learns is to read the audio slot and
    write it out or translate it: the ability the frozen-LLM stages rely on, which a real LLM brings.
    Returns the fine-tune's loss per step."""
    from part.convert.tiny import pretrain_llm, text_examples
    from part.model.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    clips = corpus_clips(corpus, languages, mean_clips_per_language)
    means = cross_attention_means(whisper_dir, clips, log=log)
    build_whisper_llm(whisper_dir, out_dir, cross_attention_means=means, log=log)
    losses: list[float] = []
    if copy_steps > 0:
        tokenizer = load_tokenizer(str(out_dir))
        llm = OPTForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
        examples = text_examples(corpus, seed=seed, languages=languages, slot_repeats=slot_repeats)
        log(f"copy fine-tune: {copy_steps} steps over {len(examples)} text examples ({', '.join(languages)})")
        losses = pretrain_llm(llm, tokenizer, examples, copy_steps, batch_tokens=batch_tokens, lr=copy_lr,
                              max_length=min(max_length, llm.config.max_position_embeddings),
                              freeze_embeddings=True, log_every=25, log_prefix="[whisper-llm] copy fine-tune")
        llm.save_pretrained(out_dir)
    return losses
