"""The Speech LLM on the tiny models: from_pretrained loading, splicing, loss masking, groups, save/load."""

import dataclasses

import pytest
import torch

from part.batch import Batch
from part.config import AdapterConfig, EncoderConfig, LLMConfig, LoraConfig, ModelConfig
from part.model.groups import group_parameters, set_trainable
from part.model.speech_llm import SpeechLLM
from part.model.tokenizer import load_tokenizer
from part.packing import layout_batch, with_layouts
from part.prompts import AUDIO_TOKEN, TURN_END, instruction
from part.train.checkpoint import gather_state_dict


def tiny_speech_llm(tiny_models):
    """The tiny Speech LLM (a small adapter, LoRA) and its tokenizer, in evaluation mode."""
    cfg = ModelConfig(encoder=EncoderConfig(pretrained=str(tiny_models / "whisper")),
                      adapter=AdapterConfig(hidden=64, layers=1, heads=4),
                      llm=LLMConfig(pretrained=str(tiny_models / "llm"), lora=LoraConfig(rank=4, alpha=8)))
    tok = load_tokenizer(str(tiny_models / "llm"))
    torch.manual_seed(0)
    return SpeechLLM(cfg, tok).eval(), tok


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_models):
    return tiny_speech_llm(tiny_models)


def make_batch(tok, frames=(300, 180), text_only=False):
    end = tok.convert_tokens_to_ids(TURN_END)
    prompts, targets, index = [], [], []
    for i, _ in enumerate(frames):
        prompts.append(torch.tensor(tok(instruction("asr", "de"), add_special_tokens=False)["input_ids"]))
        targets.append(torch.tensor(tok("Guten Tag", add_special_tokens=False)["input_ids"] + [end]))
        index.append(i)
    if text_only:
        prompts.append(torch.tensor(tok(instruction("mt", "de", "en", "Hallo"), add_special_tokens=False)["input_ids"]))
        targets.append(torch.tensor(tok("Hello", add_special_tokens=False)["input_ids"] + [end]))
        index.append(-1)
    torch.manual_seed(1)
    return Batch(input_features=torch.randn(len(frames), 80, max(frames)), feature_frames=torch.tensor(frames),
                 audio_index=torch.tensor(index), prompt_ids=prompts, target_ids=targets)


def test_loaded_from_pretrained_dirs(model_and_tokenizer, tiny_models):
    """The encoder and LLM weights are the saved ones (the from_pretrained path of real checkpoints)."""
    from safetensors.torch import load_file

    model, _ = model_and_tokenizer
    whisper = load_file(str(tiny_models / "whisper" / "model.safetensors"))
    key = next(k for k in whisper if k.endswith("encoder.layers.0.fc1.weight"))
    assert torch.equal(model.encoder.layers[0].fc1.weight, whisper[key])
    llm = load_file(str(tiny_models / "llm" / "model.safetensors"))
    base = model.llm.get_base_model()
    assert torch.equal(base.model.layers[0].mlp.up_proj.weight, llm["model.layers.0.mlp.up_proj.weight"])


def test_audio_is_spliced_and_only_targets_are_scored(model_and_tokenizer):
    model, tok = model_and_tokenizer
    batch = make_batch(tok, text_only=True)
    layout = layout_batch(batch.prompt_ids, batch.target_ids, batch.audio_index, batch.feature_frames,
                          model.layout_spec(packed=False, length_multiple=1))
    # sample 0: 300 mel frames -> 150 encoder frames -> ceil(150 / 4) = 38 adapter frames replace 1 placeholder
    lengths = (layout.segments >= 0).sum(1).tolist()
    prompt_len, target_len = len(batch.prompt_ids[0]), len(batch.target_ids[0])
    assert lengths == [prompt_len - 1 + 38 + target_len, prompt_len - 1 + 23 + target_len,  # 180 -> 90 -> 23
                       len(batch.prompt_ids[2]) + len(batch.target_ids[2])]
    assert layout.shape == (3, max(lengths)) and layout.real_tokens == sum(lengths)
    assert layout.audio_clips.tolist() == [0] * 38 + [1] * 23 and layout.audio_frames.tolist()[36:40] == [36, 37, 0, 1]
    # the scored positions are those before each target token, and their targets are the targets in order
    assert layout.targets.tolist() == [t for ts in batch.target_ids for t in ts.tolist()]
    flat_tokens = layout.token_ids.flatten()
    for i, target in enumerate(batch.target_ids):
        row_end = i * layout.shape[1] + lengths[i]
        assert flat_tokens[row_end - len(target): row_end].tolist() == target.tolist()
    assert torch.equal(flat_tokens[layout.scored + 1], layout.targets)
    out = model(batch)
    assert out["tokens"] == sum(len(t) for t in batch.target_ids)
    assert torch.isfinite(out["loss"])


