"""The one image decoder (m2snet.data.images): bit depths, masks as labels, the pixel cap."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from m2snet.data.images import ImageError, ImageTooLarge, check_image, decode_image, read_mask, read_rgb

GREY = (np.arange(48 * 40).reshape(40, 48) % 256).astype(np.uint8)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_8bit_images_come_back_exactly_as_decoded():
    rgb = np.stack([GREY, GREY[::-1], 255 - GREY], axis=2)
    assert np.array_equal(read_rgb(_png(rgb)), rgb)
    decoded = decode_image(_png(GREY))
    assert decoded.format == "PNG" and decoded.source_mode == "L" and np.array_equal(np.asarray(decoded.image), GREY)


def test_16bit_png_and_tiff_and_float_tiff_scale_to_the_8bit_picture(tmp_path):
    tifffile.imwrite(tmp_path / "rgb16.tif", np.stack([GREY] * 3, axis=2).astype(np.uint16) * 257)
    tifffile.imwrite(tmp_path / "float.tif", GREY.astype(np.float32) / 255)
    assert np.array_equal(read_rgb(_png(GREY.astype(np.uint16) * 257))[..., 0], GREY)
    assert np.array_equal(read_rgb(tmp_path / "rgb16.tif")[..., 1], GREY)
    assert np.array_equal(read_rgb(tmp_path / "float.tif")[..., 2], GREY)
    tifffile.imwrite(tmp_path / "hdr.tif", GREY.astype(np.float32) * 4)
    with pytest.raises(ImageError, match=r"hdr.tif: floating-point image with values outside \[0, 1\]"):
        read_rgb(tmp_path / "hdr.tif")


@pytest.mark.parametrize("stored, expect", [
    (np.array([[0, 1], [2, 3]], np.uint16), [[0, 1], [2, 3]]),  # class ids at 16 bits: kept
    (np.array([[0, 65535], [0, 65535]], np.uint16), [[0, 255], [0, 255]]),  # two-level: 0/255
    (np.array([[0, 257 * 80], [257 * 160, 65535]], np.uint16), [[0, 80], [160, 255]]),  # 8-bit mask * 257
])
def test_16bit_masks_are_labels(stored, expect):
    assert read_mask(_png(stored)).tolist() == expect


def test_the_pixel_cap_is_read_from_the_header(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    path.write_bytes(_png(GREY))
    assert check_image(path) == (48, 40)
    monkeypatch.setenv("M2SNET_MAX_PIXELS", "1000")
    with pytest.raises(ImageTooLarge, match=r"x.png: image is 48x40 = 1920 pixels, above the limit of 1000"):
        check_image(path)
    # The header alone decides: a file cut after its header is refused as too large, not as truncated.
    noise = _png(np.random.default_rng(0).integers(0, 256, (40, 48), dtype=np.uint8))
    path.write_bytes(noise[: len(noise) // 2])
    with pytest.raises(ImageTooLarge):
        decode_image(path)
