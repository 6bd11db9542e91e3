"""The fast path for the common request: an 8-bit greyscale, non-interlaced PNG.

Pillow spends ~50 us in Python (a file object, chunk dispatch, ``ImageFile.load``) on a 28x28
PNG whose pixels its C decoder inflates and unfilters in ~10 us. ``decode_grey`` walks the
chunks itself and hands the image data to that same C decoder (``Image.core.zip_decoder("L",
"L")``, what Pillow's PNG plugin uses for this mode), which writes the rows straight into a
zeroed numpy array, as Pillow's path writes them into a zeroed image: the pixels are Pillow's,
bit for bit.

It returns None, and the caller runs Pillow with its error handling as before, for anything it
does not vouch for:

* not colour type 0 at 8 bits, interlaced, a compression or filter method other than 0, a zero
  side, or more than ``MAX_PIXELS`` (a bigger image gains nothing measurable here);
* a bad CRC in any chunk (Pillow checks only those before the first IDAT), a chunk that runs
  past the end, IDAT chunks that are not one run, a non-empty IEND, or anything after it;
* any chunk not in ``HARMLESS`` with exactly the length given there: tRNS (transparency), PLTE
  and sBIT (a decoder may honour them), tEXt, zTXt, iTXt and eXIf (they can carry an EXIF or
  XMP orientation, which ``imaging`` applies), iCCP (Pillow refuses an oversized profile), bKGD,
  APNG chunks, and every other chunk, critical or not;
* a decoder error (bad filter byte, corrupt deflate data) or a stream that stops mid-image.

Any exception from Pillow's private API (a release that renamed or removed a call, changed a
signature or a result) turns the fast path off for the rest of the process, with one WARNING,
so every later PNG goes to Pillow's public decoder without paying for the exception again. A
decoder error above comes back as an error code, not an exception: it falls back for that
request only.

Bounded like Pillow: the decoder inflates one row at a time into a (width + 1)-byte buffer and
stops after the last row, so an IDAT that inflates to far more than the header promises (a
"zlib bomb") costs at most height x (width + 1) inflated bytes. Two quirks of that decoder are
kept rather than refused, because Pillow accepts them too, with the same pixels: what follows
the last row is ignored, and a deflate stream that ends on a row boundary before the last row
ends the image there (the missing rows stay zero).
"""

from __future__ import annotations

import logging
import struct
import zlib

import numpy as np
import PIL
from PIL import Image

SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PIXELS = 1024 * 1024
GREY_8BIT = (8, 0, 0, 0, 0)  # bit depth, colour type, compression, filter, interlace
_START = SIGNATURE + struct.pack(">I4s", 13, b"IHDR")  # the IHDR first, 13 bytes long
_CHUNK_HEAD = struct.Struct(">I4s")  # length, type; then the data and a CRC of type + data
_CRC = struct.Struct(">I")
_SIZE = struct.Struct(">II")  # the IHDR's width and height; GREY_8BIT follows them
_GREY_8BIT = bytes(GREY_8BIT)
_IEND = struct.pack(">I4sI", 0, b"IEND", zlib.crc32(b"IEND"))  # the whole chunk: empty

# Chunks that Pillow reads into ``info`` and never applies to the pixels, with the one length
# we accept for each (Pillow's handlers raise on shorter ones). tIME has no handler at all.
HARMLESS = {b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"pHYs": 9, b"tIME": 7}

log = logging.getLogger("fmnist.imaging.png")
_available = True  # False once Pillow's private API has failed: Pillow's path from then on


def decode_grey(payload: bytes) -> np.ndarray | None:
    """The uint8 [height, width] pixels of an 8-bit greyscale PNG, or None: use Pillow."""
    if not _available:
        return None
    found = _image_data(payload)
    if found is None:
        return None
    (width, height), data = found
    grey = np.zeros((height, width), np.uint8)
    try:  # Pillow's private API, from here to the test of its result
        canvas = Image.core.map_buffer(grey, (width, height), "raw", 0, ("L", 0, 1))
        decoder = Image.core.zip_decoder("L", "L")
        try:
            decoder.setimage(canvas, (0, 0, width, height))
            status, error = decoder.decode(data)
        finally:
            decoder.cleanup()
        # status >= 0: it wants more data (truncated); error != 0: broken stream or filter byte.
        complete = status < 0 and error == 0
    except MemoryError:  # this request's, not the API's: keep the fast path for the next one
        return None
    except Exception as exc:  # noqa: BLE001 - any API error: Pillow's public decoder instead
        _disable(exc)  # docs/decisions.md#fast-png-path: fall back, pixels identical
        return None
    return grey if complete else None


def _disable(exc: Exception) -> None:
    global _available
    if _available:
        _available = False
        log.warning("PNG fast path disabled: Pillow %s's private decoder API failed (%s: %s); "
                    "every PNG now goes through Pillow's public decoder, with the same pixels "
                    "but slower (docs/decisions.md#fast-png-path).",
                    PIL.__version__, type(exc).__name__, exc)


def _image_data(payload: bytes) -> tuple[tuple[int, int], bytes] | None:
    """(width, height) and the concatenated IDAT data, if every chunk checks out; else None."""
    if not payload.startswith(_START) or len(payload) < 33:  # up to the IHDR's CRC
        return None
    width, height = _SIZE.unpack_from(payload, 16)
    if payload[24:29] != _GREY_8BIT or not 0 < width * height <= MAX_PIXELS:
        return None
    view = memoryview(payload)
    # The layout encoders write for a small image, IHDR + one IDAT + IEND: its two CRCs checked
    # without the walk below, which gives the same answer later (docs/decisions.md#fast-png-path)
    if payload[37:41] == b"IDAT" and payload.endswith(_IEND):
        end = 41 + int.from_bytes(payload[33:37], "big")
        if end + 16 == len(payload):
            sound = zlib.crc32(view[12:29]) == _CRC.unpack_from(payload, 29)[0] and \
                zlib.crc32(view[37:end]) == _CRC.unpack_from(payload, end)[0]
            return ((width, height), payload[41:end]) if sound else None
    idat: list[memoryview] = []
    after_idat = False
    pos = 8
    while pos + 12 <= len(payload):
        length, name = _CHUNK_HEAD.unpack_from(payload, pos)
        end = pos + 8 + length
        if end + 4 > len(payload) or zlib.crc32(view[pos + 4:end]) != _CRC.unpack_from(
                payload, end)[0]:
            return None
        if name == b"IDAT" and not after_idat:
            idat.append(view[pos + 8:end])
        elif name == b"IEND":
            complete = idat and length == 0 and end + 4 == len(payload)
            return ((width, height), b"".join(idat)) if complete else None
        elif pos == 8 or HARMLESS.get(name) == length:  # at 8: the IHDR, checked above
            after_idat = bool(idat)
        else:
            return None
        pos = end + 4
    return None
