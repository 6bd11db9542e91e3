"""fmnist.imaging: every error code with real bytes, every mode and format, the inversion rule;
and its fast path for greyscale PNGs (fmnist.imaging.png), against Pillow's path."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import struct
import subprocess
import sys
import textwrap
import time
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from fmnist import config, data, imaging
from fmnist.config import ImagingConfig
from fmnist.data import CLASS_NAMES
from fmnist.errors import ConfigError, ImageError
from fmnist.imaging import png

CFG = ImagingConfig()
ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nnewpath 0 0 moveto showpage\n"
SVG = (b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" '
       b'width="28" height="28"><rect width="28" height="28"/></svg>\n')


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


# Prepended to a child script: it calls limit_address_space() after its imports, and from then
# on may grow by 256 MiB at most (RLIMIT_AS), so an unbounded allocation fails fast.
_ADDRESS_SPACE_LIMIT = textwrap.dedent("""
    import pathlib, resource

    def limit_address_space():
        status = pathlib.Path("/proc/self/status").read_text()
        used = int(next(l.split()[1] for l in status.splitlines() if l.startswith("VmSize")))
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, (used * 1024 + 256 * 2**20, hard))
""")


def run_in_small_address_space(child: str, *args: str) -> list[str]:
    """Run ``child`` (which calls ``limit_address_space()``) in a fresh Python; its stdout lines."""
    result = subprocess.run([sys.executable, "-c", _ADDRESS_SPACE_LIMIT + child, *args],
                            capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.split("\n")


def error_of(payload: bytes, cfg: ImagingConfig = CFG) -> ImageError:
    with pytest.raises(ImageError) as caught:
        imaging.decode(payload, cfg)
    return caught.value


def square(mode: str = "L", size: tuple[int, int] = (28, 28), background: object = 0,
           colour: object = 255, box: tuple[int, int, int, int] = (8, 8, 20, 20)) -> Image.Image:
    """A ``colour`` rectangle (left, top, right, bottom; exclusive) on ``background``."""
    image = Image.new(mode, size, background)
    image.paste(colour, box)
    return image


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header promising width x height 8-bit grey pixels, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)
    return (PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def patched(payload: bytes, offset: int, value: bytes) -> bytes:
    return payload[:offset] + value + payload[offset + len(value):]


def huge_header(fmt: str) -> bytes:
    """A real 8x8 file of ``fmt`` whose header is edited to claim a huge size."""
    if fmt == "WEBP-VP8X":  # extended WebP (here: lossy with alpha); 24-bit canvas size - 1
        small = encode(Image.new("RGBA", (8, 8), 0), "WEBP")
        assert small[12:16] == b"VP8X"
        return patched(small, 24, (16383).to_bytes(3, "little") * 2)
    small = encode(Image.new("L", (8, 8), 0), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    if fmt == "GIF":
        return patched(small, 6, struct.pack("<HH", 60000, 60000))
    if fmt == "BMP":
        return patched(small, 18, struct.pack("<ii", 30000, -30000))
    if fmt == "JPEG":
        sof = small.index(b"\xff\xc0")
        return patched(small, sof + 5, struct.pack(">HH", 30000, 30000))
    if fmt == "WEBP":  # VP8L: 14 bits width-1, 14 bits height-1
        assert small[12:16] == b"VP8L"
        bits = int.from_bytes(small[21:25], "little")
        return patched(small, 21, ((bits & ~0xFFFFFFF) | 0xFFFFFFF).to_bytes(4, "little"))
    return png_bomb()


@pytest.fixture(scope="module")
def test_split() -> data.Split:
    cfg = config.load()
    return data.load_split("test", data.locate(dataclasses.replace(cfg.data, download=False)))


# --- error codes ---------------------------------------------------------------------------


def test_empty_payload() -> None:
    error = error_of(b"")
    assert error.code == "empty_payload"
    assert error.hint


def test_payload_too_large_is_checked_before_the_bytes_are_read() -> None:
    class Untouchable(bytes):
        def __getitem__(self, key: object) -> bytes:
            raise AssertionError("decode read the bytes of an oversized payload")

    payload = Untouchable(encode(square()) + b"\x00" * CFG.max_payload_bytes)
    error = error_of(payload)
    assert error.code == "payload_too_large"
    assert f"{len(payload):,} bytes" in error.message
    assert "524,288 (imaging.max_payload_bytes)" in error.message
    assert "FMNIST_IMAGING__MAX_PAYLOAD_BYTES" in error.hint


def test_payload_at_the_limit_is_accepted() -> None:
    payload = encode(square())
    assert imaging.decode(payload, ImagingConfig(max_payload_bytes=len(payload))).max() == 255
    assert error_of(payload, ImagingConfig(max_payload_bytes=len(payload) - 1)).code == \
        "payload_too_large"


def test_random_bytes_are_unsupported() -> None:
    payload = b"\x07" + np.random.default_rng(0).bytes(999)
    error = error_of(payload)
    assert error.code == "unsupported_format"
    assert "not a recognised image (it starts with bytes 07 " in error.message
    assert "PNG, JPEG, BMP, GIF, WEBP (imaging.allowed_formats)" in error.message


@pytest.mark.parametrize(("payload", "named"), [
    (EPS, "an EPS/PostScript document"),
    (SVG, "an SVG drawing"),
    (b"%PDF-1.7\n1 0 obj\n", "a PDF document"),
    (encode(square(), "TIFF"), "a TIFF image"),
    (encode(square(), "ICO"), "a Windows icon (ICO)"),
    (b"<!DOCTYPE html><html><body>hi</body></html>", "an HTML page"),
])
def test_disallowed_formats_are_named_and_never_reach_pillow(
        payload: bytes, named: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pillow(*args: object, **kwargs: object) -> None:
        raise AssertionError("a disallowed format was handed to Pillow")

    monkeypatch.setattr(Image, "open", no_pillow)
    error = error_of(payload)
    assert error.code == "unsupported_format"
    assert error.message.startswith(f"The payload is {named}; accepted formats are PNG")


def test_hint_for_a_raster_format_names_the_option() -> None:
    error = error_of(encode(square(), "TIFF"))
    assert "imaging.allowed_formats" in error.hint and "FMNIST_IMAGING__ALLOWED_FORMATS" in error.hint


def test_base64_text_is_explained() -> None:
    import base64

    error = error_of(base64.b64encode(encode(square())))
    assert error.code == "unsupported_format"
    assert "base64 text of a PNG image" in error.message


def test_allowed_formats_narrow_what_is_accepted() -> None:
    jpeg = encode(square(), "JPEG")
    assert error_of(jpeg, ImagingConfig(allowed_formats=("PNG",))).code == "unsupported_format"
    assert imaging.decode(jpeg, ImagingConfig(allowed_formats=("png", "jpeg"))).shape == (28, 28)


@pytest.mark.parametrize(("fmt", "cut"), [("PNG", 0.6), ("JPEG", 0.6), ("PNG", 0.2)])
def test_truncated_files_are_undecodable(fmt: str, cut: float) -> None:
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8))
    payload = encode(photo, fmt)
    error = error_of(payload[:int(len(payload) * cut)])
    assert error.code == "undecodable_image"
    assert error.message.startswith(f"The payload has a {fmt} image signature but cannot be "
                                    "decoded:")


def test_signature_followed_by_garbage_is_undecodable() -> None:
    for signature in (PNG_SIGNATURE, b"\xff\xd8\xff\xe0", b"GIF89a", b"BM"):
        assert error_of(signature + bytes(200)).code == "undecodable_image", signature


def test_undecodable_messages_name_no_process_detail() -> None:
    """Pillow's "cannot identify image file <_io.BytesIO object at 0x...>" must not reach the
    wire: the same bad request gets the same answer from every worker."""
    first, second = (error_of(PNG_SIGNATURE + bytes(200)).message for _ in range(2))
    assert first == second
    assert "0x" not in first and "object at" not in first
    assert first.endswith("cannot be decoded: cannot identify image file.")


def test_load_truncated_images_stays_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        imaging.decode(encode(square()), CFG)


def test_png_bomb_is_refused_from_its_header_in_milliseconds() -> None:
    payload = png_bomb()
    assert len(payload) < 2000
    start = time.perf_counter()
    error = error_of(payload)
    assert time.perf_counter() - start < 0.05
    assert error.code == "image_too_large"
    assert error.message == ("PNG header says 30000x30000 = 900,000,000 pixels; the limit is "
                             "16,777,216 (imaging.max_pixels).")
    assert "FMNIST_IMAGING__MAX_PIXELS" in error.hint


@pytest.mark.parametrize("variant", ["PNG", "GIF", "BMP", "JPEG", "WEBP", "WEBP-VP8X"])
def test_huge_headers_of_every_allowed_format_are_refused(variant: str) -> None:
    fmt = variant.split("-")[0]
    start = time.perf_counter()
    error = error_of(huge_header(variant))
    assert time.perf_counter() - start < 0.05
    assert error.code == "image_too_large"
    assert error.message.startswith(f"{fmt} header says ")
    width, height = imaging._header_size(huge_header(variant), fmt)
    assert width * height > 200_000_000


@pytest.mark.parametrize(("size", "limit"), [((5000, 5000), 16_777_216), ((30000, 30000), None)])
def test_pillow_header_check_backs_up_our_parser(
        size: tuple[int, int], limit: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without our header parser, Pillow's header (or its bomb check) still refuses the file."""
    monkeypatch.setattr(imaging, "_header_size", lambda payload, fmt: None)
    error = error_of(png_bomb(*size))
    assert error.code == "image_too_large"
    if limit:
        assert f"the limit is {limit:,}" in error.message


