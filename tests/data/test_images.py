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


# ---- the decoders: torchvision's JPEG decoder where its pixels equal Pillow's, Pillow elsewhere -------------------

def photo(rng, h, w, channels=3):
    """A photo-like uint8 image: smooth structure plus noise (JPEG's chroma subsampling and
    quantization both matter on it)."""
    base = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, channels), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(base.squeeze(2) if channels == 1 else base).resize((w, h), Image.BICUBIC))
    return np.clip(smooth.astype(int) + rng.integers(-25, 26, smooth.shape), 0, 255).astype(np.uint8)


JPEG_KINDS = {
    "baseline 4:2:0 q90": dict(quality=90),
    "baseline 4:2:2 q75": dict(quality=75, subsampling=1),
    "baseline 4:4:4 q100": dict(quality=100, subsampling=0),
    "progressive q90": dict(quality=90, progressive=True),
    "progressive 4:4:4 q95": dict(quality=95, progressive=True, subsampling=0),
    "optimized huffman": dict(quality=85, optimize=True),
    "restart markers": dict(quality=90, restart_marker_blocks=3),
}


@pytest.mark.parametrize("gray", [False, True], ids=["RGB", "greyscale"])
@pytest.mark.parametrize("kind", sorted(JPEG_KINDS))
def test_jpegs_decode_as_pillow_does(tmp_path, kind, gray):
    from ncl_fast.data.sources import decode_jpeg

    rng = np.random.default_rng()
    for h, w in ((37, 53), (int(rng.integers(200, 320)), int(rng.integers(300, 480)))):  # odd and MCU-straddling
        path = str(tmp_path / f"{h}x{w}.jpg")
        Image.fromarray(photo(rng, h, w, 1 if gray else 3)).save(path, "JPEG", **JPEG_KINDS[kind])
        with Image.open(path) as im:
            assert im.mode == ("L" if gray else "RGB")
            pillow = np.asarray(im.convert("RGB"))
            fast = decode_jpeg(im, path)
        assert fast is not None, "this JPEG should take torchvision's decoder"
        assert fast.shape == pillow.shape and np.array_equal(fast, pillow), \
            f"{kind} {h}x{w}: {(fast != pillow).sum()} values differ, by up to {np.abs(fast - pillow.astype(int)).max()}"
        assert np.array_equal(read_image(path), pillow)
        if gray:  # masks: the grey values themselves
            with Image.open(path) as im:
                assert np.array_equal(decode_jpeg(im, path, gray=True), np.asarray(im))


def other_files(rng):
    """(name, writer(folder) -> path): every file kind Pillow decodes (and torchvision's decoder does not)."""
    rgb, g = photo(rng, 29, 41), photo(rng, 29, 41, 1)
    palette = Image.fromarray(g).convert("P")
    palette.putpalette(rng.integers(0, 256, 768).tolist())

    def save(img, name, **kw):
        def write(folder):
            img.save(folder / name, **kw)
            return folder / name
        return write

    yield "CMYK JPEG", save(Image.fromarray(rgb).convert("CMYK"), "cmyk.jpg", quality=90)
    yield "RGB PNG", save(Image.fromarray(rgb), "rgb.png")
    yield "RGBA PNG", save(Image.fromarray(np.concatenate([rgb, g[..., None]], 2), "RGBA"), "rgba.png")
    yield "L PNG", save(Image.fromarray(g), "l.png")
    yield "LA PNG", save(Image.fromarray(np.stack([g, g], 2), "LA"), "la.png")
    yield "1-bit PNG", save(Image.fromarray(g > 128), "bits.png")
    yield "P PNG", save(palette, "p.png")
    yield "P PNG with transparency", save(palette, "p_trns.png", transparency=3)
    yield "4-bit P PNG", save(palette.quantize(16), "p4.png", bits=4)
    yield "RGB BMP", save(Image.fromarray(rgb), "rgb.bmp")
    yield "RGB TIFF", save(Image.fromarray(rgb), "rgb.tif")
    yield "RGB WebP (lossless)", save(Image.fromarray(rgb), "rgb.webp", lossless=True)


def test_other_files_decode_through_pillow(tmp_path):
    from ncl_fast.data.sources import decode_jpeg

    for name, write in other_files(np.random.default_rng()):
        path = str(write(tmp_path))
        with Image.open(path) as im:
            assert decode_jpeg(im, path) is None, f"{name}: only RGB and greyscale JPEGs take torchvision's decoder"
            pillow = np.asarray(im.convert("RGB"))
        assert np.array_equal(read_image(path), pillow), name


def test_rgb_images_are_not_converted(tmp_path, monkeypatch):
    """An RGB image's pixels are read as they are: no `convert("RGB")` copy."""
    rgb = photo(np.random.default_rng(), 21, 34)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    monkeypatch.setattr(Image.Image, "convert", lambda *a, **k: pytest.fail("convert() called on an RGB image"))
    assert np.array_equal(read_image(str(tmp_path / "rgb.png")), rgb)


@pytest.mark.parametrize("name, gray", [("cut.jpg", False), ("cut_grey.jpg", True), ("cut.png", True)])
def test_damaged_files_keep_their_error(tmp_path, name, gray):
    """Cut short, an image or a mask is refused by name, as Pillow refuses it, whichever decoder ran."""
    Image.fromarray(photo(np.random.default_rng(), 64, 96, 1 if gray else 3)).save(tmp_path / "whole", "JPEG" if name.endswith("jpg") else "PNG")
    data = (tmp_path / "whole").read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) * 2 // 3])
    for read in (read_image, read_mask):
        with pytest.raises(UnsupportedImageError, match=rf"{name}: .*image file is truncated"):
            read(str(tmp_path / name))


