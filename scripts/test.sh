#!/usr/bin/env bash
# Set up and run the whole test suite. The tests start the services they need themselves
# (Kafka, SMTP, PostgreSQL, dagster-daemon, dagster dev) and stop them afterwards.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check fraud_dagster fraud_dagster_tests
.venv/bin/ruff format --check fraud_dagster fraud_dagster_tests
exec .venv/bin/pytest -p no:cacheprovider -ra "$@"