def test_pillow_limit_caps_a_higher_configured_limit() -> None:
    error = error_of(png_bomb(), ImagingConfig(max_pixels=10**12))
    assert error.code == "image_too_large"
    assert f"the limit is {Image.MAX_IMAGE_PIXELS:,} (Pillow's Image.MAX_IMAGE_PIXELS" in \
        error.message


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux")
def test_bombs_are_refused_within_a_small_address_space(tmp_path: Path) -> None:
    """Under a 256 MiB address-space budget every bomb still gets image_too_large."""
    for variant in ("PNG", "GIF", "BMP", "JPEG", "WEBP", "WEBP-VP8X"):
        (tmp_path / f"bomb.{variant}").write_bytes(huge_header(variant))
    child = textwrap.dedent("""
        import pathlib, sys
        from fmnist import imaging
        from fmnist.config import ImagingConfig
        limit_address_space()
        for path in sorted(pathlib.Path(sys.argv[1]).iterdir()):
            try:
                imaging.decode(path.read_bytes(), ImagingConfig())
            except imaging.ImageError as exc:
                print(path.suffix, exc.code)
        try:
            bytearray(512 * 2**20)
        except MemoryError:
            print("limit bites")
    """)
    assert run_in_small_address_space(child, str(tmp_path)) == [
        ".BMP image_too_large", ".GIF image_too_large", ".JPEG image_too_large",
        ".PNG image_too_large", ".WEBP image_too_large", ".WEBP-VP8X image_too_large",
        "limit bites", ""]


def test_unknown_invert_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="imaging.invert"):
        imaging.decode(encode(square()), ImagingConfig(invert="sometimes"))


# --- sniffing ------------------------------------------------------------------------------


