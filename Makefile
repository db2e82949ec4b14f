# Quickstart: `make demo` runs the perception pipeline end to end, `make test` the suite.
# Both set up .venv/ and install/ first when needed (see scripts/setup.sh).
SHELL := /bin/bash
.DEFAULT_GOAL := help
ENV := source .venv/bin/activate && source install/setup.bash

.PHONY: help setup test lint demo clean

help:
	@echo "make setup  - create .venv/ and build the ROS package into install/ (idempotent)"
	@echo "make test   - set up if needed, then run the whole test suite"
	@echo "make lint   - flake8 over the Python code"
	@echo "make demo   - set up if needed, then run the perception demo"
	@echo "make clean  - remove build/, install/, log/ (keeps .venv/)"

setup:
	@bash scripts/setup.sh

test: setup
	@bash scripts/run_tests.sh $(PYTEST_ARGS)

lint: setup
	@$(ENV) && flake8

demo: setup
	@echo "The demo (bundled model, synthetic camera, perception node) is not built yet;" \
	      "see README.md." >&2; exit 2

clean:
	rm -rf build install log
