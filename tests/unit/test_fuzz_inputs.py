"""The fuzzed input path (docs/reliability.md#fuzzed-input-path): hypothesis drives image
decoding, request headers and Open Inference Protocol bodies, and each input must come back
as a result or an ``ImageError``/``RequestError`` with a code from ``protocol.ERROR_CODES``,
never another exception; through the handler, with the shipped model loaded, every request
must get exactly one answer, and every error answer a dead letter.

The examples here are few, so that the suite stays fast; ``benchmarks/fuzz.py`` runs the same
properties (``TARGETS``) for as long as it is told. The ``@example``s are the inputs that
failed before their fix, kept as regression cases.
"""

from __future__ import annotations

import ctypes
import gc
import io
import json
import resource
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from fmnist import config, imaging
from fmnist.brokers.base import Message
from fmnist.errors import ImageError
from fmnist.imaging import png
from fmnist.serving import handler as handler_module
from fmnist.serving import oip, protocol

ROOT = Path(__file__).resolve().parents[2]
CFG = config.load(env={}, flags={"serve.max_wait_ms": 0})
RESPONSE_TOPIC, DLQ_TOPIC = CFG.broker.response_topic, CFG.broker.dlq_topic
FEEDBACK_TOPIC = CFG.feedback.topic
FUZZ = settings(max_examples=250, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
# Memory (docs/reliability.md#fuzzed-input-path). A request is decoded and freed before the
# next, so a batch peaks at its costliest request plus what the allocator kept from the ones
# before it. The costliest decoder is WebP's, 16 bytes a pixel at imaging.max_pixels: Pillow
# decodes every WebP with libwebp's animation decoder (two RGBA canvases), then copies the
# frame's bytes and makes the image from them. glibc keeps up to 3 bytes a pixel of the batch's
# earlier requests (a batch of six 4096x4096 WebP, PNG and GIF images peaks at 304 MiB, one
# WebP alone at 256 MiB); the limit allows 4.
PEAK_BYTES_PER_PIXEL = 20
REQUEST_PEAK_LIMIT = PEAK_BYTES_PER_PIXEL * CFG.imaging.max_pixels  # 320 MiB at 4096 x 4096
LIVE_GROWTH_LIMIT = 32 * 2**20  # live RSS (after gc and malloc_trim) a long run may add


# --- seeds: every allowed format, in the modes and shapes the decoder treats differently ------

def _save(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def _seeds() -> dict[str, bytes]:
    grey = Image.open(ROOT / "Images" / "sneaker7.png").convert("L")
    photo = Image.merge("RGB", (grey, grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT), grey)
                        ).resize((64, 40))
    rgba = photo.convert("RGBA")
    rgba.putalpha(grey.resize((64, 40)))
    frames = [grey.convert("P"), grey.transpose(Image.Transpose.ROTATE_90).convert("P")]
    return {
        "png_grey": (ROOT / "Images" / "sneaker7.png").read_bytes(),
        "png_rgba": _save(rgba, "PNG"),
        "png_palette": _save(photo.convert("P"), "PNG", transparency=0),
        "png_16bit": _save(grey.convert("I;16"), "PNG"),
        "png_interlaced": _save(photo, "PNG", interlace=True),
        "png_1bit": _save(grey.convert("1"), "PNG"),
        "jpeg": _save(photo, "JPEG", quality=80),
        "jpeg_grey_progressive": _save(grey, "JPEG", progressive=True),
        "gif": _save(grey.convert("P"), "GIF"),
        "gif_animated": _save(frames[0], "GIF", save_all=True, append_images=frames[1:],
                              duration=50, loop=0, transparency=0),
        "bmp": _save(photo, "BMP"),
        "bmp_1bit": _save(grey.convert("1"), "BMP"),
        "webp_lossy": _save(photo, "WEBP", quality=60),
        "webp_lossless_rgba": _save(rgba, "WEBP", lossless=True),
        "webp_animated": _save(photo, "WEBP", save_all=True,
                               append_images=[photo.rotate(90)], duration=50),
    }


SEEDS = _seeds()
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"GIF87a", b"BM", b"RIFF\0\0\0\0WEBP",
         b"II*\x00", b"%PDF", b"<svg", b"iVBORw0KGgo", b"\x1f\x8b"]


