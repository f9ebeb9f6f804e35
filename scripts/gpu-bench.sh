#!/usr/bin/env bash
# Runs on the lent GPU machine, in the project's root, after `bash scripts/gpu-kit.sh gpu-kit` here put the
# wheels it lacks in gpu-kit/ (ignored by git: the device call carries it, `carry: ["gpu-kit"]`):
#   bash scripts/gpu-bench.sh [KIT]
# installs the kit offline, then runs `freesegdiff bench --profile random-full --device cuda` in float16 at
# batch 1, 8 and 32 (random weights: speed only), each writing its JSON to $OUT. Checked here in a Python 3.12
# virtual environment holding that machine's versions of torch (2.11), transformers (5.17) and huggingface_hub
# (1.33) and nothing else of ours but the kit (docs/benchmarks.md).
set -euo pipefail
kit=${1:-gpu-kit}
out=${OUT:?OUT must name the folder for the JSON files}
cd "$(dirname "$0")/.."
python=python3

"$python" -m pip install --quiet --no-index --no-deps "$kit"/*.whl
"$python" -m pip install --quiet --no-index --no-deps --no-build-isolation "$kit"/pydensecrf2-*.tar.gz
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 MODEL_DIR=${MODEL_DIR:-/tmp/freesegdiff-models}
# spaCy and its model do not fit in a call beside the rest; the noun stage's cost is a few milliseconds
export FREESEG_NOUNS=words
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
"$python" -m pip freeze > "$out/pip-freeze.txt"

for batch in 1 8 32; do
    images=$((batch < 4 ? 8 : batch * 2))
    # the device lends 15 minutes in all, start included: each batch size gets at most 150 s
    timeout 150 "$python" -m backend.cli bench --profile random-full --device cuda --dtype float16 \
        --images "$images" --batch "$batch" --no-naive --json "$out/bench-batch$batch.json" \
        2>&1 | tee "$out/bench-batch$batch.log" | grep -v -i -E "warn|loading weights" \
        || echo "gpu bench: batch $batch failed or ran out of time (its log is in \$OUT)" >&2
done
