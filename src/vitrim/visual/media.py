"""Inputs and pictures for models that do not take images (``vitrim visualize`` on video and audio).

What kind of input a model takes is asked of its adapter (``Adapter.input_shape``): ``(T, C, H, W)``
is a clip, ``(time, freq)`` a spectrogram. The picture drawn under the token maps is laid out on the
model's token grid (``Adapter.grid_size``):

* **video**: the first frame of every tubelet step, stacked along the height (the token order of
  ``(T' * h, w)``); :func:`tile_frames` then lays the steps side by side, so a merge group that spans
  frames shows as one colour in several tiles. With no file: a camera pan across scikit-image's
  astronaut (the content moves, so groups follow it through time).
* **spectrogram**: the log-mel spectrogram, frequency rows by time columns, cut to the patch strides
  (each cell is one patch's stride step; AST's patches overlap, the cell is where each one starts).
  With no file: a chirp with tone bursts, through the model's feature extractor settings
  (transformers' ``ASTFeatureExtractor``).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..adapters import get_adapter
from ..errors import VitrimError

__all__ = ["input_kind", "load_clip", "load_spectrogram", "tile_frames"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # VideoMAE's processor defaults
SAMPLE_RATE = 16000


def input_kind(model: nn.Module) -> str:
    """``"image"``, ``"video"`` or ``"spectrogram"``, from the adapter's sample shape."""
    shape = tuple(get_adapter(model).input_shape())
    return {3: "image", 4: "video", 2: "spectrogram"}.get(len(shape), "other")


# ---------------------------------------------------------------------- video
def _frames_from(path: str) -> list:
    from PIL import Image, ImageSequence

    from ..train.data import IMG_EXTENSIONS

    if os.path.isdir(path):
        files = sorted(p for p in os.listdir(path) if os.path.splitext(p)[1].lower() in IMG_EXTENSIONS)
        if not files:
            raise VitrimError(f"folder {path!r} holds no image files; accepted: a folder of frames (PNG, JPEG ...) "
                              f"or an animated GIF")
        return [Image.open(os.path.join(path, f)).convert("RGB") for f in files]
    try:
        img = Image.open(path)
        return [f.convert("RGB") for f in ImageSequence.Iterator(img)]
    except (OSError, ValueError) as err:
        raise VitrimError(f"cannot read frames from {path!r} ({err}); accepted: a folder of frames or an animated "
                          f"GIF (any multi-frame file PIL opens)") from err


def _pan(num_frames: int) -> list:
    """A camera pan across the astronaut: ``num_frames`` square crops sliding left to right."""
    from PIL import Image
    from skimage import data

    img = data.astronaut()
    side = img.shape[0] * 3 // 4
    steps = np.linspace(0, img.shape[1] - side, num_frames).round().astype(int)
    return [Image.fromarray(img[img.shape[0] - side:, s:s + side]) for s in steps]


def load_clip(model: nn.Module, path: Optional[str]) -> tuple[torch.Tensor, np.ndarray, int]:
    """``(x [1, T, C, H, W] normalised with ImageNet statistics, picture [T' * H, W, 3], T')``: the clip
    the model takes (frames sampled evenly from ``path``) and the first frame of each tubelet step."""
    adapter = get_adapter(model)
    t, c, h, w = adapter.input_shape()
    if c != 3:
        raise VitrimError(f"visualize draws RGB clips; this model takes {c} channels")
    frames = _frames_from(path) if path is not None else _pan(t)
    picks = np.linspace(0, len(frames) - 1, t).round().astype(int)
    clip = np.stack([np.asarray(frames[i].resize((w, h))) for i in picks]).astype(np.float32) / 255.0  # [T, H, W, 3]
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    x = torch.from_numpy((clip - mean) / std).permute(0, 3, 1, 2).unsqueeze(0).contiguous()
    steps = adapter.frames()
    tubelet = t // steps
    pic = np.concatenate([clip[s * tubelet] for s in range(steps)], axis=0)
    return x, pic, steps


