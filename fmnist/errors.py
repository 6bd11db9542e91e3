"""The one exception tree of fmnist.

Library code raises these; only ``cli.py`` turns them into an exit code and a printed hint, so
every expected failure reaches the user as one paragraph that says what to do next, never as a
traceback.
"""

from __future__ import annotations


class FmnistError(Exception):
    """Base class: ``exit_code`` is what the CLI exits with, ``hint`` what the user can do next."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n{self.hint}" if self.hint else self.message


class ConfigError(FmnistError):
    """Bad config file, environment variable or flag (unknown key, wrong type, bad value)."""

    exit_code = 2


class UsageError(FmnistError):
    """The command line asks for something that cannot be done as asked."""

    exit_code = 2


class MissingArtifactError(FmnistError):
    """A file the command needs (weights, meta, dataset, image) is absent or unusable."""

    exit_code = 3


class DataError(MissingArtifactError):
    """The dataset is missing, corrupt, truncated or fails its checksum."""


class ModelError(MissingArtifactError):
    """Weights are missing, or their meta.json does not match what this code expects."""


class IncompatibleModel(ModelError):
    """Weights that load but do not fit this code: other classes, input shape or preprocessing."""


class ImageError(FmnistError):
    """One image could not be accepted. ``code`` is the stable error code sent on the wire."""

    exit_code = 3

    def __init__(self, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.code = code


class BrokerError(FmnistError):
    """The broker is unreachable, refused us, or did not answer in time."""

    exit_code = 4


class BrokerTimeout(BrokerError):
    """We waited the configured time and the broker (or the worker behind it) did not answer."""


class Interrupted(FmnistError):
    """The user pressed Ctrl+C or the process got SIGTERM."""

    exit_code = 130


class Cancelled(Interrupted):
    """A job stopped because someone cancelled it (`fmnist jobs cancel`)."""