@pytest.mark.parametrize(("payload", "fmt"), [
    (encode(square(), "PNG"), "PNG"), (encode(square(), "JPEG"), "JPEG"),
    (encode(square(), "GIF"), "GIF"), (encode(square(), "BMP"), "BMP"),
    (encode(square(), "WEBP"), "WEBP"), (encode(square(), "TIFF"), "TIFF"),
    (encode(square(), "ICO"), "ICO"), (EPS, "EPS"), (SVG, "SVG"),
    (b"\xef\xbb\xbf  <svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"),
    (b"<?xml version='1.0'?><feed/>", "XML"), (b"%PDF-1.4", "PDF"),
    (b"P5\n28 28\n255\n", "PPM"), (b"\x00\x00\x00\x1cftypavif", "AVIF"),
    (b"\x00\x00\x00\x18ftypheic", "HEIF"), (b"hello", None), (b"", None),
])
def test_sniff_format(payload: bytes, fmt: str | None) -> None:
    assert imaging.sniff_format(payload) == fmt


# --- formats and modes ---------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "options"), [
    ("PNG", {}), ("BMP", {}), ("GIF", {}), ("WEBP", {"lossless": True}),
])
def test_lossless_formats_round_trip_exactly(fmt: str, options: dict[str, object],
                                             test_split: data.Split) -> None:
    pixels = test_split.images[0]
    decoded = imaging.decode(encode(Image.fromarray(pixels), fmt, **options), CFG)
    assert decoded.dtype == np.float32 and decoded.shape == (28, 28)
    np.testing.assert_array_equal(decoded, pixels)


def test_jpeg_round_trips_closely(test_split: data.Split) -> None:
    pixels = test_split.images[0]
    decoded = imaging.decode(encode(Image.fromarray(pixels), "JPEG", quality=95), CFG)
    assert decoded.shape == (28, 28)
    assert np.abs(decoded - pixels).mean() < 3


@pytest.mark.parametrize(("image", "inside", "outside"), [
    (square("L", colour=200), 200, 0),
    (square("1", colour=1), 255, 0),
    (square("RGB", colour=(255, 0, 0)), 76, 0),  # luma of pure red: 299/1000 * 255
    (square("RGB", colour=(0, 0, 255)), 29, 0),
    (square("CMYK", background=(0, 0, 0, 255), colour=(0, 0, 0, 0)), 255, 0),
    (square("LA", background=(255, 0), colour=(180, 255)), 180, 0),
])
def test_modes_become_luma(image: Image.Image, inside: int, outside: int) -> None:
    fmt = "JPEG" if image.mode == "CMYK" else "PNG"
    decoded = imaging.decode(encode(image, fmt), CFG)
    tolerance = 2 if fmt == "JPEG" else 0
    assert abs(decoded[14, 14] - inside) <= tolerance
    assert abs(decoded[0, 0] - outside) <= tolerance


def test_palette_image_uses_its_palette() -> None:
    image = Image.new("P", (28, 28), 0)
    image.putpalette([0, 0, 0, 10, 20, 30, 255, 255, 255] + [0] * (3 * 253))
    image.paste(1, (0, 0, 14, 28))
    image.paste(2, (14, 0, 28, 28))
    for frame in ((0, 0, 28, 1), (0, 27, 28, 28), (0, 0, 1, 28), (27, 0, 28, 28)):
        image.paste(0, frame)  # a black border, so auto leaves the image as it is
    decoded = imaging.decode(encode(image), CFG)
    assert decoded[14, 5] == 18  # (10*299 + 20*587 + 30*114) / 1000 = 18.1
    assert decoded[14, 20] == 255 and decoded[0, 0] == 0


def test_palette_transparency_is_background() -> None:
    image = Image.new("P", (28, 28), 1)
    image.putpalette([0, 0, 0, 255, 255, 255] + [0] * (3 * 254))
    image.paste(0, (8, 8, 20, 20))  # black object on a transparent white field
    image.info["transparency"] = 1
    decoded = imaging.decode(encode(image, transparency=1), CFG)
    assert decoded[14, 14] == 255 and decoded[0, 0] == 0  # dark object inverted, field black


def test_sixteen_bit_grey_is_scaled() -> None:
    values = np.zeros((28, 28), np.uint16)
    values[8:20, 8:20] = 257 * 100
    values[10, 10] = 65535
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    decoded = imaging.decode(encode(image), CFG)
    assert decoded[14, 14] == 100 and decoded[10, 10] == 255 and decoded[0, 0] == 0


@pytest.mark.parametrize(("field", "obj", "expected_obj"), [
    ((255, 255, 255, 0), (255, 255, 255, 255), 255),  # white object: kept
    ((255, 255, 255, 0), (0, 0, 0, 255), 255),  # dark object (product cut-out): inverted
    ((0, 0, 0, 0), (0, 0, 0, 255), 255),
])
def test_transparent_pixels_are_background(field: tuple[int, ...], obj: tuple[int, ...],
                                           expected_obj: int) -> None:
    decoded = imaging.decode(encode(square("RGBA", background=field, colour=obj)), CFG)
    assert decoded[14, 14] == expected_obj
    assert decoded[0, 0] == 0 and decoded[7, 7] == 0


def test_partial_alpha_is_flattened() -> None:
    image = square("RGBA", background=(0, 0, 0, 255), colour=(200, 200, 200, 128))
    decoded = imaging.decode(encode(image), CFG)
    assert decoded[14, 14] == 100  # 200 * 128/255 onto black
    inverted = imaging.decode(encode(image), ImagingConfig(invert="always"))
    # inverting: flattened onto white, (200 * 128 + 255 * 127) / 255 = 227, then inverted
    assert inverted[14, 14] == 255 - 227 and inverted[0, 0] == 255


def test_fully_transparent_image_is_all_background() -> None:
    decoded = imaging.decode(encode(Image.new("RGBA", (28, 28), (255, 255, 255, 0))), CFG)
    assert not decoded.any()