def test_packed_and_unpacked_give_the_same_loss_and_gradients(tiny_models):
    """Packing several samples into a row (each attending only to itself, positions from 0) changes nothing the
    model computes: the same loss and the same gradients as one sample per right-padded row (fp32)."""
    model, tok = tiny_speech_llm(tiny_models)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    batch = make_batch(tok, frames=(300, 180, 120, 60), text_only=True)
    results = []
    longest = max(len(p) + len(t) for p, t in zip(batch.prompt_ids, batch.target_ids)) + 38
    for spec in (model.layout_spec(packed=False, length_multiple=1), model.layout_spec(row_tokens=2 * longest),
                 model.layout_spec(row_tokens=4096)):  # all in one row
        laid = with_layouts(batch, spec)
        model.zero_grad()
        torch.manual_seed(0)
        out = model(laid)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((laid.layout.shape, out["loss"].detach(), out["tokens"], grads))
    (unpacked_shape, loss, tokens, grads), *packed = results
    assert unpacked_shape[0] == 5 and 1 < packed[0][0][0] < 5 and packed[1][0][0] == 1  # 5 rows, fewer, then 1
    assert len(grads) > 50
    for _, packed_loss, packed_tokens, packed_grads in packed:
        assert packed_tokens == tokens
        torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-6)
        assert packed_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_rows_keep_the_sliding_window_of_gemma_layers(tiny_gemma_models, attn_implementation):
    """Gemma 3's sliding-window layers see only the last `sliding_window` positions: a packed row gives them their
    own block-causal mask with that window (one mask for every layer would let them see further than the model
    was trained to), so packed and unpacked give the same loss on samples longer than the window."""
    cfg = ModelConfig(encoder=EncoderConfig(pretrained=str(tiny_gemma_models / "whisper")),
                      adapter=AdapterConfig(hidden=64, layers=1, heads=4),
                      llm=LLMConfig(pretrained=str(tiny_gemma_models / "llm")), attn_implementation=attn_implementation)
    tok = load_tokenizer(str(tiny_gemma_models / "llm"))
    torch.manual_seed(0)
    model = SpeechLLM(cfg, tok).eval()
    window = model.sliding_window
    batch = make_batch(tok, frames=(300, 180, 120, 60), text_only=True)
    losses = []
    for spec in (model.layout_spec(packed=False, length_multiple=1), model.layout_spec(row_tokens=4096)):
        laid = with_layouts(batch, spec)
        with torch.no_grad():
            losses.append(model(laid)["loss"])
        if spec.packed:
            assert laid.layout.shape[0] == 1
        else:
            assert window is not None and laid.layout.shape[1] > window  # the window cuts the longest sample
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def test_valid_length_does_not_depend_on_the_batch(model_and_tokenizer):
    """A clip gets as many audio embeddings alone as when batched with a longer clip."""
    model, tok = model_and_tokenizer
    both = make_batch(tok, frames=(300, 180))
    alone = make_batch(tok, frames=(180,))
    alone = dataclasses.replace(alone, input_features=both.input_features[1:2, :, :180])
    with torch.no_grad():
        emb_alone, _ = model.encode_audio(alone.input_features, alone.feature_frames)
        emb_both, lengths = model.encode_audio(both.input_features, both.feature_frames)
    assert int(lengths[1]) == emb_alone.shape[1] == 23
    assert emb_both.shape[1] == 38


