"""Configuration of a PART Speech LLM exported for transformers: the speech encoder's and the LLM's own configs
nested, the adapter's settings, the audio placeholder's token id and the frame vocabulary's size.

Written by `python -m part export`; plain transformers code (no import of the training package), loaded with
`AutoConfig.from_pretrained(directory, trust_remote_code=True)`.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# The speech encoders the modelling code runs, by their config's model_type.
ENCODER_MODEL_TYPES = ("whisper", "wav2vec2", "hubert", "wavlm", "wav2vec2-bert")
ADAPTER_DEFAULTS = {"downsample": 4, "kind": "transformer", "hidden": 256, "layers": 2, "heads": 4,
                    "readout": "embeddings", "readout_temperature": 0.2, "readout_top_k": 16}


def _nested(value, name: str) -> PretrainedConfig | None:
    """A nested config from its dict form (its `model_type` picks the class), or as given."""
    if value is None or isinstance(value, PretrainedConfig):
        return value
    if not isinstance(value, dict) or value.get("model_type") not in CONFIG_MAPPING:
        raise ValueError(f"{name}: a config dict with a model_type transformers knows, got {value!r:.200}")
    fields = {k: v for k, v in value.items() if k != "model_type"}
    return CONFIG_MAPPING[value["model_type"]](**fields)


class PartSpeechLLMConfig(PretrainedConfig):
    """encoder_config: the speech encoder's config (Whisper, wav2vec2, HuBERT, WavLM or w2v-BERT 2.0).
    llm_config: the decoder-only LLM's config (any AutoModelForCausalLM architecture).
    adapter: the adapter between them: `downsample` (strided-conv factor over the encoder's frames), `kind`
    (transformer | mlp), `hidden`, `layers`, `heads`; `readout` (embeddings: the adapter's outputs go to the LLM as
    they are; vocabulary: each frame's top `readout_top_k` tokens under the LLM's final norm and head, at
    `readout_temperature`, weight the LLM's token embeddings).
    audio_token_id: the placeholder token whose position in the prompt receives the audio frames.
    frame_vocabulary_size: how many tokens the vocabulary readout scores (0: the whole vocabulary)."""

    model_type = "part_speech_llm"
    sub_configs = {"encoder_config": AutoConfig, "llm_config": AutoConfig}

    def __init__(self, encoder_config=None, llm_config=None, adapter: dict | None = None,
                 audio_token_id: int | None = None, frame_vocabulary_size: int = 0, **kwargs):
        self.encoder_config = _nested(encoder_config, "encoder_config")
        self.llm_config = _nested(llm_config, "llm_config")
        if self.encoder_config is not None and self.encoder_config.model_type not in ENCODER_MODEL_TYPES:
            raise ValueError(f"encoder_config: model_type '{self.encoder_config.model_type}' is not one of "
                             f"{', '.join(ENCODER_MODEL_TYPES)}")
        unknown = set(adapter or {}) - set(ADAPTER_DEFAULTS)
        if unknown:
            raise ValueError(f"adapter: unknown settings {sorted(unknown)} (known: {', '.join(ADAPTER_DEFAULTS)})")
        self.adapter = dict(ADAPTER_DEFAULTS, **(adapter or {}))
        self.audio_token_id = audio_token_id
        self.frame_vocabulary_size = frame_vocabulary_size
        super().__init__(**kwargs)