def _fix_png_crcs(data: bytes) -> bytes:
    """Recompute every chunk's CRC, so that a mutation gets past the CRC checks to the
    decoders."""
    out, pos = bytearray(data[:8]), 8
    while pos + 8 <= len(data):
        length = struct.unpack_from(">I", data, pos)[0]
        end = pos + 8 + length
        if end + 4 > len(data):
            out += data[pos:]
            return bytes(out)
        out += data[pos:end] + struct.pack(">I", zlib.crc32(data[pos + 4:end]))
        pos = end + 4
    return bytes(out + data[pos:])


def _set_size(data: bytes, width: int, height: int) -> bytes:
    """The format's declared width and height set to these, where the header holds them."""
    buf = bytearray(data)
    if data.startswith(b"\x89PNG") and len(buf) >= 24:
        buf[16:24] = struct.pack(">II", width & 0xFFFFFFFF, height & 0xFFFFFFFF)
        return _fix_png_crcs(bytes(buf))
    if data.startswith(b"GIF") and len(buf) >= 10:
        buf[6:10] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    elif data.startswith(b"BM") and len(buf) >= 26:
        buf[18:26] = struct.pack("<ii", width & 0x7FFFFFFF, -(height & 0x7FFFFFFF))
    elif data.startswith(b"\xff\xd8") and (sof := data.find(b"\xff\xc0")) > 0 and len(buf) > sof + 9:
        buf[sof + 5:sof + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
    elif data[8:12] == b"WEBP" and data[12:16] == b"VP8X" and len(buf) >= 30:
        buf[24:30] = ((width - 1) & 0xFFFFFF).to_bytes(3, "little") + (
            (height - 1) & 0xFFFFFF).to_bytes(3, "little")
    return bytes(buf)


def _mutate(data: bytes, ops: list[tuple[Any, ...]]) -> bytes:
    for op, *args in ops:
        n = max(len(data), 1)
        if op == "truncate":
            data = data[:args[0] % n]
        elif op == "flip":
            pos = args[0] % n
            data = data[:pos] + bytes([data[pos] ^ (1 << args[1])]) + data[pos + 1:] if data else data
        elif op == "overwrite":
            pos = args[0] % n
            data = data[:pos] + args[1] + data[pos + len(args[1]):]
        elif op == "insert":
            pos = args[0] % n
            data = data[:pos] + args[1] + data[pos:]
        elif op == "delete":
            pos = args[0] % n
            data = data[:pos] + data[pos + args[1]:]
        elif op == "size":
            data = _set_size(data, args[0], args[1])
        elif op == "fix_crc" and data.startswith(b"\x89PNG"):
            data = _fix_png_crcs(data)
    return data


_pos = st.integers(0, 2**16)
_chunk = st.binary(min_size=1, max_size=16)
_dimension = st.sampled_from([0, 1, 27, 28, 29, 4096, 4097, 65535, 2**24, 2**31 - 1, 2**32 - 1]
                             ) | st.integers(0, 2**32 - 1)
_op = st.one_of(
    st.tuples(st.just("truncate"), _pos), st.tuples(st.just("flip"), _pos, st.integers(0, 7)),
    st.tuples(st.just("overwrite"), _pos, _chunk), st.tuples(st.just("insert"), _pos, _chunk),
    st.tuples(st.just("delete"), _pos, st.integers(1, 64)),
    st.tuples(st.just("size"), _dimension, _dimension), st.tuples(st.just("fix_crc")))
mutated_images = st.builds(_mutate, st.sampled_from(sorted(SEEDS)).map(SEEDS.__getitem__),
                           st.lists(_op, min_size=1, max_size=4))
payloads = st.one_of(
    mutated_images, st.binary(max_size=512),
    st.builds(bytes.__add__, st.sampled_from(MAGIC), st.binary(max_size=256)),
    st.sampled_from(sorted(SEEDS)).map(SEEDS.__getitem__))


# --- Open Inference Protocol bodies ------------------------------------------------------------

_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
    st.text(max_size=8), st.sampled_from([0, 255, 255.5, -1, 1e308, 28, 784]))
_json = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=6), inner, max_size=4), max_leaves=12)
_shape = st.one_of(
    st.sampled_from([[1, 28, 28], [2, 784], [1, 28, 28, 1], [0, 28, 28], [257, 784], [1, 784]]),
    st.lists(st.integers(-2, 2**40) | st.floats() | st.booleans(), max_size=5), _json)


