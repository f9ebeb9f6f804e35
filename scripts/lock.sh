#!/usr/bin/env bash
# Refreshes the two lock files from their inputs; run it when a dependency's new release is taken on
# purpose, commit the locks on their own, and run the suite on them (docs/development.md, "Dependencies and locks").
#   locks/backend.txt      <- pyproject.toml's dependencies and its `test` extra (.venv, Dockerfile, CI)
#   locks/labelstudio.txt  <- locks/labelstudio.in (.venv-labelstudio, the e2e tests' Label Studio)
# Both are resolved for CPython 3.11 on Linux x86_64 (manylinux_2_28: the Dockerfile's base and the
# project's machines), with every file's hash; locks/constraints.txt holds the torch pair.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION="0.13.10"
if [ ! -x .venv-lock/bin/uv ] || [ "$(.venv-lock/bin/uv --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
    python3 -m venv .venv-lock
    .venv-lock/bin/python -m pip install --quiet "uv==${UV_VERSION}"
fi

compile() {  # compile OUTPUT INPUT [uv options...]
    local output="$1"; shift
    .venv-lock/bin/uv pip compile --quiet --generate-hashes --python-version 3.11 \
        --python-platform x86_64-manylinux_2_28 --constraint locks/constraints.txt \
        --custom-compile-command "scripts/lock.sh" --output-file "$output" "$@"
    sed -i '1i # For CPython 3.11 on Linux x86_64 only (uv cannot write one lock for every platform);\n# elsewhere install the ranges in pyproject.toml: pip install -e ".[test]".' "$output"
}

compile locks/backend.txt pyproject.toml --extra test
compile locks/labelstudio.txt locks/labelstudio.in
echo "locks/backend.txt: $(grep -c '^[a-z0-9].*==' locks/backend.txt) packages;" \
    "locks/labelstudio.txt: $(grep -c '^[a-z0-9].*==' locks/labelstudio.txt) packages"
