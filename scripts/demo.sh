#!/usr/bin/env bash
# Set up, then run the demo: local Kafka + SMTP, demo transactions, `dagster dev` with the
# sensor on (http://127.0.0.1:3000). Ctrl-C stops everything it started.
# Usage: bash scripts/demo.sh [fraud-dagster demo options]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
FRAUD_SKIP_BROWSER=1 bash scripts/setup.sh
exec "$VENV"/bin/fraud-dagster demo "$@"
