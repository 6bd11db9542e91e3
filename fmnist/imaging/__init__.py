"""Bytes -> the model's input: a 28x28 float32 array, 0..255, light object on a black background.

Checks, in this order, each failing with an ``ImageError`` whose ``code`` is stable on the wire:

1. ``payload_too_large`` - more than ``imaging.max_payload_bytes``; nothing else reads the bytes.
2. ``empty_payload`` - zero bytes.
3. ``unsupported_format`` - the magic bytes are not one of ``imaging.allowed_formats``. We sniff
   the signature ourselves (``sniff_format``) and let Pillow try that one decoder only, so a
   disallowed format never reaches Pillow.
4. ``image_too_large`` - width x height from the header is above ``imaging.max_pixels`` (or
   Pillow's own ``Image.MAX_IMAGE_PIXELS``, whichever is smaller). Read from the header by our
   own parser before Pillow opens the file, and again from Pillow's header before any pixel is
   decoded, so a 30000x30000 PNG is refused in microseconds with no allocation.
5. ``undecodable_image`` - the signature is fine but Pillow cannot decode it (truncated, corrupt).

Fast path: most requests are 28x28 8-bit greyscale PNGs, and Pillow's Python around its C
decoder (file object, chunk dispatch, ``ImageFile.load``) was two thirds of their ``decode`` time.
After the checks above, ``fmnist.imaging.png.decode_grey`` reads such a PNG with that same C decoder, so
the pixels are the same bit for bit; anything it does not vouch for (another mode,
transparency, EXIF, a bad CRC, any anomaly) returns None and goes through Pillow as before,
with the same errors and messages. So does every PNG once Pillow's private API that it drives
has failed (docs/decisions.md#fast-png-path).

Conversion (see docs/images.md):

* Only the first frame of a GIF or WebP animation is used; EXIF orientation is applied.
* Any mode becomes 8-bit greyscale (luma, ITU-R 601); 16-bit greyscale is scaled by 1/257.
* Inversion (``imaging.invert``): ``never``, ``always``, or ``auto``: invert when the background
  is light, i.e. the median of the 1-pixel border of the greyscale image is above 127. If more
  than half of the border is transparent, the transparency *is* the background and we invert
  when the visible object is dark (median of its opaque pixels <= 127).
* Transparent pixels are background: alpha is flattened onto white when inverting and onto
  black otherwise, so they always end up 0.
* A 28x28 image is used as it is (a Fashion-MNIST image passes through bit for bit). Any other
  size is trimmed to the object's bounding box (margins within 5% of the border's median level
  are cut), scaled so its longer side is 28 pixels (Lanczos), and centred on a 28x28 canvas
  filled with the background level - as Fashion-MNIST's own pipeline did.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps

from fmnist.config import ImagingConfig
from fmnist.errors import ConfigError, ImageError
from fmnist.imaging import png

SIZE = 28
INVERT_MODES = ("auto", "always", "never")
TRIM_TOLERANCE = 13  # 5% of 255, as Fashion-MNIST's trim step
JPEG_DRAFT = (4 * SIZE, 4 * SIZE)  # libjpeg may decode big photos at 1/2..1/8 scale, not below

# Formats we recognise, with how a message names them. Pillow's format names where it has one.
DESCRIPTIONS = {
    "PNG": "a PNG image", "JPEG": "a JPEG image", "GIF": "a GIF image", "BMP": "a BMP image",
    "WEBP": "a WebP image", "TIFF": "a TIFF image", "ICO": "a Windows icon (ICO)",
    "CUR": "a Windows cursor (CUR)", "PSD": "a Photoshop document (PSD)",
    "JPEG2000": "a JPEG 2000 image", "JXL": "a JPEG XL image", "AVIF": "an AVIF image",
    "HEIF": "a HEIF/HEIC image", "QOI": "a QOI image", "PPM": "a Netpbm (PBM/PGM/PPM) image",
    "ICNS": "a macOS icon (ICNS)", "DDS": "a DirectDraw surface (DDS)",
    "EPS": "an EPS/PostScript document", "PDF": "a PDF document", "SVG": "an SVG drawing",
    "XML": "an XML document", "HTML": "an HTML page", "ZIP": "a ZIP archive",
    "GZIP": "a gzip file",
}
VECTOR_OR_DOCUMENT = {"EPS", "PDF", "SVG", "XML", "HTML", "ZIP", "GZIP"}
_PREFIXES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"), (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"), (b"8BPS", "PSD"), (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (b"\xff\x4f\xff\x51", "JPEG2000"), (b"\xff\x0a", "JXL"), (b"\x00\x00\x00\x0cJXL ", "JXL"),
    (b"qoif", "QOI"), (b"icns", "ICNS"), (b"DDS ", "DDS"), (b"%PDF", "PDF"), (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"), (b"PK\x03\x04", "ZIP"), (b"\x1f\x8b", "GZIP"),
)
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")
_BASE64_IMAGES = {b"iVBORw0KGgo": "PNG", b"/9j/": "JPEG", b"R0lGOD": "GIF", b"UklGR": "WEBP"}


class Decoded(NamedTuple):
    """``decode_many``'s result: the good images in input order, and the bad ones by index."""

    pixels: np.ndarray  # float32 [n_good, 28, 28, 1]
    errors: list[tuple[int, ImageError]]


