#!/usr/bin/env bash
# Installs the project into .venv at exactly the versions of locks/backend.txt (idempotent; a fresh
# machine needs nothing else). The lock is for CPython 3.11 on Linux x86_64; elsewhere use
# `pip install -e ".[test]"` (pyproject.toml's ranges). scripts/lock.sh refreshes the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# --no-deps: the lock is the whole set, so nothing outside it is ever resolved
.venv/bin/python -m pip install --quiet --require-hashes --no-deps -r locks/backend.txt
# the project itself, built with the locked setuptools rather than whatever is newest
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
