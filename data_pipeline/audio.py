"""Audio decoding: any file soundfile reads (wav/flac/ogg/mp3), any rate and channel count -> mono 16 kHz."""
from __future__ import annotations

import io
from typing import BinaryIO

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "mp3", "opus")


class BadSample(Exception):
    """A sample that must be skipped. `reason` is a short counter key, `key` names the sample."""

    def __init__(self, reason: str, key: str, detail: str = ""):
        super().__init__(f"{reason}: {key}" + (f" ({detail})" if detail else ""))
        self.reason, self.key, self.detail = reason, key, detail


def decode_audio(src: bytes | str | BinaryIO, key: str, target_sr: int = 16000) -> np.ndarray:
    """Decode `src` (raw bytes, a path or a file object) to mono float32 [N] at `target_sr` Hz.

    Raises BadSample("undecodable" | "empty_audio" | "non_finite_audio") naming `key`.
    """
    try:
        data, sr = sf.read(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src,
                           dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError/RuntimeError/TypeError on junk
        raise BadSample("undecodable", key, f"{type(e).__name__}: {e}") from None
    if data.shape[0] == 0:
        raise BadSample("empty_audio", key)
    if not np.isfinite(data).all():
        raise BadSample("non_finite_audio", key)
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sr != target_sr:
        mono = AF.resample(torch.from_numpy(np.ascontiguousarray(mono)), sr, target_sr).numpy()
    return np.ascontiguousarray(mono, dtype=np.float32)