def sniff_format(payload: bytes) -> str | None:
    """The format named by the payload's magic bytes ("PNG", "EPS", "SVG", ...), or None."""
    head = bytes(payload[:64])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return "AVIF" if brand in (b"avif", b"avis") else "HEIF" if brand in (
            b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1") else None
    for prefix, name in _PREFIXES:
        if head.startswith(prefix):
            return name
    if head[:1] == b"P" and head[1:2] in b"1234567" and head[2:3] in b" \t\r\n":
        return "PPM"
    text = bytes(payload[:1024]).removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    if text.startswith((b"<?xml", b"<svg", b"<!doctype", b"<!--", b"<html")):
        return "SVG" if b"<svg" in text else "HTML" if b"<html" in text else "XML"
    return None


def decode(payload: bytes, cfg: ImagingConfig) -> np.ndarray:
    """One image file's bytes -> float32 [28, 28], 0..255, light object on black. See module doc."""
    if len(payload) > cfg.max_payload_bytes:
        raise ImageError(
            "payload_too_large",
            f"The payload is {len(payload):,} bytes; the limit is {cfg.max_payload_bytes:,} "
            "(imaging.max_payload_bytes).",
            "Send a smaller file (a 28x28 greyscale PNG is under 1 KB; a photo of a few hundred "
            "pixels is plenty), or raise imaging.max_payload_bytes / "
            "FMNIST_IMAGING__MAX_PAYLOAD_BYTES, keeping it under the broker's message limit.")
    if len(payload) == 0:
        raise ImageError("empty_payload", "The payload is empty (0 bytes).",
                         "Send the bytes of an image file as the message value.")
    if cfg.invert not in INVERT_MODES:
        raise ConfigError(f"imaging.invert must be one of {', '.join(INVERT_MODES)}; got "
                          f"{cfg.invert!r}.", "Fix it in the config or FMNIST_IMAGING__INVERT.")
    fmt = _check_format(payload, cfg)
    limit, limit_name = _pixel_limit(cfg)
    size = _header_size(payload, fmt)
    if size is not None:
        _check_pixels(fmt, size, limit, limit_name)
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # would turn truncated files into half-grey images
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True by some module; "
                           "fmnist.imaging needs Pillow's default (False).")
    grey = png.decode_grey(payload) if fmt == "PNG" else None
    if grey is not None:  # the common case, without Pillow's Python (see fmnist.imaging.png)
        return _to_model_input(grey, None, cfg.invert)
    grey, alpha = _open(payload, fmt, limit, limit_name)
    return _to_model_input(grey, alpha, cfg.invert)


