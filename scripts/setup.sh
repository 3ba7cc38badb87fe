#!/usr/bin/env bash
# Set up everything a fresh machine needs, idempotently: system packages (Java, Maven,
# PostgreSQL, Chromium), the virtualenv with the package and its dev tools, and the Kafka jars.
# Usage: bash scripts/setup.sh            (re-running it is cheap when nothing is missing)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

log() { printf '[setup] %s\n' "$*" >&2; }

# The Python versions pyproject.toml allows (its requires-python), checked before anything is
# installed, so an unsupported interpreter gets one clear line instead of a pip error.
interpreter=$PYTHON
[ -x "$VENV/bin/python" ] && interpreter="$VENV/bin/python"
if ! "$interpreter" - <<'EOF'
import re
import sys

spec = re.search(r'requires-python = ">=([\d.]+),<([\d.]+)"', open("pyproject.toml").read())
low, high = (tuple(int(part) for part in version.split(".")) for version in spec.groups())
if not low <= sys.version_info[:2] < high:
    sys.exit(
        f"[setup] {sys.executable} is Python {sys.version.split()[0]}; fraud_dagster needs"
        f" >={spec[1]},<{spec[2]} (pyproject.toml)"
    )
EOF
then
  if [ "$interpreter" = "$VENV/bin/python" ]; then
    log "$VENV was made with it: remove $VENV, then run again with PYTHON set to a supported one"
  else
    log "run again with PYTHON set to a supported interpreter, e.g. PYTHON=python3.11 bash $0"
  fi
  exit 1
fi

missing=()
# Debian's python3 makes virtualenvs only with python3-venv (ensurepip) installed.
"$PYTHON" -c "import ensurepip" >/dev/null 2>&1 || [ -x "$VENV/bin/python" ] || missing+=(python3-venv)
# Kafka 4 needs Java 17+. Debian's default runtime is 17 on bookworm and 21 on trixie (which has
# no openjdk-17), so ask for the default rather than one version.
java_major() { java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1; }
if ! command -v java >/dev/null 2>&1; then
  missing+=(default-jre-headless)
elif [ "$(java_major)" -lt 17 ] 2>/dev/null; then
  log "java on PATH is Java $(java_major); Kafka 4 needs 17 or newer: put a newer one first on PATH"
  exit 1
fi
command -v mvn >/dev/null 2>&1 || missing+=(maven)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ "${FRAUD_SKIP_BROWSER:-0}" != "1" ]; then
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != "0" ] && ! command -v sudo >/dev/null 2>&1; then
    log "missing system packages: ${missing[*]} (install them, or run as root)"; exit 1
  fi
  SUDO=""; [ "$(id -u)" = "0" ] || SUDO=sudo
  log "installing system packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# The tested versions (constraints.txt), not the newest of the day; re-installs when either changes.
stamp="$VENV/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  log "installing fraud_dagster and its dev tools into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -c constraints.txt -e '.[dev]'
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi

log "making sure the Kafka jars are cached"
"$VENV/bin/python" -c "from fraud_dagster.local_services.kafka import kafka_classpath; kafka_classpath()"
log "ready"
