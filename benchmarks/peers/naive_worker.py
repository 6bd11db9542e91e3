"""The worker most Kafka + Keras tutorials write: the floor in benchmarks/peers.py.

One message at a time: poll, parse the Open Inference Protocol JSON, ``model.predict`` on the
one image, produce the answer (keyed and headed with the request's id), poll again. The
consumer is in a group with the client's defaults (auto-commit every 5 s, so at-most-once or
at-least-once depending on when it dies). The producer is served by ``poll(0)`` after each
produce and flushed on exit, not flushed per message (that would add a broker round trip per
request). Same weights and Keras backend (JAX) as fmnist and the MLServer runtime.

    python benchmarks/peers/naive_worker.py BOOTSTRAP REQUEST_TOPIC RESPONSE_TOPIC GROUP WEIGHTS
"""

from __future__ import annotations

import json
import os
import signal
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402 - after the backend is chosen
import numpy as np  # noqa: E402
from confluent_kafka import Consumer, Producer  # noqa: E402


def main(bootstrap: str, request_topic: str, response_topic: str, group: str,
         weights: str) -> int:
    model = keras.saving.load_model(weights, compile=False)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "auto.offset.reset": "earliest"})
    producer = Producer({"bootstrap.servers": bootstrap})
    consumer.subscribe([request_topic])
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    print(f"naive worker: {request_topic} -> {response_topic}", flush=True)
    try:
        while not stopping:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            request = json.loads(msg.value())
            tensor = request["inputs"][0]
            x = np.asarray(tensor["data"], np.float32).reshape(-1, 28, 28, 1)
            probs = model.predict(x, verbose=0)
            request_id = (msg.key() or b"").decode()
            answer = {"model_name": "fmnist", "id": request.get("id") or request_id,
                      "outputs": [{"name": "probabilities", "shape": list(probs.shape),
                                   "datatype": "FP32", "data": probs.ravel().tolist()},
                                  {"name": "label", "shape": [len(probs)], "datatype": "INT64",
                                   "data": probs.argmax(axis=1).tolist()}]}
            producer.produce(response_topic, json.dumps(answer).encode(), key=msg.key(),
                             headers={"request_id": request_id})
            producer.poll(0)
    finally:
        consumer.close()
        producer.flush(10)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:6]))
