"""A private set of topics, subscriptions and consumer group for one test or benchmark run."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import Any

from fmnist import config


class Topics:
    """Request, response and dead-letter topics and a group of their own, named with a fresh
    uuid tag, so that runs never see each other's messages. Workers and clients are pointed at
    them through ``config.routing`` (as flags for a Config made here, as ``FMNIST_*``
    variables for a process)."""

    def __init__(self, broker: str, prefix: str = "") -> None:
        self.broker_name = broker
        tag = uuid.uuid4().hex[:10]
        self.request, self.response = f"{prefix}req-{tag}", f"{prefix}res-{tag}"
        self.dlq = f"{self.request}.dlq"
        self.group = f"{prefix}workers-{tag}"

    def all(self) -> list[str]:
        return [self.request, self.response, self.dlq]

    def routing(self) -> dict[str, str]:
        return config.routing(self.broker_name, self.request, self.response, self.dlq,
                              self.group)

    def env(self, overrides: Mapping[str, str] | None = None,
            inherit: bool = False) -> dict[str, str]:
        """The environment of a process using these topics. ``inherit`` keeps the caller's own
        ``FMNIST_*`` settings (a benchmark against a configured cluster); without it a test's
        process sees only the project's defaults and these topics."""
        env = {k: v for k, v in os.environ.items() if inherit or not k.startswith("FMNIST_")}
        env.update({config.env_name(k): v for k, v in self.routing().items()})
        env.update(PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
        env.update(overrides or {})
        return env

    def config(self, overrides: Mapping[str, str] | None = None, inherit: bool = False,
               sections: Mapping[str, Mapping[str, Any]] | None = None) -> config.Config:
        """The config a process started with ``env(overrides, inherit)`` sees, with
        ``sections`` (``{"kafka": {"bootstrap_servers": ...}}``) on top, as flags."""
        flags: dict[str, object] = dict(self.routing())
        for section, values in (sections or {}).items():
            flags.update({f"{section}.{k}": v for k, v in values.items()})
        return config.load(flags=flags, env=self.env(overrides, inherit))
