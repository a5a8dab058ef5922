"""`to_rgb`: the one conversion to 8-bit RGB that sharding, the shard readers, the image store and
`ecvl predict` share."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ecvl.data.image_store import ImageStore, ImageStoreWriter
from ecvl.data.pixels import decode_npy, to_rgb
from ecvl.data.reader import decode_image
from ecvl.data.shards import image_member
from ecvl.data.sources import Split


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


GRADIENT16 = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)


def test_a_16_bit_png_is_scaled_by_its_bit_depth_not_clipped():
    image = Image.open(io.BytesIO(_png(Image.fromarray(GRADIENT16))))
    assert image.mode == "I;16"
    rgb = np.asarray(to_rgb(image))
    want = np.rint(GRADIENT16 / 257.0).astype(np.uint8)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], want) and np.array_equal(rgb[..., 2], want)
    assert (rgb == 255).mean() < 0.01  # PIL's own convert makes 99.6% of it white
    assert (np.asarray(image.convert("RGB")) == 255).mean() > 0.99


@pytest.mark.parametrize(
    ("values", "mode", "want"),
    [
        (np.array([[0, 128, 255]], np.int32), "I", [0, 128, 255]),  # 8-bit values as they are
        (np.array([[0, 32768, 65535]], np.int32), "I", [0, 128, 255]),  # 16-bit range
        (np.array([[-100, 0, 100]], np.int32), "I", [0, 127, 255]),  # min to max
        (np.array([[0.0, 0.5, 1.0]], np.float32), "F", [0, 128, 255]),  # [0, 1] floats
        (np.array([[0.0, 100.0, 255.0]], np.float32), "F", [0, 100, 255]),
        (np.array([[-1.0, np.nan, 3.0]], np.float32), "F", [0, 64, 255]),  # nan -> 0
        (np.array([[7, 7, 7]], np.int32), "I", [7, 7, 7]),
        (np.array([[-5, -5]], np.int32), "I", [0, 0]),  # constant outside every range
    ],
)
def test_32_bit_modes_are_scaled_by_their_range(values, mode, want):
    image = Image.fromarray(values, mode)
    assert image.mode == mode
    assert np.asarray(to_rgb(image))[0, :, 1].tolist() == want


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "P", "PA", "1"])
def test_other_modes_convert_as_pil_converts_them(mode):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8), "RGBA")
    if mode in ("P", "PA"):
        image = image.convert("RGB").quantize(16)
        image.info["transparency"] = 3  # palette with a transparent entry
        if mode == "PA":
            image = image.convert("PA")
    else:
        image = image.convert(mode)
    assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB")))


def test_every_reader_of_images_uses_the_same_conversion(tmp_path):
    data = _png(Image.fromarray(GRADIENT16))
    want = np.asarray(to_rgb(Image.open(io.BytesIO(data))))
    # ecvl shard storing raw pixels of a file source
    path = tmp_path / "g.png"
    path.write_bytes(data)
    member, ext = image_member(Split(["g"], np.array([0]), paths=[path]), 0, "raw")
    assert ext == "npy" and np.array_equal(decode_npy(member), want)
    # shard readers and ecvl predict (the file's own bytes)
    assert np.array_equal(np.asarray(decode_image(data, "g", "png")), want)
    # the train image store stage II reads
    with ImageStoreWriter(tmp_path / "s.h5", 1) as w:
        w.write(0, [data], np.array([0]), ["g"])
        w.mark_complete()
    assert np.array_equal(np.asarray(ImageStore(tmp_path / "s.h5").get_image(0)), want)
