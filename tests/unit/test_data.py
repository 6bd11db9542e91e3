"""The data layer: IDX parsing, gzip and checksum errors, the real dataset, the CSV layout and the
order in which sources are searched. No network: downloads are in tests/integration."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from fmnist import data
from fmnist.config import DataConfig
from fmnist.errors import DataError

TEST_IMAGES, TEST_LABELS = data.IDX_FILES[("test", "images")], data.IDX_FILES[("test", "labels")]
CSV_HEADER = "label," + ",".join(f"pixel{i}" for i in range(1, 785))

pytestmark = pytest.mark.usefixtures("clean_env")


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX: 0x0000, type 0x08, ndim, big-endian dims, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def csv_text(labels: np.ndarray, images: np.ndarray, header: str = CSV_HEADER) -> str:
    table = np.concatenate([labels.reshape(-1, 1), images.reshape(len(labels), -1)], axis=1)
    return header + "\n" + "".join(",".join(map(str, row)) + "\n" for row in table.tolist())


def rng_split(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 10, n, dtype=np.uint8),
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))


def touch_idx(directory: Path, suffix: str = ".gz") -> Path:
    """Placeholder files: enough for `find`, which only checks that all four exist."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in data.IDX_FILES.values():
        (directory / f"{name}{suffix}").write_bytes(b"")
    return directory


def touch_csv(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in data.CSV_FILES.values():
        (directory / name).write_text(CSV_HEADER + "\n")
    return directory


# --- IDX parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 28, 28), (5,), (2, 4, 3), (0,)])
def test_read_idx_round_trips(shape: tuple[int, ...]) -> None:
    array = np.arange(int(np.prod(shape)), dtype=np.int64).astype(np.uint8).reshape(shape)
    parsed = data.read_idx(idx_bytes(array), "x")
    assert parsed.shape == shape and parsed.dtype == np.uint8
    np.testing.assert_array_equal(parsed, array)


@pytest.mark.parametrize(("raw", "fragment"), [
    (b"", "x is truncated: 0 bytes is shorter than an IDX header"),
    (b"\x00\x00\x08\x01\x00\x00", "x is truncated: 6 bytes is shorter than an IDX header"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x01\x00\x00", "x is truncated: 10 bytes is shorter than its "
                                                  "16-byte header"),
    (b"\x08\x03\x00\x00" + b"\x00" * 12, "bad magic number"),        # magic bytes shifted
    (b"\x00\x00\x0d\x01\x00\x00\x00\x01" + b"\x00" * 4, "bad magic number"),  # float32 type
    (b"\x00\x00\x08\x02\x00\x00\x00\x01\x00\x00\x00\x01\x00", "bad magic number"),  # 2 dims
    (b"\x00\x00\x08\x00\x00\x00\x00\x00", "bad magic number"),       # 0 dims
])
def test_read_idx_rejects_bad_headers(raw: bytes, fragment: str) -> None:
    with pytest.raises(DataError) as info:
        data.read_idx(raw, "x")
    assert fragment in info.value.message
    assert info.value.exit_code == 3


def test_read_idx_rejects_truncated_padded_and_wrong_dims() -> None:
    good = idx_bytes(np.zeros((2, 28, 28), np.uint8))
    assert len(good) == 16 + 2 * 784
    with pytest.raises(DataError, match=r"truncated or padded: 1583 bytes, .* promises 1584"):
        data.read_idx(good[:-1], "x")
    with pytest.raises(DataError, match=r"truncated or padded: 1585 bytes, .* promises 1584"):
        data.read_idx(good + b"\x00", "x")
    wrong_dims = good[:4] + (3).to_bytes(4, "big") + good[8:]  # header: 3 images, data: 2
    with pytest.raises(DataError, match=r"truncated or padded: 1584 bytes, .* promises 2368"):
        data.read_idx(wrong_dims, "x")


# --- gzip and checksums --------------------------------------------------------------------


def write_test_split(directory: Path, images: np.ndarray, labels: np.ndarray,
                     compress: bool = True) -> data.Source:
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in ((TEST_IMAGES, images), (TEST_LABELS, labels)):
        raw = idx_bytes(array)
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / name).write_bytes(raw)
    return data.Source(directory, "idx")


