"""Raw pixel members: a sample's image as an H×W×C uint8 `.npy` array instead of PNG bytes.

Small images (CIFAR, digits: 32 px) cost more to decode from PNG than to train on; as raw
arrays a sample is read with no decoder at all (FFCV's lesson). A 32 px RGB image is 3,200
bytes as `.npy` against ~2,300 as PNG, so shards grow by about a third.

Reading is safe by construction: only `np.lib.format`'s header parser runs (never
`allow_pickle`), and the dtype must be `uint8` with shape H×W×1 or H×W×3, so an object array
or any other payload is refused. Arrays whose header was seen before (every sample of a
dataset usually shares one) skip the header parse: the bytes are viewed in place.

`to_rgb` is the one conversion of a decoded image to 8-bit RGB, shared by `ecvl shard`, the
shard readers, the train image store and `ecvl predict`, so an image means the same to each.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

RAW_EXT = "npy"
# How `ecvl shard` stores images (see `ecvl.data.shards.resolve_encoding`); here, not in
# shards.py, so that params validation can name them without importing torch.
ENCODINGS = ("auto", "png", "raw")
MAX_RAW_SIDE = 64  # `auto` stores raw pixels up to this side
_MAGIC = b"\x93NUMPY"
_HEADER_CACHE: dict[bytes, tuple[int, tuple[int, ...], int]] = {}  # header -> offset, shape, size
_CACHE_MAX = 64


def encode_npy(image: np.ndarray) -> bytes:
    """Deterministic `.npy` bytes of an H×W×C uint8 array (C-order, no pickle)."""
    array = np.ascontiguousarray(image)
    _check_array(array.dtype, array.shape, "array")
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes | memoryview) -> np.ndarray:
    """The H×W×C uint8 array of `.npy` bytes (read-only view, no copy when the bytes are).

    Raises:
        ValueError: not a `.npy` array, or not uint8 H×W×{1,3}, or the data is cut short.
    """
    view = memoryview(data)
    head = bytes(view[: _header_end(view)])
    cached = _HEADER_CACHE.get(head)
    if cached is None:
        offset, shape = _parse_header(view)
        cached = offset, shape, shape[0] * shape[1] * shape[2]
        if len(_HEADER_CACHE) < _CACHE_MAX:
            _HEADER_CACHE[head] = cached
    offset, shape, size = cached
    if len(view) - offset != size:
        raise ValueError(f".npy holds {len(view) - offset} bytes of pixels, its header says {size}")
    return np.frombuffer(view, dtype=np.uint8, count=size, offset=offset).reshape(shape)


def decode_rgb(data: bytes | memoryview) -> np.ndarray:
    """`decode_npy`, with a one-channel image repeated to H×W×3 (RGB, as PIL's convert).

    Raises:
        ValueError: as `decode_npy`.
    """
    pixels = decode_npy(data)
    return pixels if pixels.shape[2] == 3 else np.repeat(pixels, 3, axis=2)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as an 8-bit RGB PIL image (a new one, loaded: the caller may close `image`).

    PIL's own `convert("RGB")` clips the wide modes to 255: a full-range 16-bit PNG comes out
    nearly white. Here they are scaled instead, grey repeated to three channels:

    - `I;16` (16-bit PNG and others): by the bit depth, v * 255 / 65535, so dark stays dark;
    - `I` (32-bit integer) and `F` (32-bit float): by the smallest range that holds every
      value: [0, 255] as it is, [0, 65535] as 16 bits, [0, 1] for floats; anything else
      (negative values, larger ones) stretched from its minimum to its maximum. Non-finite
      float values become 0.

    Every other mode (L, LA, P with or without transparency, RGBA, CMYK, 1, ...) goes through
    PIL's `convert("RGB")`: alpha dropped, palettes looked up, CMYK converted as PIL does.
    """
    from PIL import Image

    mode = image.mode
    if not (mode.startswith("I") or mode.startswith("F")):
        return image.convert("RGB")
    grey = _wide_to_uint8(np.asarray(image), mode)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")


def _wide_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    v = values.astype(np.float64)
    finite = np.isfinite(v)
    v[~finite] = 0.0
    lo, hi = (float(v[finite].min()), float(v[finite].max())) if finite.any() else (0.0, 0.0)
    if mode.startswith("I;16"):
        low, top = 0.0, 65535.0
    elif mode.startswith("F") and lo >= 0 and hi <= 1:
        low, top = 0.0, 1.0
    elif lo >= 0 and hi <= 255:
        low, top = 0.0, 255.0
    elif lo >= 0 and hi <= 65535:
        low, top = 0.0, 65535.0
    else:
        low, top = lo, hi
    scaled = (v - low) * (255.0 / (top - low)) if top > low else np.zeros_like(v)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _header_end(view: memoryview) -> int:
    """Where the pixels start, from the fixed preamble (0 when it is not a `.npy` preamble:
    the full parser then says what is wrong)."""
    if bytes(view[:6]) != _MAGIC or len(view) < 12:
        return 0
    if view[6] == 1:
        return 10 + int.from_bytes(view[8:10], "little")
    return 12 + int.from_bytes(view[8:12], "little")


def _parse_header(view: memoryview) -> tuple[int, tuple[int, ...]]:
    f = io.BytesIO(view)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except ValueError as e:
        raise ValueError(f"not a .npy array ({e})") from None
    if fortran:
        raise ValueError(".npy array in Fortran order (expected C order)")
    _check_array(dtype, shape, ".npy array")
    return f.tell(), tuple(int(s) for s in shape)


def _check_array(dtype: np.dtype, shape: tuple[int, ...], what: str) -> None:
    if dtype != np.uint8:
        raise ValueError(f"{what} has dtype {dtype}, expected uint8")
    if len(shape) != 3 or shape[2] not in (1, 3) or min(shape) < 1:
        raise ValueError(f"{what} has shape {tuple(shape)}, expected H×W×1 or H×W×3")


__all__ = [
    "ENCODINGS",
    "MAX_RAW_SIDE",
    "RAW_EXT",
    "decode_npy",
    "decode_rgb",
    "encode_npy",
    "to_rgb",
]
