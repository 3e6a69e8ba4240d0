"""Image decoding and preprocessing as LLaVA-1.5 does it: RGB, pad to square with the mean colour
(`expand2square`), bicubic resize, CLIP normalisation."""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from meteor_jax.data.features import SkipSample


def load_image(source: str | bytes | os.PathLike, image_size: int, mean, std) -> np.ndarray:
    """(S, S, 3) float32 normalised pixels from a file path or encoded bytes (PNG, JPEG, ...).

    A missing file raises SkipSample("missing image"); undecodable data SkipSample("corrupt image").
    """
    return normalize(load_rgb(source, image_size, mean), mean, std)


def load_rgb(source: str | bytes | os.PathLike, image_size: int, mean) -> np.ndarray:
    """(S, S, 3) uint8 RGB, square (padded with the mean colour) and resized: everything but the normalisation."""
    background = tuple(int(m * 255) for m in mean)  # LLaVA's fill colour: int(x * 255) of the CLIP mean
    image = expand_to_square(to_rgb(decode_image(source), background), background)
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(image, np.uint8)


def normalize(rgb: np.ndarray, mean, std) -> np.ndarray:
    """uint8 RGB → float32 (x / 255 - mean) / std, per channel (CLIP normalisation)."""
    pixels = rgb.astype(np.float32) / 255.0
    return ((pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def decode_image(source: str | bytes | os.PathLike) -> Image.Image:
    """A fully decoded PIL image (decoding errors surface here, not later)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), f"<{len(source)} bytes>"
    else:
        name = os.fspath(source)
        try:
            with open(name, "rb") as f:
                data = f.read()
        except FileNotFoundError as e:
            raise SkipSample("missing image", name) from e
        except OSError as e:
            raise SkipSample("unreadable image", f"{name}: {e}") from e
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # PIL raises many types on bad data (OSError, SyntaxError, ValueError, struct.error...)
        raise SkipSample("corrupt image", f"{name}: {type(e).__name__}: {e}") from e
    return image


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode → RGB; transparency is composited on `background`; 16-bit greys scaled to 8 bits."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I"):
        # PIL's own I;16 → RGB conversion clips at 255 instead of scaling.
        grey = np.asarray(image, np.float64) / 257.0
        image = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        canvas = Image.new("RGBA", image.size, (*background, 255))
        return Image.alpha_composite(canvas, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA's expand2square: centre the image on a square of `background` colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square
