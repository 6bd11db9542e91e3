"""fmnist: a Fashion-MNIST classifier served behind Kafka or Google Cloud Pub/Sub."""

from __future__ import annotations

UNKNOWN_VERSION = "0+unknown"  # PEP 440: running from a source tree that was never installed


def __getattr__(name: str) -> str:
    """``fmnist.__version__``, read once from the installed metadata (pyproject.toml is its one
    source). Looked up on first use, not at import: importing importlib.metadata costs ~15 ms,
    which `fmnist --help` need not pay."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        value = version("fmnist")
    except PackageNotFoundError:
        value = UNKNOWN_VERSION
    globals()["__version__"] = value
    return value
