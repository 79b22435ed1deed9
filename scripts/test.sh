#!/usr/bin/env bash
# The one test command (README, CI): installs what the suite needs, then runs pytest.
# Idempotent: apt and pip run only when something is missing or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