@st.composite
def oip_bodies(draw: st.DrawFn) -> bytes:
    """Mostly well-formed tensors with one field gone wrong, some raw text and nesting."""
    kind = draw(st.sampled_from(["tensor"] * 4 + ["json", "text", "deep", "bignum"]))
    if kind == "text":
        return draw(st.binary(max_size=256))
    if kind == "deep":
        depth = draw(st.integers(1, 100_000))
        return b"[" * depth + b"]" * draw(st.integers(0, depth))
    if kind == "bignum":
        digits = draw(st.integers(300, 5000))
        return b'{"inputs": [{"shape": [1, 784], "datatype": "FP32", "data": [' + b"9" * digits + b"]}]}"
    if kind == "json":
        return json.dumps(draw(_json)).encode()
    rows = draw(st.integers(1, 3))
    shape: Any = draw(st.sampled_from([[rows, 28, 28], [rows, 784], [rows, 28, 28, 1]]))
    datatype: Any = draw(st.sampled_from(["FP32", "UINT8"]))
    level = draw(st.sampled_from([0, 255, 17]) | st.floats(0, 255))
    data: Any = np.full(shape, level).tolist() if draw(st.booleans()) else [level] * (784 * rows)
    for fault in sorted(draw(st.lists(st.sampled_from(["shape", "datatype", "data", "value"]),
                                      max_size=2, unique=True)), key=lambda f: f != "value"):
        if fault == "shape":
            shape = draw(_shape)
        elif fault == "datatype":
            datatype = draw(st.sampled_from(["INT64", "fp32", "BYTES", None]) | _json)
        elif fault == "data":
            data = draw(st.one_of(st.lists(_json_leaf, max_size=8), _json, st.builds(
                lambda v, n: [v] * n, _json_leaf, st.sampled_from([783, 785, 1568]))))
        else:  # one value wrong: sorted first, so data is still the good tensor here
            flat = np.asarray(data, dtype=object).ravel().tolist()
            flat[draw(st.integers(0, len(flat) - 1))] = draw(_json_leaf)
            data = flat
    tensor = {"name": "input", "shape": shape, "datatype": datatype, "data": data}
    drop = draw(st.sampled_from([None, None, None, "shape", "datatype", "data"]))
    if drop:
        del tensor[drop]
    body: dict[str, Any] = {"inputs": [tensor]}
    if draw(st.booleans()):
        body["id"] = draw(_json)
    return json.dumps(body).encode()  # allow_nan: NaN and Infinity, which json.loads accepts


# --- headers, as the brokers hand them over -------------------------------------------------

_names = st.sampled_from([protocol.REQUEST_ID, protocol.CONTENT_TYPE, protocol.SENT_AT,
                          protocol.REPLY_TO, protocol.TRACEPARENT, protocol.LABEL, "x"]) | st.text(
    max_size=300)
_values = st.one_of(
    st.binary(max_size=64), st.binary(min_size=1000, max_size=1100),
    st.sampled_from([b"", b"application/json", b"image/png", b"res_predict", b"res_predict.c1",
                     b"req_predict", b"0", b"7", b"10", b"-1", b"1e3", b"\xd9\xa1\xd9\xa2",
                     b"9" * 20, b"9" * 400, b"18446744073709551616", b"-9223372036854775809",
                     b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                     "caf\u00e9".encode(), b"\xff\xfe", b"a" * 129]),
    st.text(max_size=40).map(str.encode))


def kafka_headers(pairs: list[tuple[str, bytes | None]]) -> dict[str, str]:
    """What the Kafka consumer makes of a record's header list (``KafkaConsumer._message``):
    values decoded as UTF-8 with replacement, a repeated name's last value wins."""
    return {name: (value or b"").decode("utf-8", "replace") for name, value in pairs}


_NUMBERS = [b"0", b"7", b"-1", b"1e3", b" 12 ", b"1_000", b"+5", b"\xd9\xa1\xd9\xa2", b"9" * 20,
            b"9" * 1000, b"9" * 5000, b"18446744073709551616", b"-9223372036854775809",
            str(protocol.MAX_SENT_AT_MS).encode(), str(protocol.MAX_SENT_AT_MS + 1).encode()]
_protocol_headers = st.fixed_dictionaries({}, optional={
    protocol.REQUEST_ID: st.sampled_from([b"r-1", b"a" * 128, b"a" * 129, b"a b", b"\xff"]) | _values,
    protocol.SENT_AT: st.sampled_from(_NUMBERS) | st.integers().map(lambda n: str(n).encode()),
    protocol.REPLY_TO: st.sampled_from([b"res_predict", b"res_predict.c1", b"res_predict.",
                                        b"req_predict", b"res_predict./x", b"res_predict." + b"x" * 240]),
    protocol.TRACEPARENT: _values, protocol.LABEL: st.sampled_from(_NUMBERS) | _values,
    protocol.CONTENT_TYPE: st.sampled_from([b"application/json", b"APPLICATION/JSON; charset=x",
                                            b"application/vnd.oip+json", b"image/png"]) | _values,
}).map(lambda d: kafka_headers(list(d.items())))

