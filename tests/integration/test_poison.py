"""Poison never stalls a partition: each hostile request in a stream of good ones is answered
with its stable error code and dead-lettered with its original bytes, and the good requests
around it are answered as if it were not there. One worker per broker serves every case."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fmnist.brokers.base import OutMessage
from fmnist.errors import BrokerError
from fmnist.serving import protocol
from fmnist.testing import scenarios
from fmnist.testing.scenarios import LABELS, MODEL, Run

pytestmark = pytest.mark.slow
CASES = sorted(scenarios.poison_cases("kafka"))


@pytest.fixture(scope="module", params=[pytest.param("kafka", marks=pytest.mark.kafka),
                                        pytest.param("pubsub", marks=pytest.mark.pubsub)])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Run]:
    """One worker on private topics, answering already (so each case waits only for itself)."""
    with Run(request.param, tmp_path_factory.mktemp(f"poison-{request.param}")) as run:
        run.open()
        run.start_worker()
        run.wait_answered(run.send_good("warm", 1), timeout=scenarios.WORKER_START_S)
        yield run
        assert run.workers[0].stop() == 0, run.logs()


@pytest.mark.parametrize("name", CASES)
def test_poison_is_answered_and_dead_lettered_without_stalling(served: Run, name: str) -> None:
    case = scenarios.poison_cases(served.broker_name)[name]
    rid, sent, good_ids = scenarios.poison_case(served, name, case)

    for good in good_ids:  # the stream around the poison flows as if it were not there
        (answer, *_) = served.answers[good]
        assert answer["status"] == "ok", answer
        if not MODEL:
            assert answer["label"] == LABELS[served.expected[good]]["label"], answer

    answer_id = served.answer_id(rid)
    (answer, *again) = served.answers[answer_id]
    assert again == [], "answered twice: the poison's batch was processed again"
    assert answer["status"] == "error"
    assert answer["error"]["code"] == case.code, answer
    assert answer["request_id_derived"] is (name == "malformed_request_id")
    assert "label" not in answer

    (letter,) = served.letters[answer_id]
    headers = letter.headers
    assert headers["dlq_error_code"] == case.code
    assert headers["dlq_error_message"] == answer["error"]["message"][:protocol.MAX_HEADER_VALUE]
    assert headers["dlq_request_id"] == answer_id
    assert headers["dlq_worker_id"] == answer["worker_id"]
    assert headers["dlq_topic"] == served.topics.request
    assert headers["dlq_source"]
    assert int(headers["dlq_time"]) > 0
    cap = served.cfg.imaging.max_payload_bytes
    assert headers["dlq_payload_bytes"] == str(len(case.payload))
    if len(case.payload) <= cap:
        assert letter.value == case.payload  # the original bytes, untouched
    else:  # bounded, so that the dead letter itself can always be published
        assert letter.value == case.payload[:cap]
    # Its original headers: those within the limits, at most MAX_HEADERS, the protocol's first
    # (Pub/Sub attributes have no order, so which of the others are kept is not defined).
    fit = {k: v for k, v in sent.items() if len(v.encode()) <= protocol.MAX_HEADER_VALUE}
    kept = {k: v for k, v in headers.items() if not k.startswith("dlq_")}
    assert kept.items() <= fit.items()
    assert len(kept) == min(len(fit), protocol.MAX_HEADERS)
    assert kept[protocol.REQUEST_ID] == sent[protocol.REQUEST_ID]
    assert kept[protocol.SENT_AT] == sent[protocol.SENT_AT]


@pytest.mark.kafka
def test_kafka_refuses_a_5_mb_request_before_any_worker_sees_it(tmp_path) -> None:
    """Kafka's default limits (1 MiB) stop a 5 MB request at the producer: it never reaches the
    request topic, so it cannot poison it. (The worker-side cap is the big_payload case above.)"""
    with Run("kafka", tmp_path) as run:
        run.open()
        with pytest.raises(BrokerError, match="MSG_SIZE_TOO_LARGE.*\n.*smaller image"):
            run.producer.publish([OutMessage(run.topics.request, bytes(scenarios.FIVE_MB))],
                                 timeout_s=10)
