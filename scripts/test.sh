#!/usr/bin/env bash
# Set up and run the whole test suite. The tests start the services they need themselves
# (Kafka, SMTP, PostgreSQL, dagster-daemon, dagster dev) and stop them afterwards.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
bash scripts/setup.sh
"$VENV"/bin/ruff check fraud_dagster fraud_dagster_tests
"$VENV"/bin/ruff format --check fraud_dagster fraud_dagster_tests
exec "$VENV"/bin/pytest -p no:cacheprovider -ra "$@"
