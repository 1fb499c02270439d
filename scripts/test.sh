#!/usr/bin/env bash
# The test suite, in two tiers:
#   bash scripts/test.sh           the full tier, as CI runs it (.ci/run): set up, start the real
#                                  services the tests need (a local SLURM cluster, as root), lint, then
#                                  every test, spread over pytest-xdist workers (docs/development.md)
#   bash scripts/test.sh --quick   the quick tier: no root, no SLURM, no Fashion-MNIST acceptance run, no
#                                  `heavy` test; unit tests, the local-executor sweep, real kills, MLflow, S3 (<= 5 min)
# Any other argument goes to pytest (e.g. `bash scripts/test.sh --quick -k report`).
#   - SLURM: a single-node cluster (tools/slurm/slurm-local.sh) when run as root; without root the
#     SLURM tests are skipped, or fail under CI=true / DINOLAB_REQUIRE_SLURM=1 (tests/parts.py).
set -euo pipefail
cd "$(dirname "$0")/.."

tier=full
if [[ ${1:-} == --quick ]]; then
  tier=quick
  shift
fi

bash scripts/setup.sh

if [[ $tier == full && $(id -u) -eq 0 && ${DINOLAB_SKIP_SLURM:-0} != 1 ]]; then
  bash tools/slurm/slurm-local.sh install start
  export DINOLAB_REQUIRE_SLURM=1
  # CI stops what it started; on a workstation the cluster stays up for the next run.
  if [[ ${CI:-} == true ]]; then trap 'bash tools/slurm/slurm-local.sh stop || true' EXIT; fi
fi

.venv/bin/ruff check dino launcher reports tests scripts
.venv/bin/ruff format --check dino launcher reports tests scripts

# Workers: most integration tests wait on other processes (SLURM's queue, servers, `dinolab`
# subprocesses), so more workers than cores keeps both cores busy; each test module is one unit of
# work (its module fixtures built once) and every SLURM test runs on one worker (tests/conftest.py).
workers=${DINOLAB_TEST_WORKERS:-4}
if [[ $tier == quick ]]; then
  markers="not slurm and not root and not acceptance and not heavy and not gpu"
else
  markers=""
fi
.venv/bin/python -m pytest -m "$markers" -n "$workers" --dist loadgroup --durations=25 "$@"
