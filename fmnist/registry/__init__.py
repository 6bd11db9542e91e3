"""The model registry: models every worker reaches through the broker (docs/models.md).

``store`` keeps published models (Kafka topics, or a directory), ``protocol`` says what is
written, ``ops`` publishes, promotes and rolls back, ``follower`` and ``verify`` are a serving
worker's side: start on the promoted model, check each new one, switch between batches.
"""
