"""Limits and the retry policy of every Pub/Sub call."""

from __future__ import annotations

from google.api_core import exceptions as gexc
from google.api_core import retry as gretry

READER_TTL_S = 24 * 3600  # the shortest expiration Pub/Sub accepts
CLOSE_TIMEOUT_S = 5.0
GOOGLE_ENDPOINT = "pubsub.googleapis.com"  # Pub/Sub's own, when no emulator is set
RECONNECT_MAX_MS = 1000  # the emulator's channel: the longest pause between connection attempts
RETRYABLE = (gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.Aborted,
            gexc.InternalServerError, gexc.ResourceExhausted, gexc.Unknown)
# Keyword names of PublisherClient.publish: an attribute with one of these names cannot be sent
# through it (``PubsubProducer._direct`` sends such messages).
RESERVED_ATTRIBUTES = frozenset({"topic", "data", "ordering_key", "retry", "timeout"})


def retry_policy(timeout_s: float) -> gretry.Retry:
    """Retry transient errors, but never past ``timeout_s`` in total."""
    return gretry.Retry(predicate=gretry.if_exception_type(*RETRYABLE), initial=0.05,
                        maximum=1.0, multiplier=2.0, timeout=timeout_s)