def tile_frames(img: np.ndarray, frames: int, gap: int = 4) -> np.ndarray:
    """``[frames * H, W, 3]`` (time steps stacked) -> the steps side by side, ``ceil(sqrt(frames))`` per row,
    ``gap`` grey pixels between them."""
    if frames <= 1:
        return img
    H, W = img.shape[0] // frames, img.shape[1]
    cols = math.ceil(math.sqrt(frames))
    rows = math.ceil(frames / cols)
    out = np.full((rows * H + (rows - 1) * gap, cols * W + (cols - 1) * gap, 3), 0.5, dtype=img.dtype)
    for f in range(frames):
        r, c = divmod(f, cols)
        out[r * (H + gap):r * (H + gap) + H, c * (W + gap):c * (W + gap) + W] = img[f * H:(f + 1) * H]
    return out


# ---------------------------------------------------------------------- audio
def _waveform(path: Optional[str], seconds: float) -> np.ndarray:
    n = int(seconds * SAMPLE_RATE)
    if path is None:
        t = np.arange(n) / SAMPLE_RATE
        chirp = np.sin(2 * np.pi * (200 + 1800 * t / seconds) * t)
        bursts = np.sin(2 * np.pi * 1200 * t) * (np.sin(2 * np.pi * 2 * t) > 0.6)
        return (0.6 * chirp + 0.4 * bursts).astype(np.float32)
    import wave

    try:
        with wave.open(path, "rb") as f:
            if f.getsampwidth() != 2:
                raise VitrimError(f"{path!r} is not 16-bit PCM; accepted: 16-bit PCM .wav (16 kHz) or a .npy "
                                  f"spectrogram [time, freq]")
            data = np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16).reshape(-1, f.getnchannels())
            rate = f.getframerate()
    except (OSError, EOFError, wave.Error) as err:
        raise VitrimError(f"cannot read {path!r} as a .wav file ({err}); accepted: 16-bit PCM .wav or a .npy "
                          f"spectrogram [time, freq]") from err
    mono = data.mean(axis=1) / 32768.0
    if rate != SAMPLE_RATE:  # linear resampling to the 16 kHz AST's feature extractor expects
        mono = np.interp(np.arange(0, len(mono), rate / SAMPLE_RATE), np.arange(len(mono)), mono)
    return mono.astype(np.float32)


def load_spectrogram(model: nn.Module, path: Optional[str]) -> tuple[torch.Tensor, np.ndarray]:
    """``(x [1, time, freq], picture [f' * s_f, t' * s_t, 3])``: the model's input (a ``.npy`` array as
    is, a ``.wav`` or the default sound through ``ASTFeatureExtractor`` with the model's sizes) and the
    spectrogram coloured and cut to the patch strides of the token grid."""
    from matplotlib import colormaps

    adapter = get_adapter(model)
    time_len, freq = adapter.input_shape()
    if path is not None and path.endswith(".npy"):
        spec = np.load(path).astype(np.float32)
        if spec.shape != (time_len, freq):
            raise VitrimError(f"{path!r} holds an array of shape {spec.shape}; this model takes a spectrogram of "
                              f"({time_len}, {freq}) (time frames, mel bins)")
    else:
        from transformers import ASTFeatureExtractor

        extractor = ASTFeatureExtractor(num_mel_bins=freq, max_length=time_len)
        wav = _waveform(path, (time_len + 2) * 0.01)
        spec = extractor(wav, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_values"][0]
    x = torch.from_numpy(np.ascontiguousarray(spec)).unsqueeze(0)
    rows, cols = adapter.grid_size()
    fs, ts = max(1, freq // rows), max(1, time_len // cols)  # the patch strides (overlapping patches: their starts)
    img = spec.T[:rows * fs, :cols * ts]  # [freq, time], one stride step per cell
    lo, hi = float(img.min()), float(img.max())
    pic = colormaps["magma"]((img - lo) / max(hi - lo, 1e-6))[..., :3]
    return x, pic.astype(np.float64)
