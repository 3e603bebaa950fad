"""What the data pipeline and the model share about audio: the sample rate, the longest clip, and the speech
encoders' feature computation.

An `AudioFeatures` turns 16 kHz mono waveforms into the padded tensor an encoder family reads (part/model/encoders.py
says which one each family uses); the data pipeline is handed one and calls it without knowing the family. A
clip's features do not depend on the other clips of its batch, except in Whisper's last log-mel frame (see
`LogMelFeatures`). This module imports no other module of the package.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

SAMPLE_RATE = 16000  # Hz: every clip is decoded and resampled to this
MAX_CLIP_SECONDS = 30.0  # the longest clip the data pipeline accepts (data.max_duration <= 30)


class AudioFeatures(ABC):
    """The one owner of a family's feature computation: 16 kHz mono waveforms in; out, the padded tensor its
    encoder reads and each clip's valid length, counted in that tensor's time steps. A clip's features do not
    depend on the other clips of the batch. The data pipeline holds one of these without knowing its family."""

    time_axis = -1  # the features' time axis
    steps_per_second = 100  # time steps per second of audio

    def __init__(self, extractor):
        self.extractor = extractor  # the transformers feature extractor

    @abstractmethod
    def __call__(self, waves: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, valid lengths) of a batch of clips."""

    def pad_to(self, features: torch.Tensor, steps: int) -> torch.Tensor:
        """`features` with zeros appended along the time axis up to `steps` (the encoders mask them)."""
        missing = steps - features.shape[self.time_axis]
        if missing <= 0:
            return features
        shape = list(features.shape)
        shape[self.time_axis] = missing
        return torch.cat([features, features.new_zeros(shape)], dim=self.time_axis)

    def save(self, directory: str | Path) -> None:
        """Writes the extractor's settings (preprocessor_config.json), from which the family rebuilds it."""
        self.extractor.save_pretrained(str(directory))


class LogMelFeatures(AudioFeatures):
    """Whisper: log-mel [clips, mel bins, frames], 100 frames/s, padded to the longest clip (not to 30 s). Computed
    on the padded batch (part/model/encoders.py's docstring says what that does to a clip's last frame)."""

    HOP = 160
    steps_per_second = SAMPLE_RATE // HOP

    def __call__(self, waves):
        feats = self.extractor(list(waves), sampling_rate=SAMPLE_RATE, padding="longest", truncation=False,
                               return_tensors="np")
        return torch.from_numpy(feats["input_features"]), torch.tensor([max(1, len(w) // self.HOP) for w in waves])


def _pad_rows(rows: list[np.ndarray], value: float) -> torch.Tensor:
    """Stacks arrays of different lengths (first axis) into one, padded with `value`."""
    out = np.full((len(rows), max(len(r) for r in rows), *rows[0].shape[1:]), value, dtype=np.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


class WaveformFeatures(AudioFeatures):
    """wav2vec2 / HuBERT / WavLM: the waveform [clips, samples], zero-mean unit-variance per clip when the
    extractor normalises (computed clip by clip: over a padded batch it would include the padding)."""

    steps_per_second = SAMPLE_RATE

    def __call__(self, waves):
        rows = [self.extractor(w, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_values"][0] for w in waves]
        return _pad_rows(rows, self.extractor.padding_value), torch.tensor([len(r) for r in rows])


class FbankFeatures(AudioFeatures):
    """w2v-BERT 2.0: SeamlessM4T's 80-bin Kaldi fbank (10 ms hop), normalised per bin over the clip, every 2 frames
    stacked: [clips, frames, 160] at 50 frames/s. An odd last fbank frame is dropped, as its own mask does."""

    time_axis = 1
    steps_per_second = 50

    def __call__(self, waves):
        rows = []
        for w in waves:
            out = self.extractor(w, sampling_rate=SAMPLE_RATE, return_attention_mask=True, return_tensors="np")
            rows.append(out["input_features"][0][: int(out["attention_mask"][0].sum())])
        return _pad_rows(rows, self.extractor.padding_value), torch.tensor([len(r) for r in rows])


def audio_features(source) -> AudioFeatures:
    """The `AudioFeatures` for `source`: one already (what the model's `audio_features` gives), a transformers
    feature extractor of a supported family, or an int: Whisper's log-mel with that many mel bins."""
    from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2FeatureExtractor, WhisperFeatureExtractor

    if isinstance(source, AudioFeatures):
        return source
    if isinstance(source, int):
        return LogMelFeatures(WhisperFeatureExtractor(feature_size=source))
    for extractor_class, features_class in ((WhisperFeatureExtractor, LogMelFeatures),
                                            (Wav2Vec2FeatureExtractor, WaveformFeatures),
                                            (SeamlessM4TFeatureExtractor, FbankFeatures)):
        if isinstance(source, extractor_class):
            return features_class(source)
    raise TypeError(f"not a speech feature extractor of a supported encoder family: {type(source).__name__}")
