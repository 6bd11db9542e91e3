# Thin wrappers over scripts/ so the common tasks are one word.
.PHONY: setup test test-fast demo brokers-up brokers-down brokers-status bench lint

setup:            ## create .venv, install fmnist[dev], install the dataset if possible
	scripts/setup

test:             ## every test, against real Kafka and the real Pub/Sub emulator
	scripts/run-tests

test-fast:        ## unit tests only: no brokers, no training
	scripts/setup && .venv/bin/python -m pytest tests/unit -m "not slow"

demo:             ## start brokers and a worker, classify Images/ via Kafka and Pub/Sub
	scripts/demo

brokers-up:
	scripts/brokers up

brokers-down:
	scripts/brokers down

brokers-status:
	scripts/brokers status

bench:            ## the benchmark suite (BENCHMARKS.md)
	scripts/setup && .venv/bin/python benchmarks/bench.py

lint:            ## ruff on everything, mypy on the package
	.venv/bin/ruff check fmnist tests scripts benchmarks
	.venv/bin/mypy fmnist