def test_animations_use_the_first_frame(test_split: data.Split) -> None:
    first, second = (Image.fromarray(test_split.images[i]) for i in (0, 1))
    for fmt, options in (("GIF", {}), ("WEBP", {"lossless": True})):
        payload = encode(first, fmt, save_all=True, append_images=[second], duration=100,
                         **options)
        assert Image.open(io.BytesIO(payload)).n_frames == 2
        np.testing.assert_array_equal(imaging.decode(payload, CFG), test_split.images[0])


# --- inversion and resizing -----------------------------------------------------------------


def test_dark_on_light_photo_is_inverted_trimmed_and_centred() -> None:
    """A 600x400 white 'product photo' with a navy 150x300 garment, off centre, as JPEG."""
    photo = square("RGB", (600, 400), background=(250, 250, 250), colour=(20, 20, 60),
                   box=(100, 50, 250, 350))
    decoded = imaging.decode(encode(photo, "JPEG", quality=90), CFG)
    assert decoded.shape == (28, 28) and decoded.dtype == np.float32
    columns = np.flatnonzero(decoded.max(axis=0) > 128)
    rows = np.flatnonzero(decoded.max(axis=1) > 128)
    assert rows.tolist() == list(range(28))  # the longer side fills the frame
    assert columns[0] in (6, 7) and columns[-1] in (20, 21)  # 14 wide, centred
    assert decoded[10:18, 10:18].min() > 200  # object bright
    assert decoded[:, :5].max() < 10 and decoded[:, 23:].max() < 10  # background black


def test_small_image_is_scaled_up_to_fill_the_frame() -> None:
    decoded = imaging.decode(encode(square(size=(10, 10), box=(3, 3, 7, 7))), CFG)
    assert decoded.shape == (28, 28)
    assert decoded[2:26, 2:26].min() > 200


def test_exif_orientation_is_applied() -> None:
    bar = square("L", (60, 30), colour=255, box=(0, 5, 60, 25))  # landscape bar
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: the bar stands up
    decoded = imaging.decode(encode(bar, "JPEG", exif=exif), CFG)
    rows = np.flatnonzero(decoded.max(axis=1) > 128)
    columns = np.flatnonzero(decoded.max(axis=0) > 128)
    assert len(rows) == 28 and len(columns) < 24


def test_invert_never_and_always(test_split: data.Split) -> None:
    dark_on_light = square(background=240, colour=30)
    payload = encode(dark_on_light)
    auto = imaging.decode(payload, CFG)
    assert auto[14, 14] == 225 and auto[0, 0] == 15
    never = imaging.decode(payload, ImagingConfig(invert="never"))
    assert never[14, 14] == 30 and never[0, 0] == 240
    pixels = test_split.images[3]
    always = imaging.decode(encode(Image.fromarray(pixels)), ImagingConfig(invert="always"))
    np.testing.assert_array_equal(always, 255 - pixels.astype(np.float32))


def test_border_median_decides_auto() -> None:
    image = Image.new("L", (28, 28), 0)
    image.paste(200, (0, 0, 28, 14))  # top half light: 54 of 108 border pixels are 200
    assert imaging.decode(encode(image), CFG)[0, 0] == 200  # median (0 + 200) / 2 = 100: kept
    image.paste(200, (0, 14, 1, 15))  # one more light border pixel tips the median
    assert imaging.decode(encode(image), CFG)[0, 0] == 55


def test_dataset_images_pass_through_bit_exact(test_split: data.Split) -> None:
    images = test_split.images
    border = np.concatenate([images[:, 0], images[:, -1], images[:, 1:-1, 0],
                             images[:, 1:-1, -1]], axis=1)
    brightest = np.argsort(np.median(border, axis=1))[-20:]
    for index in [*range(0, len(images), 10), *brightest]:
        decoded = imaging.decode(encode(Image.fromarray(images[index])), CFG)
        assert np.array_equal(decoded, images[index]), f"test image {index} changed"


def test_decode_many_keeps_order_and_reports_errors(test_split: data.Split) -> None:
    payloads = [encode(Image.fromarray(test_split.images[0])), b"", EPS,
                encode(Image.fromarray(test_split.images[1]))]
    pixels, errors = imaging.decode_many(payloads, CFG)
    assert pixels.shape == (2, 28, 28, 1) and pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels[1, :, :, 0], test_split.images[1])
    assert [(index, error.code) for index, error in errors] == [
        (1, "empty_payload"), (2, "unsupported_format")]
    none = imaging.decode_many([], CFG)
    assert none.pixels.shape == (0, 28, 28, 1) and none.errors == []


@pytest.mark.parametrize("invert", ["auto", "always", "never"])
def test_decode_many_gives_what_decode_gives_for_each(test_split: data.Split, invert: str) -> None:
    """The batch path (28x28 greyscale PNGs inverted and converted together) against ``decode``
    one by one: dark and light backgrounds, borders whose median is at the threshold, other
    sizes, modes and formats, and bad payloads, mixed in one batch."""
    cfg = dataclasses.replace(CFG, invert=invert)
    images = test_split.images[:200]
    edge = np.zeros((28, 28), np.uint8)
    edge[0, :] = edge[-1, :] = 127  # 56 of the 108 border pixels at 127, the rest 0 or 128
    edge[1:-1, 0], edge[1:-1, -1] = 128, 0
    payloads = [encode(Image.fromarray(image)) for image in images[:100]]
    payloads += [encode(Image.fromarray(255 - image)) for image in images[100:]]
    payloads += [encode(Image.fromarray(edge)), encode(Image.fromarray(edge + 1)),
                 encode(Image.fromarray(images[0]).resize((40, 30))), b"", EPS,
                 encode(Image.fromarray(images[1]).convert("RGB")),
                 encode(Image.fromarray(images[2]), "JPEG"), encode(Image.fromarray(images[3]))[:60]]
    pixels, errors = imaging.decode_many(payloads, cfg)
    expected, codes = [], []
    for index, payload in enumerate(payloads):
        try:
            expected.append(imaging.decode(payload, cfg))
        except ImageError as exc:
            codes.append((index, exc.code, exc.message))
    assert [(i, e.code, e.message) for i, e in errors] == codes
    assert len(codes) == 3
    np.testing.assert_array_equal(pixels[..., 0], np.stack(expected))


