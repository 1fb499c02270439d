#!/usr/bin/env bash
# The whole test suite, as CI runs it: set up, lint, then every test (slow ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check dino launcher reports tests
.venv/bin/ruff format --check dino launcher reports tests
.venv/bin/python -m pytest -m "" --durations=15 "$@"