def test_jpegs_above_the_pixel_limit_are_refused_by_name(tmp_path, monkeypatch):
    Image.fromarray(photo(np.random.default_rng(), H, W)).save(tmp_path / "big.jpg", quality=90)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 960 px: more than twice the limit
    with pytest.raises(ImageTooLargeError, match=r"big.jpg: too large .*--allow-large-images"):
        read_image(str(tmp_path / "big.jpg"))
    with pytest.raises(ImageTooLargeError, match=r"big.jpg: too large"):
        read_mask(str(tmp_path / "big.jpg"))
    allow_large_images(True)
    assert read_image(str(tmp_path / "big.jpg")).shape == (H, W, 3)


# ---- the mask rule in integer arithmetic ---------------------------------------------------------------------------

def float_rule(path):
    """The former rule, as the oracle: Pillow's pixels (`to_rgb`), mean over RGB in float32, > 127.5."""
    from ncl_fast.data.sources import to_rgb

    with Image.open(path) as im:
        return to_rgb(im, str(path)).astype(np.float32).mean(axis=2) > 127.5


#: RGB triplets around the threshold: R + G + B = 382 is authentic, 383 tampered.
EDGES = np.array([[127, 127, 128], [127, 128, 128], [128, 127, 127], [128, 128, 127], [255, 127, 0], [255, 127, 1],
                  [0, 127, 255], [1, 127, 255], [127, 127, 127], [128, 128, 128], [0, 0, 0], [255, 255, 255],
                  [126, 128, 128], [129, 127, 127], [255, 255, 0]], dtype=np.uint8)


def test_integer_threshold_equals_the_float_rule():
    from ncl_fast.data import tampered

    rgb = np.concatenate([EDGES, np.random.default_rng().integers(0, 256, (200_000, 3), dtype=np.uint8)])[None]
    sums = rgb.astype(int).sum(-1)
    assert set(sums[0, : len(EDGES)]) >= {382, 383}
    oracle = rgb.astype(np.float32).mean(axis=2) > 127.5
    assert np.array_equal(tampered(rgb), oracle)
    assert not tampered(EDGES[None, :1])[0, 0] and tampered(EDGES[None, 1:2])[0, 0]  # 382 | 383
    gray = np.arange(256, dtype=np.uint8)[None]  # every grey level
    assert np.array_equal(tampered(gray), np.repeat(gray[..., None], 3, 2).astype(np.float32).mean(2) > 127.5)
    assert not tampered(gray)[0, 127] and tampered(gray)[0, 128]
    bits = np.random.default_rng().random((5, 7)) < 0.5
    assert np.array_equal(tampered(bits), bits)


def edge_masks(rng):
    """(name, writer(folder) -> path): a mask in every mode `to_rgb` reads, its values at the rule's edges."""
    n = H * W
    rgb = np.concatenate([EDGES, rng.integers(0, 256, (n - len(EDGES), 3), dtype=np.uint8)])[rng.permutation(n)]
    rgb = rgb.reshape(H, W, 3)
    g8 = rng.choice(np.array([0, 126, 127, 128, 129, 255], np.uint8), (H, W))
    alpha = rng.integers(0, 256, (H, W), dtype=np.uint8)
    g16 = rng.choice(np.array([0, 32639, 32767, 32768, 32896, 65535], np.uint16), (H, W))  # 127 * 257, 128 * 257
    palette = Image.fromarray(rng.integers(0, len(EDGES), (H, W)).astype(np.uint8), "L").convert("P")
    palette.putpalette(np.resize(EDGES, (256, 3)).reshape(-1).tolist())

    def save(img, name, **kw):
        def write(folder):
            img.save(folder / name, **kw)
            return folder / name
        return write

    yield "1", save(Image.fromarray(rng.random((H, W)) < 0.5), "m1.png")
    yield "L", save(Image.fromarray(g8), "ml.png")
    yield "L TIFF", save(Image.fromarray(g8), "ml.tif")
    yield "P", save(palette, "mp.png")
    yield "LA", save(Image.fromarray(np.stack([g8, alpha], 2), "LA"), "mla.png")
    yield "RGB", save(Image.fromarray(rgb), "mrgb.png")
    yield "RGB BMP", save(Image.fromarray(rgb), "mrgb.bmp")
    yield "RGBA", save(Image.fromarray(np.concatenate([rgb, alpha[..., None]], 2), "RGBA"), "mrgba.png")
    yield "CMYK", save(Image.fromarray(rgb).convert("CMYK"), "mcmyk.tif")
    yield "YCbCr", save(Image.fromarray(rgb).convert("YCbCr"), "mycc.tif")
    yield "I;16", save(Image.fromarray(g16), "m16.png")
    yield "I", save(Image.fromarray(g16.astype(np.int32)), "mi.tif")
    yield "F", save(Image.fromarray(g8.astype(np.float32)), "mf.tif")
    yield "RGB JPEG", save(Image.fromarray(rgb), "mrgb.jpg", quality=95)
    yield "L JPEG", save(Image.fromarray(g8), "ml.jpg", quality=95)


def test_masks_in_every_mode_follow_the_float_rule(tmp_path):
    seen = set()
    for name, write in edge_masks(np.random.default_rng()):
        path = write(tmp_path)
        expected = float_rule(path)
        assert 0 < expected.sum() < expected.size, f"{name}: the mask should mix both classes"
        assert np.array_equal(read_mask(str(path)), expected), name
        assert np.array_equal(read_mask(str(path), invert=True), ~expected), f"{name} (--invert-masks)"
        seen.add(Image.open(path).mode)
    assert {"1", "L", "P", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I", "F"} <= seen
