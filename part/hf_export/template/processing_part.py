"""The processor of a PART Speech LLM exported for transformers: audio arrays and a task in, the model's inputs
out, built as the training code's inference builds them.

Written by `python -m part export`; plain transformers code, loaded with
`AutoProcessor.from_pretrained(directory, trust_remote_code=True)`.

    processor(audio=[wave_a, wave_b], sampling_rate=16000, task="asr", language="de")
    processor(audio=wave, sampling_rate=44100, task="s2tt", language="fr", target="en")

The prompt is the chat format's frame (`prompt_before` + the task's message + `prompt_after`) around the task's
message, which holds the audio placeholder once; the features are the encoder family's: Whisper's log-mel over
the batch padded to its longest clip, or per clip (wav2vec2/HuBERT/WavLM waveforms, w2v-BERT's stacked fbank),
padded. The clips of one call are one batch.
"""

from __future__ import annotations

from math import gcd

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin

WHISPER_HOP = 160  # samples per log-mel frame at 16 kHz


class PartSpeechProcessor(ProcessorMixin):
    """The encoder family's feature extractor and the LLM's tokenizer (both loaded through their Auto classes)."""

    def __init__(self, feature_extractor=None, tokenizer=None, chat_template=None, prompt_before: str = "",
                 prompt_after: str = "", end_token: str = "<|im_end|>", task_messages: dict | None = None,
                 language_names: dict | None = None, audio_token: str = "<|audio|>"):
        """prompt_before / prompt_after: the chat format around the user's message (the LLM's chat template
        rendered once, as the training code renders it); end_token: the token that ends the assistant's turn
        (generation stops on it); task_messages: the user's message per task, with `{source}` and `{target}` for
        the language names; language_names: code -> name in the messages (an unknown code is used as it is)."""
        self.prompt_before = prompt_before
        self.prompt_after = prompt_after
        self.end_token = end_token
        self.task_messages = dict(task_messages or {})
        self.language_names = dict(language_names or {})
        self.audio_token = audio_token
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template)

    # ---------------------------------------------------------------- text

    def prompt(self, task: str = "asr", language: str = "en", target: str | None = None,
               message: str | None = None) -> str:
        """The prompt text: the task's message (or `message`, which must hold the audio placeholder) in the
        chat format."""
        if message is None:
            if task not in self.task_messages:
                raise ValueError(f"task must be one of {', '.join(self.task_messages)}, not '{task}'")
            if "{target}" in self.task_messages[task] and not target:
                raise ValueError(f"task {task} needs a target language (target=...)")
            message = self.task_messages[task].replace("{source}", self.language_names.get(language, language))
            message = message.replace("{target}", self.language_names.get(target, target or ""))
        if message.count(self.audio_token) != 1:
            raise ValueError(f"the message must hold the audio placeholder {self.audio_token} exactly once")
        return self.prompt_before + message + self.prompt_after

    def cut_at_end(self, token_ids) -> list[list[int]]:
        """Each row of generated ids up to its end-of-turn token (what follows it is padding)."""
        end = self.tokenizer.convert_tokens_to_ids(self.end_token)
        rows = []
        for row in (token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids):
            rows.append(row[: row.index(end)] if end in row else list(row))
        return rows

    def batch_decode(self, token_ids, **kwargs) -> list[str]:
        """The texts of generated ids: each row up to its end-of-turn token, special tokens dropped."""
        kwargs.setdefault("skip_special_tokens", True)
        return [text.strip() for text in self.tokenizer.batch_decode(self.cut_at_end(token_ids), **kwargs)]

    def decode(self, token_ids, **kwargs) -> str:
        return self.batch_decode([token_ids], **kwargs)[0]

    # ---------------------------------------------------------------- audio

    def _to_rate(self, wave, sampling_rate: int) -> np.ndarray:
        wave = np.asarray(wave.cpu() if isinstance(wave, torch.Tensor) else wave, dtype=np.float32)
        if wave.ndim != 1 or wave.size == 0:
            raise ValueError(f"audio: one non-empty mono waveform per clip (1-D), got shape {wave.shape}; "
                             "average the channels of a multi-channel clip first")
        rate = self.feature_extractor.sampling_rate
        if sampling_rate == rate:
            return np.ascontiguousarray(wave)
        try:
            from scipy.signal import resample_poly
        except ImportError:
            raise ValueError(f"audio at {sampling_rate} Hz needs resampling to {rate} Hz (scipy), or pass "
                             f"{rate} Hz audio") from None
        g = gcd(int(sampling_rate), rate)
        return resample_poly(wave, rate // g, int(sampling_rate) // g).astype(np.float32)

    def features(self, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_features, feature_lengths) of 16 kHz clips, as the encoder family computes them."""
        fe = self.feature_extractor
        kind = type(fe).__name__
        if kind == "WhisperFeatureExtractor":
            out = fe(waves, sampling_rate=fe.sampling_rate, padding="longest", truncation=False,
                     return_tensors="np")
            lengths = [max(1, len(w) // WHISPER_HOP) for w in waves]
            return torch.from_numpy(out["input_features"]), torch.tensor(lengths)
        if kind == "Wav2Vec2FeatureExtractor":
            rows = [fe(w, sampling_rate=fe.sampling_rate, return_tensors="np")["input_values"][0] for w in waves]
        elif kind == "SeamlessM4TFeatureExtractor":
            rows = []
            for w in waves:
                out = fe(w, sampling_rate=fe.sampling_rate, return_attention_mask=True, return_tensors="np")
                rows.append(out["input_features"][0][: int(out["attention_mask"][0].sum())])
        else:
            raise ValueError(f"feature extractor {kind} is not one of a supported encoder family")
        padded = np.full((len(rows), max(len(r) for r in rows), *rows[0].shape[1:]), fe.padding_value,
                         dtype=np.float32)
        for i, r in enumerate(rows):
            padded[i, : len(r)] = r
        return torch.from_numpy(padded), torch.tensor([len(r) for r in rows])

    # ---------------------------------------------------------------- both

    def __call__(self, audio, sampling_rate: int | None = None, task: str = "asr", language: str = "en",
                 target: str | None = None, message: str | None = None, return_tensors: str = "pt") -> BatchFeature:
        """Model inputs for one clip or a list of them (1-D float arrays or tensors at `sampling_rate`, default the
        feature extractor's 16 kHz), each with the same prompt: input_ids and attention_mask, input_features and
        feature_lengths."""
        if return_tensors != "pt":
            raise ValueError("return_tensors: only 'pt' (the model is a torch model)")
        clips = list(audio) if isinstance(audio, (list, tuple)) else [audio]
        if not clips:
            raise ValueError("audio: no clips")
        rate = self.feature_extractor.sampling_rate if sampling_rate is None else sampling_rate
        waves = [self._to_rate(w, rate) for w in clips]
        input_features, feature_lengths = self.features(waves)
        ids = self.tokenizer(self.prompt(task, language, target, message), add_special_tokens=False)["input_ids"]
        input_ids = torch.tensor([ids] * len(waves))  # one prompt for every clip: no padding
        return BatchFeature({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                             "input_features": input_features, "feature_lengths": feature_lengths})