def decode_many(payloads: Iterable[bytes], cfg: ImagingConfig) -> Decoded:
    """Decode a batch. ``pixels`` holds the good images, in input order, as [n, 28, 28, 1];
    ``errors`` the (index, ImageError) of the others, so ``len(pixels) + len(errors)`` is the
    number of payloads and the rows of ``pixels`` are the indices not in ``errors``.

    The same pixels and errors as ``decode`` of each, at less cost per image: the common
    request (a 28x28 8-bit greyscale PNG that ``png.decode_grey`` vouches for) is inflated on
    its own and then inverted and converted with the rest of the batch in a few array
    operations; every other payload goes through ``decode`` (docs/decisions.md#batch-decode).
    """
    payloads = list(payloads)
    pixels = np.empty((len(payloads), SIZE, SIZE), np.float32)
    errors: list[tuple[int, ImageError]] = []
    common_rows: list[int] = []
    common: list[np.ndarray] = []
    fast = _fast_png_allowed(cfg)
    row = 0
    for index, payload in enumerate(payloads):
        grey = png.decode_grey(payload) if fast and 0 < len(payload) <= cfg.max_payload_bytes \
            and payload.startswith(png.SIGNATURE) else None
        try:
            if grey is None:
                pixels[row] = decode(payload, cfg)
            elif grey.shape == (SIZE, SIZE):
                common_rows.append(row)
                common.append(grey)
            else:  # a PNG of another size: trimmed and scaled as decode does
                pixels[row] = _to_model_input(grey, None, cfg.invert)
        except ImageError as exc:
            errors.append((index, exc))
            continue
        row += 1
    if common:
        pixels[common_rows] = _to_model_inputs(np.stack(common), cfg.invert)
    return Decoded(pixels[:row, ..., np.newaxis], errors)


def _fast_png_allowed(cfg: ImagingConfig) -> bool:
    """Whether every PNG that ``png.decode_grey`` reads passes the checks ``decode`` makes
    before it: PNG allowed, within the pixel limit, settings valid (``decode`` raises for bad
    ones, so the batch goes through it then)."""
    if cfg.invert not in INVERT_MODES or ImageFile.LOAD_TRUNCATED_IMAGES:
        return False
    return "PNG" in (f.upper() for f in cfg.allowed_formats) and \
        _pixel_limit(cfg)[0] >= png.MAX_PIXELS


def _to_model_inputs(greys: np.ndarray, mode: str) -> np.ndarray:
    """``_to_model_input`` of [n, 28, 28] uint8 images without alpha, as one array operation:
    the same median-of-the-border test (``_light_background``), for every image at once."""
    if mode == "auto":
        border = np.concatenate((greys[:, 0], greys[:, -1], greys[:, 1:-1, 0],
                                 greys[:, 1:-1, -1]), axis=1)
        border.sort(axis=1)
        mid = border.shape[1] // 2  # 108 values: the median is the mean of the middle two
        invert = border[:, mid - 1].astype(np.int16) + border[:, mid] > 2 * 127
        greys = np.where(invert[:, None, None], 255 - greys, greys)
    elif mode == "always":
        greys = 255 - greys
    return greys.astype(np.float32)


def _check_format(payload: bytes, cfg: ImagingConfig) -> str:
    fmt = sniff_format(payload)
    if fmt is not None and fmt in (f.upper() for f in cfg.allowed_formats):
        return fmt
    allowed = [f.upper() for f in cfg.allowed_formats]
    accepted = f"accepted formats are {', '.join(allowed)} (imaging.allowed_formats)"
    if fmt is None:
        raise ImageError("unsupported_format", f"The payload is {_describe_unknown(payload)}; "
                         f"{accepted}.", "Send the raw bytes of a PNG or JPEG file.")
    if fmt in VECTOR_OR_DOCUMENT:
        tool = {"SVG": "`rsvg-convert -w 256 in.svg -o out.png`",
                "PDF": "`pdftoppm -png -r 72 in.pdf out`",
                "EPS": "Ghostscript or ImageMagick (`magick in.eps out.png`)"}.get(fmt)
        hint = f"Rasterise it and send a PNG{f', e.g. with {tool}' if tool else ''}."
    else:
        hint = (f"Convert it to PNG or JPEG, or add {fmt} to imaging.allowed_formats "
                "(FMNIST_IMAGING__ALLOWED_FORMATS) if Pillow can read it and you trust its decoder.")
    raise ImageError("unsupported_format", f"The payload is {DESCRIPTIONS[fmt]}; {accepted}.",
                     hint)


