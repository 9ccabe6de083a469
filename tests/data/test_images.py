"""Every image mode users bring decodes to a sensible RGB image or a clear error,
and images above Pillow's decompression-bomb limit are refused by name unless
allowed."""
import numpy as np
import pytest
from PIL import Image

from ncl_fast.check_data import main as check_data_main
from ncl_fast.data import ImageTooLargeError, UnsupportedImageError, allow_large_images, read_image, read_mask

H, W = 24, 40


def ramp(rng, high):
    """A random (H, W) array in [0, high] that uses both ends of the range."""
    a = rng.integers(0, high + 1, (H, W))
    a.flat[0], a.flat[1] = 0, high
    return a


def gray3(g):
    return np.repeat(np.asarray(g)[..., None], 3, axis=2)


def cases(rng):
    """(mode name, writer(path) -> file, expected uint8 RGB, tolerance)."""
    rgb = ramp(rng, 255)[..., None].repeat(3, 2)
    rgb[..., 1] = 255 - rgb[..., 1]
    rgb[..., 2] = ramp(rng, 255)
    rgb = rgb.astype(np.uint8)
    g8 = ramp(rng, 255).astype(np.uint8)
    g16 = ramp(rng, 65535).astype(np.uint16)
    bits = rng.random((H, W)) < 0.5
    alpha = ramp(rng, 255).astype(np.uint8)
    palette = rng.integers(0, 256, (256, 3)).astype(np.uint8)
    index = ramp(rng, 255).astype(np.uint8)

    def save(img, name):
        def write(folder):
            path = folder / name
            img.save(path)
            return path
        return write

    p_img = Image.fromarray(index, "L").convert("P")
    p_img.putpalette(palette.reshape(-1).tolist())
    yield "1", save(Image.fromarray(bits), "bits.png"), gray3(np.where(bits, 255, 0)), 0
    yield "L", save(Image.fromarray(g8), "gray.png"), gray3(g8), 0
    yield "P", save(p_img, "palette.png"), palette[index], 0
    yield "LA", save(Image.fromarray(np.stack([g8, alpha], 2), "LA"), "la.png"), gray3(g8), 0
    yield "RGBA", save(Image.fromarray(np.concatenate([rgb, alpha[..., None]], 2), "RGBA"), "rgba.png"), rgb, 0
    yield "CMYK", save(Image.fromarray(rgb).convert("CMYK"), "cmyk.tif"), rgb, 0
    yield "YCbCr", save(Image.fromarray(rgb).convert("YCbCr"), "ycbcr.tif"), rgb, 3  # colour-space rounding
    yield "I;16", save(Image.fromarray(g16), "gray16.png"), gray3(np.rint(g16 / 257.0)), 0
    yield "I (16-bit values)", save(Image.fromarray(g16.astype(np.int32)), "int16.tif"), gray3(np.rint(g16 / 257.0)), 0
    yield "I (8-bit values)", save(Image.fromarray(g8.astype(np.int32)), "int8.tif"), gray3(g8), 0
    f01 = rng.random((H, W)).astype(np.float32)
    yield "F in [0, 1]", save(Image.fromarray(f01), "float01.tif"), gray3(np.rint(f01 * 255)), 0
    f255 = (rng.random((H, W)) * 255).astype(np.float32)
    f255.flat[0] = 254.9  # above 1: the 0-255 range
    yield "F in [0, 255]", save(Image.fromarray(f255), "float255.tif"), gray3(np.rint(f255)), 0


def test_every_mode_decodes_to_sensible_rgb(tmp_path):
    rng = np.random.default_rng()
    seen = []
    for name, write, expected, tol in cases(rng):
        path = write(tmp_path)
        got = read_image(str(path))
        assert got.dtype == np.uint8 and got.shape == (H, W, 3), name
        err = np.abs(got.astype(int) - expected.astype(int)).max()
        assert err <= tol, f"{name}: off by {err}"
        seen.append(Image.open(path).mode)
    assert {"1", "L", "P", "LA", "RGBA", "CMYK", "YCbCr", "I;16", "I", "F"} <= set(seen)


def test_16_bit_rgb_tiff(tmp_path):
    tifffile = pytest.importorskip("tifffile")  # installed with scikit-image, a dependency
    rgb16 = np.random.default_rng().integers(0, 65536, (H, W, 3)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16)
    got = read_image(str(tmp_path / "rgb16.tif")).astype(int)
    assert np.abs(got - rgb16 / 257.0).max() <= 1.0  # the high byte: within one level of exact scaling


def test_16_bit_masks_read_by_value(tmp_path):
    m = np.zeros((H, W), np.uint16)
    m[4:12, 8:20] = 65535
    m[14:20, 8:20] = 1000  # dark grey in 16 bits: authentic
    Image.fromarray(m).save(tmp_path / "mask16.png")
    assert np.array_equal(read_mask(str(tmp_path / "mask16.png")), m > 32767)


@pytest.mark.parametrize("values, why", [
    (np.array([[-5.0, 300.0]]), "fit no standard range"),
    (np.array([[0.0, np.nan]]), "NaN"),
])
def test_float_images_out_of_range_are_refused_by_name(tmp_path, values, why):
    img = np.zeros((H, W), np.float32)
    img[:1, :2] = values
    Image.fromarray(img).save(tmp_path / "weird.tif")
    with pytest.raises(UnsupportedImageError, match=rf"weird.tif: .*{why}"):
        read_image(str(tmp_path / "weird.tif"))


def test_int_image_beyond_16_bits_is_refused(tmp_path):
    img = np.zeros((H, W), np.int32)
    img[0, 0] = 70000
    Image.fromarray(img).save(tmp_path / "wide.tif")
    with pytest.raises(UnsupportedImageError, match="wide.tif: a I image with values from 0 to 70000"):
        read_image(str(tmp_path / "wide.tif"))


@pytest.mark.parametrize("limit", [1000, 400])  # 24x40 = 960 px: Pillow warns above the limit, raises above twice it
def test_images_above_the_pixel_limit_are_refused_by_name(tmp_path, monkeypatch, limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit // 2 + 1 if limit == 1000 else limit)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(ImageTooLargeError, match=r"big.png: too large .*--allow-large-images"):
        read_image(str(tmp_path / "big.png"))
    allow_large_images(True)
    assert read_image(str(tmp_path / "big.png")).shape == (H, W, 3)


def test_check_data_names_large_images_and_allows_them(tmp_path, monkeypatch, capsys):
    (tmp_path / "ds" / "Tp").mkdir(parents=True)
    (tmp_path / "ds" / "Gt").mkdir()
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "ds" / "Tp" / "a.png")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "ds" / "Gt" / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    assert check_data_main([str(tmp_path / "ds")]) == 2
    out = capsys.readouterr().out
    assert "Tp/a.png: too large" in out and "--allow-large-images" in out and "Traceback" not in out
    assert check_data_main([str(tmp_path / "ds"), "--allow-large-images"]) == 0