headers = st.one_of(
    _protocol_headers,
    st.lists(st.tuples(_names, _values | st.none()), max_size=8).map(kafka_headers),
    st.lists(st.tuples(_names, _values), min_size=60, max_size=70).map(kafka_headers),
    st.dictionaries(st.text(min_size=1, max_size=256), st.text(max_size=1024), max_size=6))


def message(value: bytes, headers: dict[str, str], offset: int = 0) -> Message:
    return Message(value=value, headers=headers, key=None, topic="req_predict",
                   source_id=f"req_predict/0/{offset}", broker_time_ms=None,
                   received_at=time.time())


requests = st.one_of(
    st.builds(message, payloads, headers),
    st.builds(lambda body, h: message(body, {**h, protocol.CONTENT_TYPE: "application/json"}),
              oip_bodies(), headers))


# --- the properties -----------------------------------------------------------------------

def check_decode(payload: bytes) -> str:
    """``imaging.decode``: a valid model input, or an ImageError with a wire code."""
    try:
        pixels = imaging.decode(payload, CFG.imaging)
    except ImageError as exc:
        assert exc.code in protocol.ERROR_CODES, exc.code
        return exc.code
    finally:
        assert png._available, "a request must not turn the PNG fast path off"
    assert pixels.shape == (28, 28) and pixels.dtype == np.float32
    assert np.all(np.isfinite(pixels)) and pixels.min() >= 0 and pixels.max() <= 255
    return "ok"


def check_decode_many(batch: list[bytes]) -> list[str]:
    """``imaging.decode_many``: one row or one error per payload, in order."""
    decoded = imaging.decode_many(batch, CFG.imaging)
    bad = [i for i, _ in decoded.errors]
    assert bad == sorted(set(bad)) and all(0 <= i < len(batch) for i in bad)
    assert decoded.pixels.shape == (len(batch) - len(bad), 28, 28, 1)
    assert all(exc.code in protocol.ERROR_CODES for _, exc in decoded.errors)
    codes = {i: exc.code for i, exc in decoded.errors}
    return [codes.get(i, "ok") for i in range(len(batch))]


def check_parse_request(msg: Message) -> str:
    """``protocol.parse_request``, then the answers it leads to: each one publishable."""
    request, error = protocol.parse_request(msg, RESPONSE_TOPIC)
    assert error is None or error.code in protocol.ERROR_CODES
    assert protocol.reply_allowed(request.reply_to, RESPONSE_TOPIC)
    model = {"name": "fmnist", "version": "0"}
    out = protocol.response(request, model=model, worker_id="w", inference_ms=1.0,
                            error=error or protocol.RequestError("internal_error", "x"))
    json.loads(out.value)
    protocol.dead_letter(request, error or protocol.RequestError("internal_error", "x"),
                         DLQ_TOPIC, "w")
    return error.code if error else "ok"


def check_oip(body: bytes) -> str:
    """``oip.parse``: pixels in 0..255, or a RequestError."""
    try:
        _, pixels = oip.parse(body)
    except protocol.RequestError as exc:
        assert exc.code == "invalid_request"
        return exc.code
    assert pixels.ndim == 3 and pixels.shape[1:] == (28, 28) and 0 < len(pixels) <= oip.MAX_ROWS
    assert np.all(np.isfinite(pixels)) and pixels.min() >= 0 and pixels.max() <= 255
    return "ok"


