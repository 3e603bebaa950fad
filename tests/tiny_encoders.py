"""Tiny random speech encoders of every supported family, saved with `save_pretrained` (model and feature
extractor) the way their real checkpoints are laid out. Shared by tests/unit/test_encoders.py and the launcher
test in tests/integration/test_encoder_families_e2e.py."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("whisper", "wav2vec2", "hubert", "wavlm", "wav2vec2-bert")
LAYERS = 3


def _wave_config(cls, **kw):
    """wav2vec2-style: the real CNN (kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2: x320) with narrow channels."""
    return cls(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
               conv_dim=(16,) * 7, num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
               hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, feat_proj_dropout=0.1,
               layerdrop=0.1, mask_time_prob=0.05, **kw)


def build_tiny_encoder(model_type: str, out: Path, seed: int = 0) -> Path:
    """Writes a tiny random `model_type` encoder (config.json, model.safetensors, preprocessor_config.json) to
    `out` and returns it. wav2vec2 and WavLM use the base models' GroupNorm front end and post-norm layers,
    HuBERT the large models' LayerNorm front end and pre-norm layers with a final norm."""
    import transformers as tf

    torch.manual_seed(seed)
    if model_type == "whisper":
        model = tf.WhisperModel(tf.WhisperConfig(
            d_model=32, encoder_layers=LAYERS, encoder_attention_heads=4, encoder_ffn_dim=64, decoder_layers=1,
            decoder_attention_heads=4, decoder_ffn_dim=64, num_mel_bins=80, max_source_positions=1500,
            max_target_positions=16, vocab_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1))
        extractor = tf.WhisperFeatureExtractor(feature_size=80)
    elif model_type == "wav2vec2":
        model = tf.Wav2Vec2Model(_wave_config(tf.Wav2Vec2Config, feat_extract_norm="group"))
        extractor = tf.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False)
    elif model_type == "hubert":
        model = tf.HubertModel(_wave_config(tf.HubertConfig, feat_extract_norm="layer", do_stable_layer_norm=True,
                                            conv_bias=True))
        extractor = tf.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    elif model_type == "wavlm":
        model = tf.WavLMModel(_wave_config(tf.WavLMConfig, feat_extract_norm="group", num_buckets=32,
                                           max_bucket_distance=64))
        extractor = tf.Wav2Vec2FeatureExtractor(do_normalize=False, return_attention_mask=True)
    elif model_type == "wav2vec2-bert":
        model = tf.Wav2Vec2BertModel(tf.Wav2Vec2BertConfig(
            hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
            feature_projection_input_dim=160, conv_depthwise_kernel_size=5, position_embeddings_type="relative_key",
            left_max_position_embeddings=16, right_max_position_embeddings=4, hidden_dropout=0.1,
            attention_dropout=0.1, activation_dropout=0.1, feat_proj_dropout=0.1, layerdrop=0.1,
            mask_time_prob=0.05))
        extractor = tf.SeamlessM4TFeatureExtractor(feature_size=80, num_mel_bins=80, stride=2, padding_value=1.0)
    else:
        raise ValueError(model_type)
    model.save_pretrained(out)
    extractor.save_pretrained(out)
    return out