def _describe_unknown(payload: bytes) -> str:
    head = bytes(payload[:32])
    for prefix, fmt in _BASE64_IMAGES.items():
        if head.lstrip().startswith(prefix):
            return f"base64 text of {DESCRIPTIONS[fmt]}, not the image's bytes (decode it first)"
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return f"text ({head[:20].decode('ascii')!r}...), not an image"
    return f"not a recognised image (it starts with bytes {head[:8].hex(' ')})"


def _pixel_limit(cfg: ImagingConfig) -> tuple[int, str]:
    pillow = Image.MAX_IMAGE_PIXELS
    if pillow is not None and pillow < cfg.max_pixels:
        return int(pillow), "Pillow's Image.MAX_IMAGE_PIXELS, below imaging.max_pixels"
    return cfg.max_pixels, "imaging.max_pixels"


def _check_pixels(fmt: str, size: tuple[int, int], limit: int, limit_name: str) -> None:
    width, height = size
    if width * height > limit:
        raise ImageError(
            "image_too_large",
            f"{fmt} header says {width}x{height} = {width * height:,} pixels; the limit is "
            f"{limit:,} ({limit_name}).",
            "Downscale the image before sending it (the model sees 28x28; 512 pixels on the "
            "longer side is plenty), or raise imaging.max_pixels / FMNIST_IMAGING__MAX_PIXELS.")


