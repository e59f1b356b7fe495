"""Unified VoxCPM2 sequences (DESIGN §5). Each position holds one text-track id and one latent patch.

Layouts (ids: 101 audio start, 102 audio end, 103 ref start, 104 ref end; R/Q/A = patches):
- tts:                  [text, 101, audio x A, 102]
- clone:                [103, ref x R, 104, text, 101, audio x A, 102]
- continuation:         [prompt_text+text, 101, prompt x Q, audio x A, 102]
- clone_continuation:   [103, ref x R, 104, prompt_text+text, 101, prompt x Q, audio x A, 102]
- voice design: text = "(description)text" (tts / clone layouts).
Loss (and the stop label on the last) only on the A target patches.
"""
from __future__ import annotations

import numpy as np

AUDIO_START, AUDIO_END, REF_START, REF_END = 101, 102, 103, 104
LAYOUTS = ("tts", "clone", "continuation", "clone_continuation")


def num_patches(frames, patch_size: int):
    """Patches of `frames` latent frames (the last one zero-padded); ints or integer arrays."""
    return -(-frames // patch_size)


def sequence_lengths(n_text, a, r=0, q=0, with_ref=False):
    """Positions of samples (ints or arrays): `[103, ref×r, 104]` when `with_ref`, the `n_text` (joined)
    text ids, `101`, the `q` prompt and `a` target patches, `102`."""
    return n_text + 2 + a + q + np.where(with_ref, r + 2, 0)


def sequence_length(layout: str, n_text: int, a: int, r: int = 0, q: int = 0) -> int:
    """Positions of a sample of `layout`; n_text counts the (joined) text ids, a/r/q are patch counts."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}")
    with_ref, with_prompt = layout in ("clone", "clone_continuation"), layout in ("continuation", "clone_continuation")
    return int(sequence_lengths(n_text, a, r, q if with_prompt else 0, with_ref))


def to_patches(latent: np.ndarray, patch_size: int) -> np.ndarray:
    """[T, D] frames -> [ceil(T / P), P, D] float32, zero-padding the last patch."""
    t, d = latent.shape
    n = num_patches(t, patch_size)
    out = np.zeros((n * patch_size, d), dtype=np.float32)
    out[:t] = latent
    return out.reshape(n, patch_size, d)


def text_with_description(text: str, description: str | None) -> str:
    return f"({description}){text}" if description else text


def build_sequence(text_ids: list[int], target: np.ndarray, patch_size: int,
                   ref: np.ndarray | None = None, prompt: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One sample. text_ids: ids of the text (for continuation: of prompt_text + text); target/ref/prompt:
    latents [T, D] at 25 Hz. Returns numpy arrays of length L: text_tokens int64, text_mask, audio_mask,
    loss_mask float32, labels int64, audio_feats float32 [L, P, D]."""
    tgt = to_patches(target, patch_size)
    p, d = tgt.shape[1:]
    tracks: list[tuple[np.ndarray, np.ndarray, int]] = []  # (ids, feats, kind: 0 text, 1 ctx audio, 2 target)

    def text(ids):
        ids = np.asarray(ids, dtype=np.int64)
        tracks.append((ids, np.zeros((len(ids), p, d), np.float32), 0))

    def audio(feats, kind):
        tracks.append((np.zeros(len(feats), np.int64), feats, kind))

    if ref is not None:
        text([REF_START]); audio(to_patches(ref, patch_size), 1); text([REF_END])
    text(list(text_ids) + [AUDIO_START])
    if prompt is not None:
        audio(to_patches(prompt, patch_size), 1)
    audio(tgt, 2)
    text([AUDIO_END])

    ids = np.concatenate([t[0] for t in tracks])
    kind = np.concatenate([np.full(len(t[0]), t[2]) for t in tracks])
    labels = np.zeros(len(ids), np.int64)
    labels[np.flatnonzero(kind == 2)[-1]] = 1
    return {
        "text_tokens": ids,
        "text_mask": (kind == 0).astype(np.float32),
        "audio_mask": (kind > 0).astype(np.float32),
        "loss_mask": (kind == 2).astype(np.float32),
        "labels": labels,
        "audio_feats": np.concatenate([t[1] for t in tracks]),
    }