def test_lora_starts_as_identity(tiny_models, model_and_tokenizer):
    model, tok = model_and_tokenizer
    batch = make_batch(tok)
    plain_cfg = ModelConfig(encoder=model.cfg.encoder, adapter=model.cfg.adapter,
                            llm=LLMConfig(pretrained=str(tiny_models / "llm")))
    plain = SpeechLLM(plain_cfg, tok).eval()
    plain.encoder.load_state_dict(model.encoder.state_dict())
    plain.adapter.load_state_dict(model.adapter.state_dict())
    with torch.no_grad():
        assert torch.allclose(model(batch)["loss"], plain(batch)["loss"], atol=1e-6)


def test_flash_attention_gets_the_whole_batch_as_one_row_with_its_varlen_lengths(tiny_models):
    """With flash_attention_2 (not run here: it needs a GPU) the batch is one packed row, and the decoder gets the
    samples' positions and their cumulative lengths, computed on the host, instead of a mask."""
    model, tok = tiny_speech_llm(tiny_models)
    model.cfg = dataclasses.replace(model.cfg, attn_implementation="flash_attention_2")
    batch = with_layouts(make_batch(tok, frames=(300, 180, 120), text_only=True), model.layout_spec())
    layout = batch.layout
    assert layout.shape[0] == 1 and layout.shared_rows
    inputs = model.attention_inputs(layout)
    assert set(inputs) == {"position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
    lengths = inputs["cu_seq_lens_q"].diff().tolist()
    assert inputs["cu_seq_lens_q"].dtype == torch.int32 and sum(lengths) == layout.shape[1]
    assert sorted(lengths[:4]) == sorted(int((layout.segments == k).sum()) for k in range(4))  # samples, then padding
    assert inputs["max_length_q"] == max(lengths) and isinstance(inputs["max_length_q"], int)
    starts = inputs["cu_seq_lens_q"][:-1].long()
    assert (inputs["position_ids"][0, starts] == 0).all()  # every sample (and the padding run) starts at position 0


def _products(model, batch) -> tuple[torch.Tensor, int]:
    """The loss, and how many matrix products the forward ran."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        loss = model(batch)["loss"]
    return loss, sum(n for op, n in counter.get_flop_counts()["Global"].items() if "mm" in str(op))


def test_lora_runs_only_once_it_trains_or_holds_weights(tiny_models, tmp_path):
    """A fresh model leaves its zero LoRA out (fewer products, the same loss to the bit); training LoRA turns it
    on; loaded weights with a non-zero LoRA keep it on, zero ones leave it off."""
    model, tok = tiny_speech_llm(tiny_models)
    batch = make_batch(tok)
    assert not model.lora_runs
    without, few = _products(model, batch)
    set_trainable(model, ["adapter", "llm.lora"])
    assert model.lora_runs and all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    with_lora, many = _products(model, batch)
    assert torch.equal(without, with_lora) and many > few
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh, _ = tiny_speech_llm(tiny_models)
    from safetensors.torch import save_file

    for value, runs in ((0.0, False), (0.01, True)):
        for k in state:
            if "lora_B" in k:
                state[k].fill_(value)
        save_file(state, str(tmp_path / "weights.safetensors"))
        fresh.load_weights(tmp_path / "weights.safetensors")
        assert fresh.lora_runs is runs


def test_parameter_groups(model_and_tokenizer):
    model, _ = model_and_tokenizer
    n_layers = len(model.encoder.layers)
    top2 = group_parameters(model, "encoder.top.2")
    assert {n.split(".")[2] for n in top2 if n.startswith("encoder.layers.")} == {str(n_layers - 2), str(n_layers - 1)}
    assert any(n.startswith("encoder.layer_norm.") for n in top2)
    assert all("lora_" in n for n in group_parameters(model, "llm.lora"))
    assert not any("lora_" in n for n in group_parameters(model, "llm"))
    assert all(".layers.1." in n for n in group_parameters(model, "llm.layers.1"))
    counts = set_trainable(model, ["adapter", "llm.lora"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(group_parameters(model, "adapter")) | set(group_parameters(model, "llm.lora"))
    assert counts["adapter"] == sum(p.numel() for n, p in model.named_parameters() if n.startswith("adapter."))
    with pytest.raises(ValueError, match="unknown parameter group"):
        group_parameters(model, "decoder")


def test_save_and_load_round_trip(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    batch = make_batch(tok)
    with torch.no_grad():
        for p in model.llm.parameters():  # make LoRA non-trivial so its weights must round-trip too
            if p.ndim == 2 and p.shape[0] < 10:
                p.add_(0.01)
        before = model(batch)["loss"]
    model.save_pretrained(tmp_path / "saved", tok)
    loaded, tok2 = SpeechLLM.from_pretrained(tmp_path / "saved")
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(batch)["loss"], before)
    assert tok2.convert_tokens_to_ids(AUDIO_TOKEN) == tok.convert_tokens_to_ids(AUDIO_TOKEN)


def test_generate_returns_token_lists(model_and_tokenizer):
    import warnings

    model, tok = model_and_tokenizer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.generate(make_batch(tok, text_only=True), max_new_tokens=5)
    # the penalties-see-only-new-tokens warning transformers gives for embeddings is silenced: it is intended
    assert not [w for w in caught if "inputs_embeds" in str(w.message)], [str(w.message) for w in caught]
    assert len(out) == 3 and all(len(x) <= 5 for x in out)
    beams = model.generate(make_batch(tok), max_new_tokens=4, num_beams=2)
    assert len(beams) == 2


def test_saved_directory_is_self_contained(tiny_models, tmp_path):
    """A saved model loads after the pretrained directories it was built from are gone."""
    import shutil

    shutil.copytree(tiny_models, tmp_path / "src")
    cfg = ModelConfig(encoder=EncoderConfig(pretrained=str(tmp_path / "src" / "whisper")),
                      adapter=AdapterConfig(hidden=64, layers=1, heads=4),
                      llm=LLMConfig(pretrained=str(tmp_path / "src" / "llm"), lora=LoraConfig(rank=4, alpha=8)))
    tok = load_tokenizer(str(tmp_path / "src" / "llm"))
    model = SpeechLLM(cfg, tok).eval()
    model.save_pretrained(tmp_path / "saved", tok)
    shutil.rmtree(tmp_path / "src")
    loaded, _ = SpeechLLM.from_pretrained(tmp_path / "saved")
    batch = make_batch(tok)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(batch)["loss"], model(batch)["loss"])


def test_tokenizer_round_trips_every_script(tiny_models):
    """The tiny tokenizer as training loads it keeps spaces and non-ASCII text (a byte-level class would not)."""
    tok = load_tokenizer(str(tiny_models / "llm"))
    for text in ("Grüße aus München", "hello world, again", "你好世界", "Привет, мир"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert len(tok(AUDIO_TOKEN, add_special_tokens=False)["input_ids"]) == 1


def _boost_logits(model, boosts: dict[int, float]):
    """A forward hook on the LM head adding `boosts` to those ids' logits (remove the returned handle)."""
    def hook(module, args, output):
        output = output.clone()
        for token_id, boost in boosts.items():
            output[..., token_id] += boost
        return output

    return model.llm.get_output_embeddings().register_forward_hook(hook)


def _generate_all_ways(model, tok, tmp_path, max_new_tokens: int) -> list[list[list[int]]]:
    """Greedy, beam search, and greedy and beam search under synced_gpus (a 1-rank gloo group, as ZeRO-3 runs
    generation): the outputs of each."""
    import torch.distributed as dist

    batch = make_batch(tok, text_only=True)
    outs = [model.generate(batch, max_new_tokens=max_new_tokens),
            model.generate(batch, max_new_tokens=max_new_tokens, num_beams=2)]
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg_store'}", rank=0, world_size=1)
    try:
        outs.append(model.generate(batch, max_new_tokens=max_new_tokens, synced_gpus=True))
        outs.append(model.generate(batch, max_new_tokens=max_new_tokens, num_beams=2, synced_gpus=True))
    finally:
        if started:
            dist.destroy_process_group()
    return outs


def test_suppressed_ids_are_the_special_tokens_but_not_the_end_token(model_and_tokenizer):
    model, tok = model_and_tokenizer
    suppressed = set(model.suppressed_token_ids)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.end_token_id == end and end not in suppressed
    for token in (AUDIO_TOKEN, "<|im_start|>", tok.pad_token, tok.unk_token, tok.bos_token, tok.eos_token):
        assert tok.convert_tokens_to_ids(token) in suppressed, token
    assert set(tok.all_special_ids) - {end} <= suppressed
    assert not suppressed & set(tok("Guten Tag, hello", add_special_tokens=False)["input_ids"])  # text is free


def test_generate_never_emits_special_tokens(model_and_tokenizer, tmp_path):
    """With the LM head biased so that <|im_start|> (then the other special tokens) is the argmax, decoding
    still never emits a suppressed id, in greedy and beam search, with and without synced_gpus."""
    model, tok = model_and_tokenizer
    start = tok.convert_tokens_to_ids("<|im_start|>")
    boosts = {i: 500.0 for i in model.suppressed_token_ids}
    boosts[start] = 1000.0
    handle = _boost_logits(model, boosts)
    try:
        # Control: the bias works, without suppression <|im_start|> is what greedy decoding emits.
        kept = model.suppressed_token_ids
        model.suppressed_token_ids = []
        try:
            unsuppressed = model.generate(make_batch(tok), max_new_tokens=3)
        finally:
            model.suppressed_token_ids = kept
        assert all(ids[0] == start for ids in unsuppressed)
        for outs in _generate_all_ways(model, tok, tmp_path, max_new_tokens=6):
            assert len(outs) == 3
            for ids in outs:
                assert len(ids) <= 6 and not set(ids) & set(model.suppressed_token_ids), ids
    finally:
        handle.remove()


def test_generate_stops_at_the_end_token(model_and_tokenizer, tmp_path):
    """The end-of-turn token is not suppressed: when it is the argmax (above a boosted special token), every
    sample stops at once, in every decoding mode."""
    model, tok = model_and_tokenizer
    handle = _boost_logits(model, {model.end_token_id: 2000.0, tok.convert_tokens_to_ids("<|im_start|>"): 1000.0})
    try:
        for outs in _generate_all_ways(model, tok, tmp_path, max_new_tokens=6):
            assert outs == [[], [], []]
    finally:
        handle.remove()


def test_the_repetition_penalty_covers_every_generated_token_of_a_left_padded_row(model_and_tokenizer):
    """Two text tokens lead every logit, a by a margin the penalty (1.1) undoes once a is written: every row writes
    a, then b, whatever its left padding (transformers' own penalty skips a row's first generated tokens, as many as
    its padding positions, when the prompt comes as embeddings: those rows would write a twice)."""
    model, tok = model_and_tokenizer
    a, b = tok("Guten Tag", add_special_tokens=False)["input_ids"][:2]
    batch = make_batch(tok, text_only=True)
    layout = model.layout_of(batch, prompts=True)
    assert int((layout.segments < 0).sum(1).max()) >= 2  # some row is left-padded by more than two positions
    handle = _boost_logits(model, {a: 100.0, b: 95.0})
    try:
        assert model.generate(batch, max_new_tokens=2) == [[a, b]] * len(batch)
    finally:
        handle.remove()


def test_skeleton_has_the_real_parameter_names(model_and_tokenizer):
    """The meta-device model `train.py --check` resolves groups against: same names, no memory, no weights read."""
    model, tok = model_and_tokenizer
    skeleton = SpeechLLM.skeleton(model.cfg, tok)
    assert [n for n, _ in skeleton.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    for group in ("adapter", "encoder.top.2", "llm", "llm.lora", "llm.layers.1"):
        assert group_parameters(skeleton, group) == group_parameters(model, group)
    assert group_parameters(skeleton, "llm.layers.99") == [] and group_parameters(skeleton, "encoder.layers.9") == []


def _grads(model, batch):
    model.zero_grad()
    out = model(batch)
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_and_attention_kernels_change_no_number(tiny_models):
    """Recomputing the encoder's and the LLM's layers in backward gives the same loss and gradients; sdpa and
    eager attention give the same loss (the config switches change memory and speed, not the model)."""
    def build(**fields):
        cfg = ModelConfig(encoder=EncoderConfig(pretrained=str(tiny_models / "whisper")),
                          adapter=AdapterConfig(hidden=64, layers=1, heads=4),
                          llm=LLMConfig(pretrained=str(tiny_models / "llm")), **fields)
        torch.manual_seed(0)
        model = SpeechLLM(cfg, tok).train()
        set_trainable(model, ["adapter", "encoder", "llm"])
        return model

    tok = load_tokenizer(str(tiny_models / "llm"))
    batch = make_batch(tok, text_only=True)
    loss, grads = _grads(build(), batch)
    from part.config import ActivationCheckpointingConfig

    recomputed = build(activation_checkpointing=ActivationCheckpointingConfig(encoder=True, llm=True))
    assert recomputed.llm.is_gradient_checkpointing
    loss_ckpt, grads_ckpt = _grads(recomputed, batch)
    assert torch.allclose(loss, loss_ckpt, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys() and any(k.startswith("encoder.layers.0") for k in grads)
    for name, g in grads.items():
        assert torch.allclose(g, grads_ckpt[name], atol=1e-5, rtol=1e-4), name
    eager = build(attn_implementation="eager")
    assert eager.llm.config._attn_implementation == "eager" and eager.encoder.config._attn_implementation == "eager"
    loss_eager, _ = _grads(eager, batch)
    assert torch.allclose(loss, loss_eager, atol=1e-4)


def test_span_frame_loss_against_its_definition():
    """span_frame_loss by brute force on random log-probabilities, and its two ends: the CTC-like answer (each
    token in one frame of its span, blank elsewhere) costs ~0; blank everywhere costs the span terms."""
    from part.objectives.frames import span_frame_loss

    torch.manual_seed(0)
    blank, vocab = 0, 7
    tokens = torch.tensor([3, 3, 3, 0, 5, 0, 4, 4])
    owners = torch.tensor([0, 0, 0, -1, 1, -1, 2, 2])
    log_probs = torch.randn(8, vocab).log_softmax(-1)
    p = log_probs.exp()
    frame = [-(torch.log(p[f, tokens[f]] + p[f, blank]) if owners[f] >= 0 else torch.log(p[f, blank]))
             for f in range(8)]
    spans = [-torch.log(sum(p[f, tokens[f]] for f in range(8) if owners[f] == j)) for j in range(3)]
    expected = torch.stack(frame).mean() + torch.stack(spans).mean()
    assert torch.allclose(span_frame_loss(log_probs, tokens, owners, blank), expected, atol=1e-5)

    sure = torch.full((8, vocab), -30.0)
    for f, t in enumerate([3, 0, 0, 0, 5, 0, 0, 4]):  # each token once inside its span
        sure[f, t] = 0.0
    assert span_frame_loss(sure.log_softmax(-1), tokens, owners, blank) < 1e-3
    all_blank = torch.full((8, vocab), -30.0)
    all_blank[:, blank] = 0.0
    assert span_frame_loss(all_blank.log_softmax(-1), tokens, owners, blank) > 25  # every token missing
    # owner numbers with gaps (a token that got no frame) leave no term and no NaN
    gappy = torch.tensor([0, 0, 0, -1, 3, -1, 5, 5])
    assert torch.isfinite(span_frame_loss(log_probs, tokens, gappy, blank))
    x = log_probs.clone().requires_grad_(True)
    span_frame_loss(x, tokens, owners, blank).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_gathered_weights_on_every_rank_rebuild_the_model(model_and_tokenizer):
    """What an evaluation's replica is made of (StageRun.decoding_model): the weights gathered on every rank, in
    their own dtype, loaded into the bare architecture; it decodes exactly as the model does."""
    model, tok = model_and_tokenizer
    assert gather_state_dict(model, rank=1) == {}  # the checkpoint's gather keeps them on rank 0 only
    bf16 = SpeechLLM(model.cfg, tok, weights=False).to(torch.bfloat16)
    assert {v.dtype for v in gather_state_dict(bf16, rank=1, every_rank=True, dtype=None).values()
            if v.is_floating_point()} == {torch.bfloat16}
    state = gather_state_dict(model, rank=1, every_rank=True, dtype=None)
    assert state.keys() == model.state_dict().keys()
    replica = SpeechLLM(model.cfg, tok, weights=False)
    assert not torch.equal(replica.adapter.proj.weight, model.adapter.proj.weight)  # fresh initialisation
    replica.load_state_dict(state, strict=True)
    batch = make_batch(tok, text_only=True)
    replica.eval()
    assert replica.generate(batch, max_new_tokens=8) == model.generate(batch, max_new_tokens=8)


def test_group_lr_makes_param_groups_with_their_scale(model_and_tokenizer):
    from part.config import OptimConfig
    from part.train.stage import build_optimizer

    model, _ = model_and_tokenizer
    set_trainable(model, ["adapter", "llm.lora"])
    optimizer = build_optimizer(model, OptimConfig(), 1e-3, {"adapter": 0.1})
    groups = {(g["lr_scale"], g["weight_decay"]): g for g in optimizer.param_groups}
    adapter = {id(p) for n, p in model.named_parameters() if n.startswith("adapter.")}
    lora = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    scaled = {id(p) for (scale, _), g in groups.items() if scale == 0.1 for p in g["params"]}
    plain = {id(p) for (scale, _), g in groups.items() if scale == 1.0 for p in g["params"]}
    assert scaled == adapter and plain == lora  # and nothing frozen in either
    assert groups[(0.1, 0.01)]["lr"] == pytest.approx(1e-4) and groups[(1.0, 0.01)]["lr"] == 1e-3
    assert all(p.ndim < 2 for p in groups[(0.1, 0.0)]["params"])  # biases and norms: no decay
    assert len(build_optimizer(model, OptimConfig(), 1e-3).param_groups) == 2  # no group_lr: as before


def test_the_loss_scores_over_the_tokens_generation_may_emit(model_and_tokenizer):
    """The LM loss is the cross-entropy of a softmax over the tokens generation may emit (every token but the
    special ones, the end token kept), so head rows of tokens it never emits change nothing: made copies of the end
    token's row, as a pretrained vocabulary's unused tokens can nearly be, they would otherwise share its
    probability."""
    model, tok = model_and_tokenizer
    batch = make_batch(tok, text_only=True)
    layout = model.layout_of(batch)
    suppressed = model.suppressed_ids.tolist()
    assert model.end_token_id not in suppressed and len(suppressed) >= 3
    assert int((layout.targets == model.end_token_id).sum()) == 3  # one end token per sample
    with torch.no_grad():
        inputs = model.embed(layout, model.encode(batch.input_features, batch.feature_frames))
        loss = model.lm_loss(inputs, layout)["loss_sum"]
        hidden = model.base_llm.get_decoder()(inputs_embeds=inputs, use_cache=False).last_hidden_state
        logits = model.base_llm.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1])[layout.scored]).float()
        allowed = [i for i in range(logits.shape[1]) if i not in set(suppressed)]
        index = {token: i for i, token in enumerate(allowed)}
        expected = torch.nn.functional.cross_entropy(logits[:, allowed], torch.tensor(
            [index[t] for t in layout.targets.tolist()]), reduction="sum")
        assert torch.allclose(loss, expected, rtol=1e-5)
        head = model.base_llm.get_output_embeddings().weight
        saved = head.detach().clone()
        head[model.suppressed_ids] = head[model.end_token_id].clone()
        try:
            copied = model.lm_loss(inputs, layout)["loss_sum"]
        finally:
            head.copy_(saved)
    assert torch.allclose(copied, loss, rtol=1e-6)
