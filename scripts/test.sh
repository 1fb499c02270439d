#!/usr/bin/env bash
# The whole test suite, as CI runs it: set up, start the real services the tests need, lint, then
# every test (slow ones included), and stop the services again.
#   - SLURM: a single-node cluster (tools/slurm/slurm-local.sh) when run as root; without root the
#     SLURM tests are skipped unless DINOLAB_REQUIRE_SLURM=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

if [[ $(id -u) -eq 0 && ${DINOLAB_SKIP_SLURM:-0} != 1 ]]; then
  bash tools/slurm/slurm-local.sh install start
  export DINOLAB_REQUIRE_SLURM=1
  # CI stops what it started; on a workstation the cluster stays up for the next run.
  if [[ ${CI:-} == true ]]; then trap 'bash tools/slurm/slurm-local.sh stop || true' EXIT; fi
fi

.venv/bin/ruff check dino launcher reports tests
.venv/bin/ruff format --check dino launcher reports tests
.venv/bin/python -m pytest -m "" --durations=20 "$@"
