# Quickstart: `make demo` runs the perception pipeline end to end, `make test` the suite.
# Both set up .venv/ and install/ first when needed (see scripts/setup.sh).
SHELL := /bin/bash
.DEFAULT_GOAL := help
ENV := source .venv/bin/activate && source install/setup.bash

.PHONY: help setup test lint demo bench clean

help:
	@echo "make setup  - create .venv/ and build the ROS package into install/ (idempotent)"
	@echo "make test   - set up if needed, then run the whole test suite"
	@echo "make lint   - flake8 over the Python code"
	@echo "make demo   - set up if needed, then run the perception demo"
	@echo "make bench  - set up if needed, then run the benchmarks (tables; JSON in bench_results/)"
	@echo "make clean  - remove build/, install/, log/ (keeps .venv/)"

setup:
	@bash scripts/setup.sh

test: setup
	@bash scripts/run_tests.sh $(PYTEST_ARGS)

lint: setup
	@$(ENV) && flake8

# -P keeps the source folder orcnn_ros/ (without the generated messages) off sys.path.
# DEMO_ARGS passes options, e.g. make demo DEMO_ARGS="--frames 60 --rate 10".
demo: setup
	@$(ENV) && python -P -m orcnn_ros.demo $(DEMO_ARGS)

# Benchmarks print markdown tables and write JSON to bench_results/ (see docs/performance.md).
# One torch thread: on a shared 2-core machine two OpenMP threads spin against other jobs.
BENCH_OUT ?= bench_results
bench: setup
	@$(ENV) && mkdir -p $(BENCH_OUT) && \
	python -P benchmarks/bench_model.py --threads 1 --json $(BENCH_OUT)/model.json && \
	python -P benchmarks/bench_postprocess.py --threads 1 --json $(BENCH_OUT)/postprocess.json && \
	python -P benchmarks/bench_order.py --threads 1 --json $(BENCH_OUT)/order.json && \
	python -P benchmarks/bench_order_head.py --threads 1 --json $(BENCH_OUT)/order_head.json && \
	python -P benchmarks/bench_backends.py --threads 1 --json $(BENCH_OUT)/backends.json && \
	python -P benchmarks/bench_node.py --threads 1 --json $(BENCH_OUT)/node_tiny.json && \
	python -P benchmarks/bench_node.py --threads 1 --model bundled --json $(BENCH_OUT)/node_demo.json

clean:
	rm -rf build install log
