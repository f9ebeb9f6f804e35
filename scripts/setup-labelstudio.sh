#!/usr/bin/env bash
# Installs what the end-to-end tests (tests/e2e) need besides the project itself (idempotent):
#   - a real Label Studio 1.23.2 server in its own virtual environment, .venv-labelstudio
#     (its pins differ from the project's, so it must not share .venv);
#   - Debian's chromium at /usr/bin/chromium, driven by Python's playwright from .venv.
# Playwright is launched with executable_path="/usr/bin/chromium": never run `playwright install`
# (it downloads a browser, which fails without network).
# Needs root (apt-get) when chromium is missing. Run scripts/setup.sh first for .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

LABEL_STUDIO_VERSION="1.23.2"

if [ ! -x .venv-labelstudio/bin/label-studio ]; then
    echo "Installing label-studio==${LABEL_STUDIO_VERSION} into .venv-labelstudio (about 1 GB)..."
    if [ ! -x .venv-labelstudio/bin/python ]; then
        python3 -m venv .venv-labelstudio
    fi
    .venv-labelstudio/bin/python -m pip install --quiet --upgrade pip
    .venv-labelstudio/bin/python -m pip install --quiet "label-studio==${LABEL_STUDIO_VERSION}"
fi

if [ ! -x /usr/bin/chromium ]; then
    echo "Installing Debian's chromium..."
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        SUDO="sudo"
    fi
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core
fi

# playwright (the Python driver only; the browser is Debian's chromium above). pyproject's
# `test` extra carries it too; installing it here keeps this script enough on its own.
if [ -x .venv/bin/python ] && ! .venv/bin/python -c "import playwright" 2>/dev/null; then
    echo "Installing playwright into .venv..."
    .venv/bin/python -m pip install --quiet playwright
fi

# (not `label-studio --version`: it migrates a database in ~/.local/share/label-studio, then starts a server)
echo "Label Studio $(.venv-labelstudio/bin/python -c 'import importlib.metadata as m; print(m.version("label-studio"))')," \
    "$(/usr/bin/chromium --version 2>/dev/null || echo 'chromium ?')"