def test_a_valid_idx_file_that_is_not_fashion_mnist_fails_its_checksum(tmp_path: Path) -> None:
    labels, images = rng_split(5)
    source = write_test_split(tmp_path, images, labels)
    with pytest.raises(DataError) as info:
        data.load_split("test", source)
    message = info.value.message
    assert str(tmp_path / f"{TEST_IMAGES}.gz") in message
    assert "fails its SHA-256 check" in message and "not Fashion-MNIST" in message
    digest = hashlib.sha256(idx_bytes(images)).hexdigest()
    assert f"got {digest[:12]}" in message
    assert f"expected {data.IDX_SHA256[TEST_IMAGES][:12]}" in message
    assert "Delete it and fetch it again" in info.value.hint


def test_a_truncated_idx_file_says_truncated_not_just_checksum(tmp_path: Path) -> None:
    labels, images = rng_split(5)
    source = write_test_split(tmp_path, images, labels, compress=False)
    raw = (tmp_path / TEST_IMAGES).read_bytes()
    (tmp_path / TEST_IMAGES).write_bytes(raw[:-100])
    with pytest.raises(DataError, match="is truncated or padded"):
        data.load_split("test", source)


def test_a_truncated_gz_is_a_data_error(tmp_path: Path, real_data_dir: Path) -> None:
    gz = (real_data_dir / f"{TEST_LABELS}.gz").read_bytes()
    (tmp_path / f"{TEST_LABELS}.gz").write_bytes(gz[: len(gz) // 2])
    (tmp_path / f"{TEST_IMAGES}.gz").write_bytes((real_data_dir / f"{TEST_IMAGES}.gz").read_bytes())
    with pytest.raises(DataError) as info:
        data.load_split("test", data.Source(tmp_path, "idx"))
    assert f"{tmp_path / TEST_LABELS}.gz is not a readable gzip file" in info.value.message
    assert "cut short" in info.value.message


@pytest.mark.parametrize(("damage", "reason"), [
    ("deflate", "invalid block type"),  # zlib.error, not an OSError
    ("middle", "CRC check failed"),
    ("crc", "CRC check failed"),
    ("not-gzip", "Not a gzipped file"),
])
def test_a_corrupt_gz_is_a_data_error(tmp_path: Path, real_data_dir: Path, damage: str,
                                      reason: str) -> None:
    gz = bytearray((real_data_dir / f"{TEST_LABELS}.gz").read_bytes())
    if damage == "deflate":
        gz[10] = 0xFF  # the first deflate block header, right after the 10-byte gzip header
    elif damage == "middle":
        gz[len(gz) // 2: len(gz) // 2 + 4] = b"\xff" * 4
    elif damage == "crc":
        gz[-8] ^= 0xFF  # the CRC-32 of the content
    else:
        gz = bytearray(b"<html>404</html>")
    path = tmp_path / f"{TEST_LABELS}.gz"
    path.write_bytes(gz)
    with pytest.raises(DataError) as info:
        data._read_bytes(path)
    assert f"{path} is not a readable gzip file" in info.value.message
    assert reason in info.value.message


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    labels, images = rng_split(2)
    source = write_test_split(tmp_path, images, labels)
    (tmp_path / f"{TEST_IMAGES}.gz").unlink()
    with pytest.raises(DataError, match=f"{TEST_IMAGES} is missing from {tmp_path}"):
        data.load_split("test", source)


def test_an_unknown_split_is_a_data_error(real_data_dir: Path) -> None:
    with pytest.raises(DataError, match="Unknown split 'validation'"):
        data.load_split("validation", data.Source(real_data_dir, "idx"))


# --- the real dataset ----------------------------------------------------------------------


def test_the_real_test_split_verifies_and_loads(real_test_split: data.Split) -> None:
    assert real_test_split.images.shape == (10000, 28, 28)
    assert real_test_split.images.dtype == np.uint8 and real_test_split.labels.dtype == np.uint8
    assert real_test_split.labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert np.bincount(real_test_split.labels).tolist() == [1000] * 10
    assert real_test_split.sha256 == {n: data.IDX_SHA256[n] for n in (TEST_IMAGES, TEST_LABELS)}


def test_the_real_train_split_verifies_and_loads(real_data_dir: Path) -> None:
    train = data.load_split("train", data.Source(real_data_dir, "idx"))
    assert train.images.shape == (60000, 28, 28)
    assert train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert set(train.sha256) == {"train-images-idx3-ubyte", "train-labels-idx1-ubyte"}


def test_gunzipped_copies_verify_and_load_identical_arrays(
        tmp_path: Path, real_data_dir: Path, real_test_split: data.Split) -> None:
    for name in (TEST_IMAGES, TEST_LABELS):
        (tmp_path / name).write_bytes(gzip.decompress((real_data_dir / f"{name}.gz").read_bytes()))
    plain = data.load_split("test", data.Source(tmp_path, "idx"))
    np.testing.assert_array_equal(plain.images, real_test_split.images)
    np.testing.assert_array_equal(plain.labels, real_test_split.labels)
    assert plain.sha256 == real_test_split.sha256


def test_a_gz_file_is_preferred_over_an_uncompressed_one(tmp_path: Path, real_data_dir: Path,
                                                         real_test_split: data.Split) -> None:
    for name in (TEST_IMAGES, TEST_LABELS):
        (tmp_path / f"{name}.gz").write_bytes((real_data_dir / f"{name}.gz").read_bytes())
        (tmp_path / name).write_bytes(b"stale junk")
    loaded = data.load_split("test", data.Source(tmp_path, "idx"))
    np.testing.assert_array_equal(loaded.labels, real_test_split.labels)


def test_describe_reports_sizes_class_balance_and_checksums(real_data_dir: Path) -> None:
    info = data.describe(data.Source(real_data_dir, "idx"))
    assert info["source"] == str(real_data_dir) and info["layout"] == "idx"
    assert info["train"]["images"] == 60000 and info["test"]["images"] == 10000  # type: ignore[index]
    assert info["test"]["per_class"]["Ankle boot"] == 1000  # type: ignore[index]
    assert set(info["train"]["per_class"].values()) == {6000}  # type: ignore[index]
    assert info["test"]["sha256"][TEST_LABELS] == data.IDX_SHA256[TEST_LABELS]  # type: ignore[index]


# --- the Kaggle CSV layout -----------------------------------------------------------------


@pytest.fixture(scope="session")
def real_test_csv(tmp_path_factory: pytest.TempPathFactory,
                  real_test_split: data.Split) -> Path:
    """fashion-mnist_test.csv written from the real IDX test split (22 MB, about a second)."""
    directory = tmp_path_factory.mktemp("csv")
    path = directory / data.CSV_FILES["test"]
    path.write_text(csv_text(real_test_split.labels, real_test_split.images))
    return path


def test_csv_and_idx_give_identical_arrays(real_test_csv: Path,
                                           real_test_split: data.Split) -> None:
    loaded = data.load_split("test", data.Source(real_test_csv.parent, "csv"))
    np.testing.assert_array_equal(loaded.images, real_test_split.images)
    np.testing.assert_array_equal(loaded.labels, real_test_split.labels)
    assert loaded.images.dtype == np.uint8 and loaded.images.shape == (10000, 28, 28)
    assert loaded.sha256 == {
        "fashion-mnist_test.csv": hashlib.sha256(real_test_csv.read_bytes()).hexdigest()}


def test_a_full_size_csv_missing_rows_is_truncated(tmp_path: Path, real_test_csv: Path) -> None:
    lines = real_test_csv.read_text().splitlines(keepends=True)
    short = tmp_path / data.CSV_FILES["test"]
    short.write_text("".join(lines[:-10]))
    with pytest.raises(DataError) as info:
        data.load_split("test", data.Source(tmp_path, "csv"))
    assert "holds 9990 images; the test split has 10000. The file is truncated." in str(info.value)


def small_csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "small.csv"
    path.write_text(text)
    return path


def test_a_small_csv_loads_with_its_expected_row_count(tmp_path: Path) -> None:
    labels, images = rng_split(3)
    loaded = data._load_csv(small_csv(tmp_path, csv_text(labels, images)), "test", 3)
    np.testing.assert_array_equal(loaded.images, images)
    np.testing.assert_array_equal(loaded.labels, labels)


def test_csv_tolerates_crlf_and_blank_lines(tmp_path: Path) -> None:
    labels, images = rng_split(2)
    text = csv_text(labels, images).replace("\n", "\r\n") + "\r\n\r\n"
    loaded = data._load_csv(small_csv(tmp_path, text), "test", 2)
    np.testing.assert_array_equal(loaded.images, images)


def test_csv_with_fewer_rows_than_expected_is_truncated(tmp_path: Path) -> None:
    labels, images = rng_split(3)
    with pytest.raises(DataError, match="holds 3 images; the test split has 4"):
        data._load_csv(small_csv(tmp_path, csv_text(labels, images)), "test", 4)


def test_csv_with_only_a_header_holds_no_images(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds 0 images; the train split has 60000"):
        data._load_csv(small_csv(tmp_path, CSV_HEADER + "\n"), "train")


def test_csv_cut_mid_row_is_a_data_error(tmp_path: Path) -> None:
    labels, images = rng_split(3)
    text = csv_text(labels, images)
    path = small_csv(tmp_path, text[: len(text) - 1000])  # the last row loses ~300 values
    with pytest.raises(DataError) as info:
        data._load_csv(path, "test", 3)
    assert f"{path} is truncated or corrupt: the number of columns changed from 785" in str(
        info.value)
    assert "usecols" not in str(info.value)


@pytest.mark.parametrize("header", [
    "", "pixel1,label", "label," + ",".join(f"pixel{i}" for i in range(1, 784)),
    "1," + ",".join(["0"] * 784),  # no header at all: the first row is data
])
def test_csv_with_a_bad_header_is_rejected(tmp_path: Path, header: str) -> None:
    labels, images = rng_split(1)
    path = small_csv(tmp_path, csv_text(labels, images, header=header))
    with pytest.raises(DataError, match="is not a Fashion-MNIST CSV: the header must be"):
        data._load_csv(path, "test", 1)


def test_csv_with_rows_of_the_wrong_width_is_rejected(tmp_path: Path) -> None:
    rows = "\n".join(",".join(["1"] * 784) for _ in range(2))
    with pytest.raises(DataError, match="has 784 columns, expected 785"):
        data._load_csv(small_csv(tmp_path, f"{CSV_HEADER}\n{rows}\n"), "test", 2)


@pytest.mark.parametrize(("value", "fragment"), [
    ("x", "could not convert string 'x'"),
    ("1.5", "could not convert string '1.5'"),
    ("", "could not convert string ''"),
])
def test_csv_with_a_non_numeric_value_is_rejected(tmp_path: Path, value: str,
                                                  fragment: str) -> None:
    labels, images = rng_split(2)
    text = csv_text(labels, images).splitlines()
    cells = text[2].split(",")
    cells[100] = value
    text[2] = ",".join(cells)
    with pytest.raises(DataError, match="is truncated or corrupt") as info:
        data._load_csv(small_csv(tmp_path, "\n".join(text) + "\n"), "test", 2)
    assert fragment in info.value.message


@pytest.mark.parametrize(("column", "value"), [(1, 256), (784, -1), (0, 10), (0, -1)])
def test_csv_with_an_out_of_range_value_is_rejected(tmp_path: Path, column: int,
                                                    value: int) -> None:
    labels, images = rng_split(2)
    lines = csv_text(labels, images).splitlines()
    cells = lines[1].split(",")
    cells[column] = str(value)
    lines[1] = ",".join(cells)
    with pytest.raises(DataError, match=r"a label outside 0\.\.9 or a pixel outside 0\.\.255"):
        data._load_csv(small_csv(tmp_path, "\n".join(lines) + "\n"), "test", 2)


def test_csv_that_cannot_be_read_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="Cannot read"):
        data._load_csv(tmp_path / "absent.csv", "test")


# --- where the dataset is looked for -------------------------------------------------------


@pytest.fixture
def places(fmnist_home: Path, tmp_path: Path,
           clean_env: pytest.MonkeyPatch) -> dict[str, Path]:
    """Three empty candidate folders: a configured data_dir, <project>/data and a fake Debian."""
    debian = tmp_path / "debian"
    clean_env.setattr(data, "DEBIAN_DIR", debian)
    return {"data_dir": tmp_path / "mine", "project": fmnist_home / "data", "debian": debian}


def test_candidate_dirs_are_data_dir_then_project_data_then_debian(
        places: dict[str, Path]) -> None:
    cfg = DataConfig(data_dir=places["data_dir"])
    assert data.candidate_dirs(cfg) == [places["data_dir"], places["project"], places["debian"]]
    assert data.candidate_dirs(DataConfig()) == [places["project"], places["debian"]]


def test_find_takes_the_first_complete_source(places: dict[str, Path]) -> None:
    cfg = DataConfig(data_dir=places["data_dir"], download=False)
    assert data.find(cfg) is None
    touch_idx(places["debian"])
    assert data.find(cfg) == data.Source(places["debian"], "idx")
    touch_csv(places["project"])
    assert data.find(cfg) == data.Source(places["project"], "csv")
    touch_idx(places["data_dir"], suffix="")  # gunzipped copies count too
    assert data.find(cfg) == data.Source(places["data_dir"], "idx")


def test_find_skips_an_incomplete_folder(places: dict[str, Path]) -> None:
    touch_idx(places["data_dir"])
    (places["data_dir"] / f"{TEST_LABELS}.gz").unlink()
    (places["data_dir"] / data.CSV_FILES["test"]).write_text(CSV_HEADER)  # one CSV is not a pair
    touch_idx(places["debian"])
    cfg = DataConfig(data_dir=places["data_dir"])
    assert data.find(cfg) == data.Source(places["debian"], "idx")


def test_find_accepts_a_mix_of_gz_and_uncompressed_files(places: dict[str, Path]) -> None:
    touch_idx(places["project"])
    (places["project"] / f"{TEST_LABELS}.gz").rename(places["project"] / TEST_LABELS)
    assert data.find(DataConfig()) == data.Source(places["project"], "idx")


def test_locate_without_download_names_every_folder_it_searched(places: dict[str, Path]) -> None:
    cfg = DataConfig(data_dir=places["data_dir"], download=False)
    with pytest.raises(DataError) as info:
        data.locate(cfg)
    message = info.value.message
    assert message.startswith("Fashion-MNIST not found (searched ")
    for folder in places.values():
        assert str(folder) in message
    assert "dataset-fashion-mnist" in info.value.hint and "--download" in info.value.hint
    assert info.value.exit_code == 3


def test_locate_returns_a_found_source_without_downloading(places: dict[str, Path]) -> None:
    touch_idx(places["debian"])
    cfg = DataConfig(download=True, mirror_url="http://127.0.0.1:9/unreachable/")
    assert data.locate(cfg) == data.Source(places["debian"], "idx")


def test_source_describe() -> None:
    assert data.Source(Path("/d"), "csv").describe() == "CSV files in /d"
