#!/usr/bin/env bash
# Installs what the end-to-end tests (tests/e2e) need besides the project itself (idempotent):
#   - a real Label Studio server in its own virtual environment, .venv-labelstudio, at exactly the
#     versions of locks/labelstudio.txt (its pins differ from the project's, so it must not share .venv);
#   - Debian's chromium at /usr/bin/chromium, driven by Python's playwright from .venv.
# Playwright is launched with executable_path="/usr/bin/chromium": never run `playwright install`
# (it downloads a browser, which fails without network).
# Needs root (apt-get) when chromium is missing. Run scripts/setup.sh first: it installs playwright
# (the Python driver only) into .venv from locks/backend.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv-labelstudio/bin/python ]; then
    echo "Installing Label Studio from locks/labelstudio.txt into .venv-labelstudio (about 1 GB)..."
    python3 -m venv .venv-labelstudio
fi
# every run, so a refreshed lock reaches an existing venv (seconds when nothing changed)
.venv-labelstudio/bin/python -m pip install --quiet --require-hashes --no-deps -r locks/labelstudio.txt

if [ ! -x /usr/bin/chromium ]; then
    echo "Installing Debian's chromium..."
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        SUDO="sudo"
    fi
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core
fi

# (not `label-studio --version`: it migrates a database in ~/.local/share/label-studio, then starts a server)
echo "Label Studio $(.venv-labelstudio/bin/python -c 'import importlib.metadata as m; print(m.version("label-studio"))')," \
    "$(/usr/bin/chromium --version 2>/dev/null || echo 'chromium ?')"