# --- the committed sample images --------------------------------------------------------------


def test_sample_images_are_the_recorded_test_images(test_split: data.Split) -> None:
    labels = json.loads((ROOT / "Images" / "labels.json").read_text())
    required = {"top0.png", "trouser1.png", "pullover2.png", "sandal5.png", "shirt6.png",
                "sneaker7.png", "boot9.png", "dress3.png", "coat4.png", "bag8.png"}
    assert required <= set(labels)
    assert {entry["label"] for entry in labels.values()} == set(range(10))
    for name, entry in labels.items():
        payload = (ROOT / "Images" / name).read_bytes()
        assert hashlib.sha256(payload).hexdigest() == entry["sha256"], name
        assert int(Path(name).stem[-1]) == entry["label"]
        assert entry["class_name"] == CLASS_NAMES[entry["label"]]
        assert test_split.labels[entry["test_index"]] == entry["label"]
        index = entry["test_index"]
        assert not (test_split.labels[:index] == entry["label"]).any(), "not the first of its class"
        np.testing.assert_array_equal(imaging.decode(payload, CFG), test_split.images[index])


# --- the PNG fast path (fmnist.imaging.png) ---------------------------------------------------------

ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2),
         (1, 0, 2, 1))  # (top, left, row step, column step) of each interlace pass
FILTER_NAMES = {0: "None", 1: "Sub", 2: "Up", 3: "Average", 4: "Paeth"}
OBJECT = np.zeros((28, 28), np.uint8)  # a noisy object on black: auto keeps it as it is
OBJECT[4:24, 6:22] = np.random.default_rng(7).integers(0, 256, (20, 16))
# Values 0..4: every byte of its scanlines is a valid filter type, so data misread as 8-bit
# grey rows still decodes and only the header check can send it to Pillow.
TINY = OBJECT % 5


