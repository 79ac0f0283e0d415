"""Turn one source record into a clean, fixed-size RGB image, or say why it cannot be used."""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from data_pipeline.sources.base import ImageLike, Rejected


def decode(image: ImageLike, max_pixels: int) -> Image.Image | Rejected:
    """Any accepted image form as an RGB PIL image (fully decoded, so damage shows here).

    Encoded bytes are sized from the header first: an image over ``max_pixels`` is rejected
    without a pixel decoded (a 10000x10000 PNG would need 300 MB and seconds otherwise)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            return Rejected(
                "undecodable", f"array must be uint8 HxW or HxWx3, got {image.dtype} {image.shape}"
            )
        return Image.fromarray(image).convert("RGB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the header check decides
            opened = Image.open(io.BytesIO(image))
            width, height = opened.size
            if width * height > max_pixels:
                return Rejected("image_too_large", f"{width}x{height} is over max_image_pixels={max_pixels}")
            opened.load()
            return opened.convert("RGB")
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
    ) as exc:
        return Rejected("undecodable", f"{type(exc).__name__}: {exc}")


def fit_square(image: Image.Image, size: int, min_size: int) -> Image.Image | Rejected:
    """Resize the shorter side to ``size`` and centre-crop; an exact-size image passes unchanged."""
    if min(image.size) < min_size:
        return Rejected("too_small", f"{image.size[0]}x{image.size[1]} is below the minimum side {min_size}")
    return ImageOps.fit(image, (size, size), method=Image.BICUBIC, centering=(0.5, 0.5))


def clean_caption(caption: str) -> str | Rejected:
    text = " ".join(caption.split())
    return text if text else Rejected("empty_caption", "caption is empty or whitespace")


def pixel_hash(image: Image.Image) -> str:
    """Content hash of decoded pixels: equal images match whatever file format they arrived in."""
    pixels = np.asarray(image, dtype=np.uint8)
    return hashlib.sha256(f"{pixels.shape}".encode() + pixels.tobytes()).hexdigest()


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    # 4:4:4 chroma: small images of coloured shapes lose their colours' edges under 4:2:0.
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()
