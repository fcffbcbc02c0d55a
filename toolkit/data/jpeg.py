# JPEG decoding and encoding for shards: simplejpeg (libjpeg-turbo) when installed, PIL otherwise.
"""Decoders raise `CorruptImageError` for data they cannot decode completely (a truncated or damaged
JPEG is never returned half-grey). `normalise_face_image` is the converters' gate: any input image
becomes a JPEG of the target size, or is refused."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

try:
    import simplejpeg
except ImportError:  # optional speed-up; PIL decodes the same files about half as fast
    simplejpeg = None

_JPEG_MAGIC = b"\xff\xd8"
ENCODE_QUALITY = 95


class CorruptImageError(ValueError):
    """Bytes that do not decode to a whole image."""


def available_decoders() -> list[str]:
    return (["simplejpeg"] if simplejpeg is not None else []) + ["pil"]


def resolve_decoder(name: str) -> str:
    """'auto' picks simplejpeg when installed; asking for a missing decoder is an error naming it."""
    if name == "auto":
        return "simplejpeg" if simplejpeg is not None else "pil"
    if name not in available_decoders():
        raise ValueError(f"JPEG decoder {name!r} is not available here (installed: {available_decoders()}); "
                         "pip install simplejpeg")
    return name


def _decode_pil(data: bytes) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # raises on truncated data (LOAD_TRUNCATED_IMAGES is off)
            return np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise CorruptImageError(f"cannot decode image ({exc})") from None


def decode_rgb(data: bytes, decoder: str = "simplejpeg") -> np.ndarray:
    """H x W x 3 uint8 RGB. JPEGs go through `decoder`; other formats (PNG, ...) through PIL."""
    if decoder == "simplejpeg" and data[:2] == _JPEG_MAGIC:
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
        except ValueError as exc:
            # CMYK/YCCK JPEGs are valid but libjpeg-turbo will not convert them to RGB: PIL does.
            if "color conversion" not in str(exc).lower() and "colorspace" not in str(exc).lower():
                raise CorruptImageError(f"cannot decode JPEG ({exc})") from None
    return _decode_pil(data)


def encode_jpeg(rgb_HW3: np.ndarray, quality: int = ENCODE_QUALITY) -> bytes:
    rgb_HW3 = np.ascontiguousarray(rgb_HW3)
    if simplejpeg is not None:
        return simplejpeg.encode_jpeg(rgb_HW3, quality=quality, colorspace="RGB")
    buffer = io.BytesIO()
    Image.fromarray(rgb_HW3).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _is_plain_jpeg(data: bytes) -> bool:
    """A JPEG every decoder reads the same way (YCbCr or grayscale; not CMYK/YCCK)."""
    if data[:2] != _JPEG_MAGIC:
        return False
    if simplejpeg is None:
        return True
    try:
        return simplejpeg.decode_jpeg_header(data)[2] in ("YCbCr", "Gray", "RGB")
    except ValueError:
        return False


def normalise_face_image(data: bytes, image_size: int, decoder: str = "auto") -> tuple[bytes, str]:
    """(JPEG bytes of an image_size x image_size face, what was done: 'copied' or 'reencoded').

    A JPEG of the right size that decodes completely is copied byte for byte; anything else that
    decodes (other sizes, PNG, grayscale, CMYK) is converted to RGB, resized and encoded as JPEG.
    """
    rgb = decode_rgb(data, resolve_decoder(decoder))
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
        raise CorruptImageError(f"decoded image has shape {rgb.shape}, expected H x W x 3")
    if rgb.shape[:2] == (image_size, image_size) and _is_plain_jpeg(data):
        return data, "copied"
    if rgb.shape[:2] != (image_size, image_size):
        rgb = np.asarray(Image.fromarray(rgb).resize((image_size, image_size), Image.Resampling.BICUBIC))
    return encode_jpeg(rgb), "reencoded"
