"""What a model takes, from what a user has: image files decoded, images resized and normalised, texts
tokenised. Training, evaluation, ONNX parity and the model server all call these functions, so a served
prediction is computed from exactly the numbers the evaluate stage scored. numpy, Pillow and the
`tokenizers` library only (no torch, no transformers): the server imports this module.

An image's path into a model, in two steps:
  decode_image   a file -> uint8 RGB (stored, stored, 3): what prepare keeps (prepare.image_size)
  image_array    uint8 images -> float32 (N, C, S, S): the model's own size S, channels and mean/std"""

from __future__ import annotations

import functools
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np

DECODE_RULE = ("EXIF orientation applied; 16-bit scaled, palette and CMYK converted, transparency composited "
               "on white; the shorter side scaled to the stored size (bicubic) and centre-cropped to a square")
warnings.filterwarnings("ignore", message="Image size .* could be decompression bomb")
RESIZE_RULE = "bilinear with antialiasing (as PIL and torch's antialias=True), align_corners=False"


def decode_image(source: Path | bytes, size: int, max_pixels: int) -> np.ndarray:
    """An image file (a path, or its bytes) -> uint8 RGB (size, size, 3) by DECODE_RULE. Truncated files
    raise (Pillow's LOAD_TRUNCATED_IMAGES is never set), and so do images over `max_pixels`
    (decompression bombs) before their pixels are decoded. Pillow's own bomb warning is silenced below:
    this check is the one that decides, with the limit the task set."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        if im.width * im.height > max_pixels:  # from the header, before a pixel is decoded
            raise ValueError(f"{im.width}x{im.height} pixels exceeds prepare.max_pixels ({max_pixels})")
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grayscale: scale, don't clip
            a = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
            im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        if im.mode in ("RGBA", "LA", "PA"):
            rgba = im.convert("RGBA")
            im = Image.new("RGB", rgba.size, (255, 255, 255))
            im.paste(rgba, mask=rgba.getchannel("A"))
        im = ImageOps.fit(im.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


@functools.lru_cache(maxsize=32)
def resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """The (n_out, n_in) matrix of a 1-D antialiased bilinear resize: PIL's and torch's algorithm (a
    triangle filter widened by the scale when shrinking, so every input pixel counts), as a matrix so a
    batch resizes with two matrix products."""
    scale = n_in / n_out
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    w = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        taps = np.clip(1.0 - np.abs((np.arange(lo, hi) - center + 0.5) * invscale), 0.0, None)
        w[i, lo:hi] = taps / taps.sum()
    w.setflags(write=False)
    return w.astype(np.float32)


def image_array(x_uint8: np.ndarray, pre: dict) -> np.ndarray:
    """uint8 images (N, H, W) or (N, H, W, 3) -> float32 (N, C, S, S) as the model's JSON says: `pre` holds
    image_size (S), channels, mean and std. Grayscale feeds a 3-channel model repeated; RGB feeds a
    1-channel model as the mean of its channels (a gray one as its one channel)."""
    x = np.asarray(x_uint8).astype(np.float32) / np.float32(255.0)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    size = pre["image_size"]
    if x.shape[-2:] != (size, size):
        x = resize_weights(x.shape[-2], size) @ (x @ resize_weights(x.shape[-1], size).T)
    if pre["channels"] == 3 and x.shape[1] == 1:  # the pre-trained stem expects RGB
        x = np.repeat(x, 3, axis=1)
    elif pre["channels"] == 1 and x.shape[1] == 3:
        # A gray picture saved as RGB (R = G = B) is the grayscale image itself, exactly: averaging three
        # equal floats can move the last bit, and a model trained on grayscale arrays would see other numbers.
        raw = np.asarray(x_uint8)
        gray = ((raw[..., 0] == raw[..., 1]) & (raw[..., 1] == raw[..., 2])).reshape(len(raw), -1).all(1)
        x = np.where(gray[:, None, None, None], x[:, :1], x.mean(1, keepdims=True))
    mean = np.asarray(pre["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pre["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


# ---------------------------------------------------------------------------------------------- texts

def configure_tokenizer(tokenizer: Any, max_length: int, pad_id: int, pad_token: str, side: str = "right") -> Any:
    """A `tokenizers.Tokenizer` set to truncate at `max_length` and pad each batch to its longest text:
    what every text model is fed. Saved as it is into the serving contract, so the server needs nothing else."""
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(direction=side, pad_id=pad_id, pad_token=pad_token)
    return tokenizer


def encode_texts(tokenizer: Any, texts: np.ndarray | list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (input_ids, attention_mask), int64 (batch, longest text's tokens, at most max_length)."""
    enc = tokenizer.encode_batch([str(t) for t in texts])
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    return ids, mask