def _header_size(payload: bytes, fmt: str) -> tuple[int, int] | None:
    """Width and height from the header of the five default formats, without Pillow; else None."""
    try:
        if fmt == "PNG" and payload[12:16] == b"IHDR":
            return struct.unpack(">II", payload[16:24])
        if fmt == "GIF":
            return struct.unpack("<HH", payload[6:10])
        if fmt == "BMP":
            if struct.unpack("<I", payload[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER
                return struct.unpack("<HH", payload[18:22])
            width, height = struct.unpack("<ii", payload[18:26])
            return abs(width), abs(height)  # negative height: rows stored top-down
        if fmt == "WEBP":
            chunk = payload[12:16]
            if chunk == b"VP8X":
                return (int.from_bytes(payload[24:27], "little") + 1,
                        int.from_bytes(payload[27:30], "little") + 1)
            if chunk == b"VP8L":
                bits = int.from_bytes(payload[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8 ":
                width, height = struct.unpack("<HH", payload[26:30])
                return width & 0x3FFF, height & 0x3FFF
        if fmt == "JPEG":
            return _jpeg_size(payload)
    except struct.error:  # too short to hold the field: Pillow will call it truncated
        return None
    return None


def _jpeg_size(payload: bytes) -> tuple[int, int] | None:
    """Walk the JPEG marker segments to the first start-of-frame (SOF0..SOF15)."""
    pos = 2
    while pos + 4 <= len(payload):
        if payload[pos] != 0xFF:
            return None
        marker = payload[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers have no length
            pos += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", payload[pos + 5:pos + 9])
            return width, height
        pos += 2 + struct.unpack(">H", payload[pos + 2:pos + 4])[0]
    return None


def _open(payload: bytes, fmt: str, limit: int,
          limit_name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Pillow, restricted to the sniffed format; header checked before the pixels are loaded.
    Returns ``_grey_and_alpha`` of the first frame, EXIF orientation applied."""
    try:
        image = Image.open(io.BytesIO(payload), formats=[fmt])
        _check_pixels(fmt, image.size, limit, limit_name)
        if fmt == "JPEG":
            image.draft("L", JPEG_DRAFT)
        image.load()  # first frame only; a truncated file raises here
        if image.getexif().get(0x0112, 1) != 1:  # EXIF orientation
            image = ImageOps.exif_transpose(image)  # type: ignore[assignment]
        return _grey_and_alpha(image)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("image_too_large", f"{fmt} image refused by Pillow: {exc}",
                         "Downscale the image before sending it.") from None
    except Exception as exc:  # noqa: BLE001 - whatever Pillow raises on hostile bytes
        # Pillow names its file object ("<_io.BytesIO object at 0x7f...>"): a process detail
        # that would make identical bad requests get different answers. Drop it.
        detail = _OBJECT_REPR.sub("", str(exc))[:200] or type(exc).__name__
        raise ImageError("undecodable_image",
                         f"The payload has {DESCRIPTIONS[fmt]} signature but cannot be decoded: "
                         f"{detail}.",
                         "The file is truncated or corrupt: export it again and send the whole "
                         "file.") from None


def _grey_and_alpha(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """8-bit luma, and the alpha channel (None when the image has no transparency)."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        if image.mode.startswith("I;16"):
            # rint(v / 257) in integers: the same pixels (v / 257 is never halfway between two
            # integers) in a third of the memory: the float64 steps peaked at 416 MiB for a
            # 32 KB 4096x4096 PNG, within imaging.max_pixels (docs/reliability.md#fuzzed-input-path).
            wide = np.asarray(image).astype(np.uint32)
            wide += 128
            wide //= 257
            grey = wide.astype(np.uint8)
        else:
            values = np.asarray(image, dtype=np.float64)
            if values.max(initial=0) > 255:
                values = values / 257.0
            grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        key = image.info.get("transparency")
        alpha = None if not isinstance(key, int) else np.where(
            np.asarray(image) == key, 0, 255).astype(np.uint8)
        return grey, alpha
    if image.has_transparency_data:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")  # convert would copy
        return np.asarray(rgba.convert("L")), np.asarray(rgba.getchannel("A"))
    if image.mode not in ("L", "1", "P", "RGB"):  # CMYK, YCbCr, LAB, HSV...
        image = image.convert("RGB")
    return np.asarray(image if image.mode == "L" else image.convert("L")), None


def _border(array: np.ndarray) -> np.ndarray:
    if min(array.shape) <= 2:
        return array.ravel()
    return np.concatenate((array[0], array[-1], array[1:-1, 0], array[1:-1, -1]))


def _median(values: np.ndarray) -> float:
    """np.median, minus its overhead (which was a third of a 28x28 decode)."""
    ordered = values.flatten()  # a copy, sorted in place: np.sort costs 3x more at this size
    ordered.sort()
    mid = ordered.size // 2
    if ordered.size % 2:
        return float(ordered.item(mid))
    return (ordered.item(mid - 1) + ordered.item(mid)) / 2


def _light_background(grey: np.ndarray, alpha: np.ndarray | None) -> bool:
    border = _border(grey)
    if alpha is None:
        return _median(border) > 127
    opaque = _border(alpha) >= 128
    if 2 * opaque.sum() > opaque.size:
        return _median(border[opaque]) > 127
    visible = grey[alpha >= 128]  # the background is transparency: look at the object
    return bool(visible.size) and _median(visible) <= 127


def _to_model_input(grey: np.ndarray, alpha: np.ndarray | None, mode: str) -> np.ndarray:
    invert = mode == "always" or (mode == "auto" and _light_background(grey, alpha))
    if alpha is not None:
        background = 255 if invert else 0
        # At most 255 * 255 + 127: uint16 and in place, the same values in a quarter of the
        # memory of the uint32 temporaries (docs/reliability.md#fuzzed-input-path).
        weighted = grey.astype(np.uint16)
        weighted *= alpha
        weighted += (255 - alpha).astype(np.uint16) * np.uint16(background)
        weighted += 127
        weighted //= 255
        grey = weighted.astype(np.uint8)
    if invert:
        grey = 255 - grey
    if grey.shape != (SIZE, SIZE):
        grey = _fit(grey)
    return grey.astype(np.float32)


def _fit(grey: np.ndarray) -> np.ndarray:
    """Trim to the object, scale the longer side to 28, centre on a background-filled canvas."""
    level = round(_median(_border(grey)))
    content = np.abs(grey.astype(np.int16) - level) > TRIM_TOLERANCE
    rows, cols = np.flatnonzero(content.any(axis=1)), np.flatnonzero(content.any(axis=0))
    if rows.size:
        grey = grey[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    height, width = grey.shape
    scale = SIZE / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    small = Image.fromarray(np.ascontiguousarray(grey)).resize(
        (new_w, new_h), Image.Resampling.LANCZOS, reducing_gap=2.0)
    canvas = np.full((SIZE, SIZE), level, np.uint8)
    top, left = (SIZE - new_h) // 2, (SIZE - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = np.asarray(small)
    return canvas
