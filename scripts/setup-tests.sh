#!/usr/bin/env bash
# Installs what the whole test suite needs on a fresh machine (idempotent): the project
# (scripts/setup.sh), the services tests talk to for real (redis-server, Chromium, and
# docker-compose to validate docker-compose.yml), and Label Studio in its own venv.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

missing=()
[ -x /usr/bin/redis-server ] || missing+=(redis-server)
[ -x /usr/bin/chromium ] || missing+=(chromium fonts-dejavu-core)
command -v docker-compose >/dev/null || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

bash scripts/setup-labelstudio.sh