def via_pillow(payload: bytes, cfg: ImagingConfig = CFG) -> np.ndarray:
    """``imaging.decode`` with the fast path switched off: the Pillow path it had before."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(png, "decode_grey", lambda payload: None)
        return imaging.decode(payload, cfg)


def pillow_grey(payload: bytes) -> np.ndarray:
    """The uint8 pixels Pillow decodes, before ``_to_model_input``."""
    grey, alpha = imaging._open(payload, "PNG", CFG.max_pixels, "imaging.max_pixels")
    assert alpha is None
    return grey


def png_chunks(payload: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of each chunk of a well-formed PNG."""
    chunks, pos = [], len(PNG_SIGNATURE)
    while pos < len(payload):
        (length,) = struct.unpack_from(">I", payload, pos)
        chunks.append((payload[pos + 4:pos + 8], payload[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return chunks


def png_from(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return PNG_SIGNATURE + b"".join(png_chunk(kind, body) for kind, body in chunks)


def png_of_rows(rows: bytes, width: int = 28, height: int = 28, depth: int = 8, colour: int = 0,
                interlace: int = 0) -> bytes:
    """A PNG (greyscale unless ``colour`` says) of already filtered ``rows``, in one IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return png_from([(b"IHDR", ihdr), (b"IDAT", zlib.compress(rows)), (b"IEND", b"")])


def scanlines(pixels: np.ndarray, filters: bytes = b"\x00") -> bytes:
    """Each row's bytes, unfiltered, after a filter-type byte taken in turn from ``filters``."""
    return b"".join(bytes([filters[i % len(filters)]]) + row.tobytes()
                    for i, row in enumerate(pixels))


def adam7(pixels: np.ndarray) -> bytes:
    """Scanlines (filter type None) of the seven Adam7 interlace passes."""
    passes = [pixels[top::dy, left::dx] for top, left, dy, dx in ADAM7]
    return b"".join(scanlines(sub) for sub in passes if sub.size)


def inflated(payload: bytes) -> bytes:
    return zlib.decompress(b"".join(body for kind, body in png_chunks(payload) if kind == b"IDAT"))


def with_chunk(payload: bytes, kind: bytes, body: bytes, before: bytes = b"IDAT") -> bytes:
    """``payload`` with a chunk inserted before the first chunk of type ``before``."""
    chunks = png_chunks(payload)
    at = [name for name, _ in chunks].index(before)
    return png_from([*chunks[:at], (kind, body), *chunks[at:]])


def with_bad_crc(payload: bytes, kind: bytes) -> bytes:
    pos = len(PNG_SIGNATURE)
    while payload[pos + 4:pos + 8] != kind:
        pos += 12 + struct.unpack_from(">I", payload, pos)[0]
    crc_at = pos + 8 + struct.unpack_from(">I", payload, pos)[0]
    return patched(payload, crc_at, bytes([payload[crc_at] ^ 0xFF]))


def zlib_bomb(pixels: np.ndarray, extra_mib: int) -> bytes:
    """A grey PNG of ``pixels`` whose IDAT inflates to their rows and then ``extra_mib`` MiB of
    zeros: one fully flushed deflate block of a MiB of zeros (it refers to nothing before it),
    repeated, then an empty final block and the Adler-32 of it all."""
    rows, zeros = scanlines(pixels), bytes(2**20)
    deflate = zlib.compressobj(9)
    head = deflate.compress(rows) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    adler = zlib.adler32(rows)
    for _ in range(extra_mib):
        adler = zlib.adler32(zeros, adler)
    stream = head + block * extra_mib + b"\x03\x00" + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", pixels.shape[1], pixels.shape[0], 8, 0, 0, 0, 0)
    return png_from([(b"IHDR", ihdr), (b"IDAT", stream), (b"IEND", b"")])


def sample_payloads() -> list[bytes]:
    return [path.read_bytes() for path in sorted((ROOT / "Images").glob("*.png"))]


def test_fast_path_reads_the_sample_images_as_pillow_does() -> None:
    for payload in sample_payloads():
        grey = png.decode_grey(payload)
        assert grey is not None and grey.dtype == np.uint8 and grey.shape == (28, 28)
        np.testing.assert_array_equal(grey, pillow_grey(payload))
        np.testing.assert_array_equal(imaging.decode(payload, CFG), via_pillow(payload))


class ChangedCore:
    """Pillow's private ``Image.core`` as a later release might offer it: ``changes`` replace
    names (None removes them), the rest is the real core."""

    def __init__(self, **changes: object) -> None:
        self._changes = changes

    def __getattr__(self, name: str) -> object:
        if self._changes.get(name, ...) is None:
            raise AttributeError(f"module 'PIL._imaging' has no attribute {name!r}")
        return self._changes.get(name) or getattr(Image.core, name)


def zip_decoder_with_a_new_signature(mode: str, rawmode: str, new_argument: object) -> None:
    raise AssertionError("unreachable: the fast path's call has too few arguments")


class DecoderReturningATriple:
    """``decode`` returns (status, error, consumed): unpacking it fails after Pillow's call."""

    def __init__(self, *args: object) -> None:
        self._decoder = Image.core.zip_decoder(*args)
        self.setimage, self.cleanup = self._decoder.setimage, self._decoder.cleanup

    def decode(self, data: bytes) -> tuple[int, int, int]:
        return (*self._decoder.decode(data), len(data))


def break_private_api(monkeypatch: pytest.MonkeyPatch, core: object) -> None:
    """The fast path sees ``core`` (None: no ``Image.core`` at all); Pillow's own PNG plugin,
    which gets its decoder from the same private core, keeps the real one, as it would in a
    release that changed the API."""
    pillow = types.SimpleNamespace() if core is None else types.SimpleNamespace(core=core)
    monkeypatch.setattr(png, "Image", pillow)
    monkeypatch.setattr(png, "_available", True)  # restored, with png.Image, after the test


@pytest.mark.parametrize("core", [
    ChangedCore(zip_decoder=None),  # AttributeError
    ChangedCore(map_buffer=None),
    ChangedCore(zip_decoder=zip_decoder_with_a_new_signature),  # TypeError
    ChangedCore(zip_decoder=DecoderReturningATriple),  # ValueError
    None,  # no Image.core: AttributeError
], ids=["no-zip_decoder", "no-map_buffer", "new-signature", "new-result", "no-core"])
def test_a_broken_private_api_falls_back_to_pillow_and_warns_once(
        core: object, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """docs/decisions.md#fast-png-path: after any error of Pillow's private API the fast path
    gives up for good, and every PNG gets the pixels of Pillow's public decoder."""
    payloads = sample_payloads()
    expected = [via_pillow(payload) for payload in payloads]
    break_private_api(monkeypatch, core)
    with caplog.at_level("WARNING", logger="fmnist.imaging.png"):
        for payload, pixels in zip(payloads, expected, strict=True):
            assert png.decode_grey(payload) is None
            np.testing.assert_array_equal(imaging.decode(payload, CFG), pixels)
    assert png._available is False
    (record,) = [r for r in caplog.records if r.name == "fmnist.imaging.png"]
    assert record.levelname == "WARNING"
    assert record.getMessage().startswith("PNG fast path disabled: Pillow ")
    assert "docs/decisions.md#fast-png-path" in record.getMessage()


def test_a_disabled_fast_path_no_longer_calls_the_private_api(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After the first failure, later requests return None before touching Pillow's core."""
    calls: list[object] = []

    def failing(*args: object) -> None:
        calls.append(args)
        raise TypeError("zip_decoder() takes 3 arguments")

    break_private_api(monkeypatch, ChangedCore(zip_decoder=failing))
    for payload in sample_payloads():
        assert png.decode_grey(payload) is None
    assert len(calls) == 1


def test_a_memory_error_does_not_disable_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of memory is that request's trouble, not the API's."""
    def out_of_memory(*args: object) -> None:
        raise MemoryError

    break_private_api(monkeypatch, ChangedCore(zip_decoder=out_of_memory))
    assert png.decode_grey(PLAIN) is None
    assert png._available is True


def test_corrupt_image_data_keeps_the_fast_path(monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """A decoder error code (bad filter byte, corrupt or short deflate stream) is the request's
    problem, not the API's: that request goes to Pillow, the next one still takes the fast path."""
    monkeypatch.setattr(png, "_available", True)
    bad_filter = png_of_rows(scanlines(OBJECT, b"\x00\x05"))
    corrupt = png_from([PLAIN_IHDR, (b"IDAT", b"\x78\x9c" + bytes(range(200))), PLAIN_IEND])
    with caplog.at_level("WARNING", logger="fmnist.imaging.png"):
        for payload in (bad_filter, corrupt, SHORT_IDAT):
            assert png.decode_grey(payload) is None
            assert error_of(payload).code == "undecodable_image"
    assert png._available is True
    assert not [r for r in caplog.records if r.name == "fmnist.imaging.png"]
    grey = png.decode_grey(PLAIN)
    assert grey is not None
    np.testing.assert_array_equal(grey, OBJECT)


def test_decode_opens_only_the_other_images_with_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_open = imaging._open

    def counting_open(payload: bytes, fmt: str, limit: int, limit_name: str) -> object:
        opened.append(fmt)
        return real_open(payload, fmt, limit, limit_name)

    monkeypatch.setattr(imaging, "_open", counting_open)
    for payload in [*sample_payloads(), encode(square(size=(40, 30)))]:
        imaging.decode(payload, CFG)
    assert opened == []
    imaging.decode(encode(square("RGB")), CFG)
    imaging.decode(encode(square(), "GIF"), CFG)
    assert opened == ["PNG", "GIF"]


def test_fast_path_matches_pillow_for_every_filter_type(test_split: data.Split) -> None:
    """Pillow's encoder picks a filter per row; optimize=True also uses Average."""
    seen: set[int] = set()
    for options in ({}, {"compress_level": 0}, {"compress_level": 1}, {"compress_level": 9},
                    {"optimize": True}):
        for index in range(0, 3000, 10):
            payload = encode(Image.fromarray(test_split.images[index]), **options)
            seen.update(inflated(payload)[::29])
            grey = png.decode_grey(payload)
            assert grey is not None, (options, index)
            np.testing.assert_array_equal(grey, pillow_grey(payload))
            np.testing.assert_array_equal(grey, test_split.images[index])
            np.testing.assert_array_equal(imaging.decode(payload, CFG), via_pillow(payload))
    assert {FILTER_NAMES[f] for f in seen} == set(FILTER_NAMES.values())


def test_fast_path_joins_idat_chunks(test_split: data.Split) -> None:
    payload = encode(Image.fromarray(test_split.images[0]), optimize=True)
    (ihdr, (idat, stream), iend) = png_chunks(payload)
    assert idat == b"IDAT"
    pieces = [(b"IDAT", stream[i:i + 50]) for i in range(0, len(stream), 50)]
    split = png_from([ihdr, *pieces, (b"IDAT", b""), iend])
    grey = png.decode_grey(split)
    assert grey is not None and len(pieces) > 3
    np.testing.assert_array_equal(grey, test_split.images[0])
    np.testing.assert_array_equal(pillow_grey(split), test_split.images[0])


@pytest.mark.parametrize("image", [
    square("L", (40, 30), box=(10, 5, 30, 25)),  # trimmed and scaled
    square("L", (30, 40), background=230, colour=20, box=(5, 10, 25, 30)),  # inverted too
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (7, 300), dtype=np.uint8)),
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 5), dtype=np.uint8)),
    Image.new("L", (1, 1), 255),
], ids=["40x30", "30x40-light", "300x7-noise", "5x64-noise", "1x1"])
def test_fast_path_hands_other_sizes_to_fit(image: Image.Image) -> None:
    for options in ({}, {"optimize": True}):
        payload = encode(image, **options)
        grey = png.decode_grey(payload)
        assert grey is not None
        np.testing.assert_array_equal(grey, np.asarray(image))
        decoded = imaging.decode(payload, CFG)
        assert decoded.shape == (28, 28)
        np.testing.assert_array_equal(decoded, via_pillow(payload))


@pytest.mark.parametrize(("kind", "length"), sorted(png.HARMLESS.items()))
@pytest.mark.parametrize("before", [b"IDAT", b"IEND"])
def test_harmless_chunks_keep_the_fast_path(kind: bytes, length: int, before: bytes) -> None:
    payload = with_chunk(encode(Image.fromarray(OBJECT)), kind, bytes(range(1, length + 1)),
                         before)
    grey = png.decode_grey(payload)
    assert grey is not None
    np.testing.assert_array_equal(grey, OBJECT)
    np.testing.assert_array_equal(pillow_grey(payload), OBJECT)


def test_pillow_dpi_keeps_the_fast_path() -> None:
    payload = encode(Image.fromarray(OBJECT), dpi=(300, 300))
    assert b"pHYs" in payload
    assert png.decode_grey(payload) is not None


def exif_orientation(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


PLAIN = encode(Image.fromarray(OBJECT))
PLAIN_IHDR, (_, PLAIN_STREAM), PLAIN_IEND = png_chunks(PLAIN)
SHORT_IDAT = png_from([PLAIN_IHDR, (b"IDAT", PLAIN_STREAM[:len(PLAIN_STREAM) // 2]), PLAIN_IEND])
BROKEN_RUN = png_from([PLAIN_IHDR, (b"IDAT", PLAIN_STREAM[:100]), (b"gAMA", bytes(4)),
                       (b"IDAT", PLAIN_STREAM[100:]), PLAIN_IEND])


@pytest.mark.parametrize(("payload", "expected"), [
    # anomalies: Pillow refuses them, or reads them its own way
    (with_bad_crc(PLAIN, b"IHDR"), "undecodable_image"),
    (with_bad_crc(PLAIN, b"IDAT"), OBJECT),  # Pillow checks no CRC from the first IDAT on
    (with_bad_crc(PLAIN, b"IEND"), OBJECT),
    (PLAIN[:len(PLAIN) // 2], "undecodable_image"),
    (SHORT_IDAT, "undecodable_image"),
    (png_of_rows(scanlines(OBJECT, b"\x00\x05")), "undecodable_image"),  # filter type 5
    (png_of_rows(scanlines(OBJECT)[:-5] + b"\x00"), "undecodable_image"),  # a short row
    (BROKEN_RUN, "undecodable_image"),  # Pillow stops reading image data at the gAMA
    (with_chunk(PLAIN, b"gAMA", bytes(3)), "undecodable_image"),  # "Truncated gAMA chunk"
    (with_chunk(PLAIN, b"gAMA", bytes(5)), OBJECT),
    (PLAIN + b"trailing bytes", OBJECT),
    (PLAIN[:-12] + png_chunk(b"IEND", b"data"), OBJECT),
    (PLAIN[:-12], OBJECT),  # no IEND
    (png_of_rows(b"", height=0), "undecodable_image"),
    # chunks that change the pixels, or that we do not vouch for
    (encode(square(colour=200), transparency=200), np.zeros((28, 28))),  # tRNS: 200 is clear
    (encode(Image.fromarray(OBJECT), exif=exif_orientation(6)), np.rot90(OBJECT, -1)),  # eXIf: rotated
    (with_chunk(PLAIN, b"PLTE", bytes(range(6))), OBJECT),
    (with_chunk(PLAIN, b"sBIT", b"\x04"), OBJECT),
    (with_chunk(PLAIN, b"bKGD", b"\x00\x80"), OBJECT),
    (with_chunk(PLAIN, b"tEXt", b"Software\x00fmnist"), OBJECT),
    (with_chunk(PLAIN, b"tEXt", b"Comment\x00after", b"IEND"), OBJECT),
    (with_chunk(PLAIN, b"prIv", b"private data"), OBJECT),  # unknown ancillary
    (with_chunk(PLAIN, b"CRIT", b"critical?"), OBJECT),  # unknown critical: Pillow ignores it
    # other modes
    (png_of_rows(adam7(TINY), interlace=1), TINY),
    (png_of_rows(scanlines((TINY.astype(">u2") * 257).view(np.uint8)), depth=16), TINY),
    (png_of_rows(scanlines(np.repeat(TINY, 3, axis=1)), colour=2), TINY),  # RGB
    (encode(Image.fromarray(OBJECT).convert("P")), OBJECT),
    (encode(Image.fromarray(TINY).convert("LA")), TINY),
    (encode(Image.fromarray(OBJECT > 127)), np.where(OBJECT > 127, 255, 0)),  # 1-bit grey
], ids=[
    "bad-crc-IHDR", "bad-crc-IDAT", "bad-crc-IEND", "truncated-file", "truncated-IDAT",
    "bad-filter-byte", "short-row", "IDAT-run-broken", "gAMA-too-short", "gAMA-too-long",
    "after-IEND", "IEND-with-data", "no-IEND", "zero-height", "tRNS", "eXIf-orientation", "PLTE",
    "sBIT", "bKGD", "tEXt", "tEXt-after-IDAT", "unknown-ancillary", "unknown-critical",
    "interlaced", "16-bit", "RGB", "palette", "LA", "1-bit"])
def test_fast_path_falls_back_to_pillow(payload: bytes, expected: str | np.ndarray) -> None:
    """None from the fast path, so Pillow's path runs, with the outcome it always had."""
    assert png.decode_grey(payload) is None
    if isinstance(expected, str):
        error = error_of(payload)
        assert error.code == expected
        assert error.message.startswith("The payload has a PNG image signature but cannot be "
                                        "decoded: ")
    else:
        np.testing.assert_array_equal(imaging.decode(payload, CFG), expected)


def test_fast_path_leaves_big_images_to_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    payload = encode(Image.fromarray(OBJECT))
    assert png.decode_grey(payload) is not None
    monkeypatch.setattr(png, "MAX_PIXELS", 28 * 28 - 1)
    assert png.decode_grey(payload) is None
    np.testing.assert_array_equal(imaging.decode(payload, CFG), OBJECT)


def test_fast_path_keeps_pillows_reading_of_the_deflate_stream() -> None:
    """Pillow's decoder stops after the last row and ends the image where the stream ends on a
    row boundary: the fast path, with the same decoder, gives the same pixels."""
    rows = scanlines(OBJECT)
    short = np.zeros_like(OBJECT)
    short[:10] = OBJECT[:10]
    for stream, expected in ((zlib.compress(rows + rows), OBJECT),
                             (zlib.compress(rows) + b"garbage", OBJECT),
                             (zlib.compress(rows[:29 * 10]), short)):
        payload = png_from([(b"IHDR", struct.pack(">IIBBBBB", 28, 28, 8, 0, 0, 0, 0)),
                            (b"IDAT", stream), (b"IEND", b"")])
        grey = png.decode_grey(payload)
        assert grey is not None
        np.testing.assert_array_equal(grey, expected)
        np.testing.assert_array_equal(pillow_grey(payload), expected)


def test_zlib_bomb_helper_builds_a_valid_stream() -> None:
    bomb = zlib_bomb(OBJECT, 2)
    assert inflated(bomb) == scanlines(OBJECT) + bytes(2 * 2**20)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux")
def test_zlib_bomb_inflates_no_further_than_the_image(tmp_path: Path) -> None:
    """An IDAT that inflates to 400 MiB, under a 256 MiB address-space budget: the fast path
    and Pillow's path both read the 28 rows the header promises and stop there."""
    bomb = zlib_bomb(OBJECT, 400)
    assert len(bomb) < CFG.max_payload_bytes
    (tmp_path / "bomb.png").write_bytes(bomb)
    np.save(tmp_path / "object.npy", OBJECT)
    child = textwrap.dedent("""
        import pathlib, sys
        import numpy as np
        from fmnist import imaging
        from fmnist.imaging import png
        from fmnist.config import ImagingConfig
        folder = pathlib.Path(sys.argv[1])
        bomb, expected = (folder / "bomb.png").read_bytes(), np.load(folder / "object.npy")
        limit_address_space()
        print("fast path", np.array_equal(png.decode_grey(bomb), expected))
        print("decode", np.array_equal(imaging.decode(bomb, ImagingConfig()), expected))
        png.decode_grey = lambda payload: None
        print("pillow", np.array_equal(imaging.decode(bomb, ImagingConfig()), expected))
        try:
            bytearray(400 * 2**20)
        except MemoryError:
            print("limit bites")
    """)
    assert run_in_small_address_space(child, str(tmp_path)) == [
        "fast path True", "decode True", "pillow True", "limit bites", ""]
