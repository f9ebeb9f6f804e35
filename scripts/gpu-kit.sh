#!/usr/bin/env bash
# Writes into DIR the wheels that the lent GPU machine lacks to run `freesegdiff bench` (CPython 3.12,
# linux x86_64), so that scripts/gpu-bench.sh installs them there with pip --no-index. That machine already
# has torch 2.11, transformers 5.17, accelerate, numpy, scipy, scikit-learn, pillow, opencv, timm, regex,
# requests, lxml and pyyaml (the device tool's kinds page); torch, transformers and nvidia packages are never
# carried. pydensecrf2 has no wheel: its source goes, and that machine builds it with its own Cython.
# A call carries at most 64 MiB with the project, so the kit must stay under 56 MiB: the script checks.
# spaCy, its model and blis alone are over 60 MiB, so the kit has none of them: the bench there runs with
# FREESEG_NOUNS=words (the caption's words for its nouns), which its JSON names.
set -euo pipefail
dir=${1:?usage: bash scripts/gpu-kit.sh DIR}
cd "$(dirname "$0")/.."
mkdir -p "$dir"
python=.venv/bin/python
[ -x "$python" ] || python=python3

# What `freesegdiff bench` imports and the machine lacks, found by importing it here and subtracting the
# machine's list; versions those of this project's environment, where it has them.
packages=(
    diffusers open_clip_torch ftfy wcwidth
    pydantic pydantic-core pydantic-settings annotated-types typing-inspection python-dotenv
    fastapi starlette uvicorn redis rq croniter
    label-studio-sdk jsf faker rstr nltk ujson ijson xmljson jsonschema jsonschema-specifications referencing
    rpds-py defusedxml appdirs httpx2 httpcore2 truststore smart-open pyjwt
)
pinned=()
for name in "${packages[@]}"; do
    version=$("$python" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    pinned+=("$name${version:+==$version}")
done
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform any -d "$dir" "${pinned[@]}"
crf_version=$("$python" -m pip show pydensecrf2 2>/dev/null | sed -n 's/^Version: //p')
"$python" -m pip download --quiet --no-deps --no-binary=:all: -d "$dir" "pydensecrf2${crf_version:+==$crf_version}"

bytes=$(du -cb "$dir"/* | tail -n 1 | cut -f1)
echo "gpu kit: $(ls "$dir" | wc -l) files, $((bytes / 1024 / 1024)) MiB in $dir"
if [ "$bytes" -gt $((56 * 1024 * 1024)) ]; then
    echo "gpu kit: over 56 MiB, too big to travel with the project in one call" >&2
    exit 1
fi
