"""Audio decoding, resampling and FLAC encoding. Knows nothing of models or shards."""

from __future__ import annotations

import io
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf

from part.features import SAMPLE_RATE


class AudioDecodeError(ValueError):
    """Raised when a clip cannot be decoded; the message names the clip."""


def load_audio(source: str | Path | bytes, target_sr: int = SAMPLE_RATE, name: str | None = None) -> np.ndarray:
    """Decode wav/flac/ogg(vorbis, opus)/mp3/aiff from a path or bytes to mono float32 at `target_sr`."""
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
        wave, sr = sf.read(handle, dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types; all mean "unreadable"
        raise AudioDecodeError(f"cannot decode audio {label}: {exc}") from exc
    if wave.size == 0:
        raise AudioDecodeError(f"audio {label} is empty")
    wave = wave.mean(axis=1)
    return resample(wave, sr, target_sr)


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Polyphase resampling (anti-aliased) between integer sample rates."""
    if orig_sr == target_sr:
        return np.ascontiguousarray(wave, dtype=np.float32)
    g = gcd(orig_sr, target_sr)
    from scipy.signal import resample_poly  # here, not at the top: scipy.signal costs every rank ~1 s to import

    return resample_poly(wave, target_sr // g, orig_sr // g).astype(np.float32)


def encode_flac(wave: np.ndarray, sr: int = SAMPLE_RATE) -> bytes:
    """16-bit FLAC bytes of a mono waveform."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1.0, 1.0), sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue()