def check_batch(handler: handler_module.PredictionHandler, batch: list[Message]) -> list[str]:
    """The worker's own step: one answer per request on its reply topic, an error answer with
    a wire code and a dead letter for each failure, nothing else, nothing raised."""
    result = handler.prepare(batch).finish()
    assert len(result.outcomes) == len(batch)
    answers = [m for m in result.out if m.topic not in (DLQ_TOPIC, FEEDBACK_TOPIC)]
    letters = [m for m in result.out if m.topic == DLQ_TOPIC]
    records = [m for m in result.out if m.topic == FEEDBACK_TOPIC]
    assert len(answers) == len(batch)
    assert len(records) == len(result.labelled)  # answered with a label 0-9: also a record
    failed = [code for code in result.outcomes if code != "ok"]
    assert len(letters) == len(failed)
    assert all(code in protocol.ERROR_CODES and code != "internal_error" for code in failed), (
        f"an input reached internal_error: {failed}")
    for msg, answer, outcome in zip(batch, answers, result.outcomes, strict=True):
        request, _ = protocol.parse_request(msg, RESPONSE_TOPIC)
        assert answer.topic == request.reply_to
        assert answer.headers.get(protocol.ERROR_CODE) == (None if outcome == "ok" else outcome)
        body = json.loads(answer.value)
        if oip.is_oip(request.content_type, msg.value):
            assert ("error" in body) == (outcome != "ok")
        else:
            assert body["status"] == ("ok" if outcome == "ok" else "error")
    for letter in letters:  # what a broker takes: bounded payload and headers
        assert len(letter.value) <= CFG.imaging.max_payload_bytes
        assert len(letter.headers) <= protocol.MAX_HEADERS + 8
        assert all(len(v.encode()) <= protocol.MAX_HEADER_VALUE for v in letter.headers.values())
    return result.outcomes


# name -> (strategy, property); benchmarks/fuzz.py runs these for longer.
TARGETS: dict[str, tuple[st.SearchStrategy[Any], Callable[..., Any]]] = {
    "decode": (payloads, check_decode),
    "decode_many": (st.lists(payloads, max_size=6), check_decode_many),
    "parse_request": (st.builds(message, st.binary(max_size=16), headers), check_parse_request),
    "oip_parse": (oip_bodies(), check_oip),
}
BATCHES = st.lists(requests, min_size=1, max_size=6).map(
    lambda ms: [message(m.value, m.headers, i) for i, m in enumerate(ms)])


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def rss() -> int:
    """The process's resident memory now, in bytes (the peak where /proc is missing)."""
    return _status("VmRSS") or peak_rss()


def peak_rss() -> int:
    """The process's peak resident memory in bytes, since it started or ``reset_peak``."""
    return _status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Set the peak RSS to the RSS now (Linux's clear_refs), so that the next ``peak_rss``
    is what came after; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def live_rss() -> int:
    """The RSS after a garbage collection and, on glibc, ``malloc_trim``: the memory in use,
    not what the allocator keeps from freed objects (a leak shows here, a past peak does not)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    return rss()


try:  # glibc only: hands freed heap back to the kernel, so the RSS shows what is in use
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6")
    if not hasattr(_LIBC, "malloc_trim"):
        _LIBC = None
except OSError:
    _LIBC = None


def peak_of(check: Callable[[Any], Any], value: Any) -> tuple[Any, int | None]:
    """``check(value)``, and the bytes its peak RSS rose above the RSS before it (None where
    the peak cannot be reset)."""
    if not reset_peak():
        return check(value), None
    before = rss()
    result = check(value)
    return result, peak_rss() - before


@pytest.fixture
def rss_bound():
    """No example of the test peaks more than ``REQUEST_PEAK_LIMIT`` above the RSS before the
    test (measured after the module-scoped fixtures, such as the loaded model)."""
    before = rss() if reset_peak() else peak_rss()
    yield
    assert peak_rss() - before < REQUEST_PEAK_LIMIT


# The costliest legal inputs, found by the long run's peak per example: 1-2 KB files whose
# header (an animation's canvas) declares 4096 x 4096 pixels, all decoded.
WEBP_CANVAS_4096 = _set_size(SEEDS["webp_animated"], 4096, 4096)  # 16 bytes a pixel: 256 MiB
GIF_CANVAS_4096 = _set_size(SEEDS["gif_animated"], 4096, 4096)  # 10 bytes a pixel


@FUZZ
@given(payloads)
@example(WEBP_CANVAS_4096)
def test_decode_answers_every_payload(rss_bound, payload: bytes) -> None:
    check_decode(payload)


@FUZZ
@given(st.lists(payloads, max_size=6))
@example([WEBP_CANVAS_4096, GIF_CANVAS_4096] * 3)
def test_decode_many_accounts_for_every_payload(rss_bound, batch: list[bytes]) -> None:
    check_decode_many(batch)


@pytest.mark.skipif(not reset_peak(), reason="needs Linux's /proc/self/clear_refs")
def test_a_batch_of_the_costliest_images_peaks_at_one_request_not_six() -> None:
    """Six 4096x4096 images, each within the limits, peak near one's cost (256 MiB for the
    WebP), not six times it: each request's memory is freed before the next is decoded."""
    big_png = _save(Image.new("RGBA", (4096, 4096), (255, 255, 255, 0)), "PNG")
    batch = [WEBP_CANVAS_4096, big_png, GIF_CANVAS_4096] * 2
    live_rss()
    decoded, peak = peak_of(lambda b: imaging.decode_many(b, CFG.imaging), batch)
    assert decoded.errors == [] and len(decoded.pixels) == 6
    assert peak is not None and peak < REQUEST_PEAK_LIMIT, f"{peak / 2**20:.0f} MiB"


