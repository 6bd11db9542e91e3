"""Hostile requests: every kind of bad input docs/reliability.md lists, built from real bytes."""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from fmnist.serving import protocol
from fmnist.testing.run import IMAGES


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header promising width x height grey pixels, with a tiny IDAT (as in
    tests/unit/test_imaging.py)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(IMAGES["coat4.png"])).convert("L").resize((112, 112)).save(
        buffer, "JPEG", quality=90)
    return buffer.getvalue()


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nnewpath 4 4 moveto 24 24 lineto "
       b"stroke\nshowpage\n%%EOF\n")
SVG = (b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" '
       b'width="28" height="28"><rect x="4" y="4" width="20" height="20" fill="#fff"/></svg>\n')
# The largest request a Kafka client with default limits (max.request.size = broker
# message.max.bytes = 1 MiB) can publish: its dead letter, the same bytes plus dlq_* headers,
# would be over the limit if the worker copied it whole.
KAFKA_NEAR_LIMIT_BYTES = 1_048_200
FIVE_MB = 5 * 1024 * 1024


@dataclass(frozen=True)
class Poison:
    """One hostile request: its payload, how its headers differ from a good request's, and the
    stable error code its answer must carry."""

    payload: bytes
    code: str
    headers: Callable[[str], dict[str, str]] = lambda rid: protocol.request_headers(
        rid, "application/octet-stream")
    malformed_id: bool = False  # sent with a request_id header that breaks the id rules


def poison_cases(broker_name: str) -> dict[str, Poison]:
    """Every case of docs/reliability.md, for one broker (only the big payload differs)."""
    png = IMAGES["boot9.png"]
    jpg = jpeg()
    big = FIVE_MB if broker_name == "pubsub" else KAFKA_NEAR_LIMIT_BYTES

    def with_headers(**extra: str) -> Callable[[str], dict[str, str]]:
        return lambda rid: {**protocol.request_headers(rid, "image/png"), **extra}

    return {
        "random_bytes": Poison(random.Random(7).randbytes(4096), "unsupported_format"),
        "empty": Poison(b"", "empty_payload"),
        "truncated_png": Poison(png[:len(png) // 2], "undecodable_image"),
        "truncated_jpeg": Poison(jpg[:len(jpg) // 2], "undecodable_image"),
        "eps": Poison(EPS, "unsupported_format"),
        "svg": Poison(SVG, "unsupported_format"),
        "png_30000x30000": Poison(png_bomb(), "image_too_large"),
        "big_payload": Poison(b"\x89PNG\r\n\x1a\n" + bytes(big - 8), "payload_too_large"),
        "300_headers": Poison(png, "invalid_headers", with_headers(
            **{f"x-h{i:03d}": "v" * 16 for i in range(300)})),
        "100kb_header": Poison(png, "invalid_headers", with_headers(**{"x-note": "n" * 100_000})),
        "malformed_request_id": Poison(png, "invalid_headers", with_headers(), malformed_id=True),
        # Names of the Python Pub/Sub client's publish() keywords: a worker that copies them into
        # a dead letter must still be able to publish it.
        "publish_keyword_headers": Poison(b"not an image", "unsupported_format", with_headers(
            topic="t", data="d", timeout="1", retry="r", ordering_key="k")),
    }