HUGE_SENT_AT = "99999999999999999999"  # crashed the response: over orjson's 64-bit ints
OIP_REGRESSIONS = [  # each raised out of oip.parse, so was answered internal_error
    b"[" * 100_000,  # RecursionError in json.loads
    b'{"inputs": [{"shape": [1, 784], "datatype": "FP32", "data": [' + b"9" * 5000 + b"]}]}",
    b'{"inputs": [{"shape": [1, 784], "datatype": "FP32", "data": [' + b"9" * 400 + b"]}]}",
    b'{"inputs": [{"shape": [1, 784], "datatype": [], "data": []}]}',  # unhashable datatype
]


@FUZZ
@given(TARGETS["parse_request"][0])
@example(message(b"x", {protocol.SENT_AT: HUGE_SENT_AT}))
@example(message(b"x", {protocol.SENT_AT: "18446744073709551616"}))
@example(message(b"x", {protocol.SENT_AT: "-9" + "9" * 400}))
def test_parse_request_answers_any_headers(rss_bound, msg: Message) -> None:
    check_parse_request(msg)


@FUZZ
@given(oip_bodies())
@example(OIP_REGRESSIONS[0])
@example(OIP_REGRESSIONS[1])
@example(OIP_REGRESSIONS[2])
@example(OIP_REGRESSIONS[3])
def test_oip_parse_answers_any_body(rss_bound, body: bytes) -> None:
    check_oip(body)


@pytest.fixture(scope="module")
def served() -> handler_module.PredictionHandler:
    from fmnist.model.predictor import Predictor

    return handler_module.PredictionHandler(CFG, Predictor.configured(CFG, max_batch=8), "fuzz")


@pytest.mark.slow
@settings(FUZZ, max_examples=100)
@given(BATCHES)
def test_handler_answers_or_dead_letters_every_request(rss_bound, served, batch) -> None:
    check_batch(served, batch)


@pytest.mark.parametrize("sent_at", [HUGE_SENT_AT, "-1", str(protocol.MAX_SENT_AT_MS + 1)])
def test_a_sent_at_out_of_range_is_invalid_headers_not_a_crash(sent_at: str) -> None:
    request, error = protocol.parse_request(message(b"x", {protocol.SENT_AT: sent_at}),
                                            RESPONSE_TOPIC)
    assert error is not None and error.code == "invalid_headers"
    assert request.sent_at_ms is None


def test_the_worker_answers_the_regressions_alongside_good_requests() -> None:
    """Each input that once escaped the handler, in one batch between good requests: every
    one answered with its code and dead-lettered, the good ones answered ok (the labelled one
    also recorded on the feedback topic)."""
    from tests.fakes import BrightnessPredictor

    handler = handler_module.PredictionHandler(CFG, BrightnessPredictor(), "fuzz")
    good = SEEDS["png_grey"]
    batch = [message(good, {}), message(b"x", {protocol.SENT_AT: HUGE_SENT_AT}),
             *(message(body, {protocol.CONTENT_TYPE: "application/json"})
               for body in OIP_REGRESSIONS), message(good, {protocol.LABEL: "7"})]
    batch = [message(m.value, m.headers, i) for i, m in enumerate(batch)]
    outcomes = check_batch(handler, batch)
    assert outcomes == ["ok", "invalid_headers", *["invalid_request"] * 4, "ok"]


@pytest.mark.parametrize("mode", ["I;16", "RGBA"])
def test_a_big_image_within_the_limits_costs_at_most_10_bytes_a_pixel(mode: str) -> None:
    """A 32-75 KB PNG of 4096x4096 pixels (within imaging.max_pixels) made decode allocate
    24 (16-bit) and 14 (RGBA) bytes a pixel in numpy temporaries: 384 and 224 MiB."""
    payload = _save(Image.new(mode, (4096, 4096), (255, 255, 255, 0) if mode == "RGBA" else 0),
                    "PNG")
    tracemalloc.start()
    try:
        imaging.decode(payload, CFG.imaging)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 10 * 4096 * 4096, f"{peak / 2**20:.0f} MiB"
