#!/usr/bin/env bash
# Prepare, on the CPU machine, what benchmarks/gpu_check.sh needs on the GPU machine (which has torch,
# transformers, peft, jaxtyping, pytest... but no transformer-lens, sae-lens, plotly, circuitsvis, gguf,
# mdmm, beartype, and no Hugging Face cache), in two git-ignored folders that the device tool carries:
#   .gpu-wheels/  the Python 3.12 wheels of ../shared/tools/gpu-wheels.sh (+ mdmm), minus what the GPU
#                 image already has
#   .gpu-models/  hub/: raincandy-u/TinyStories-656K as a Hugging Face hub cache (snapshot files, no links)
#                 data/tinystories/: the real stories (STEER_LENS_DATA)
# Everything sent to the GPU machine must stay under 64 MiB (checkout included): the script prints the sizes.
# Usage (from the project root):  benchmarks/gpu_prepare.sh [SHARED=../shared]
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared}
wheels=.gpu-wheels
models=.gpu-models

if [ ! -f "$wheels/.done" ]; then
  rm -rf "$wheels"
  bash "$shared/tools/gpu-wheels.sh" "$wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform any -d "$wheels" mdmm==0.1.3
  # already in the GPU image (KINDS.md's package list): one version of each, and less to send
  rm -f "$wheels"/sympy-*.whl "$wheels"/mpmath-*.whl "$wheels"/narwhals-*.whl
  touch "$wheels/.done"
fi

rm -rf "$models"
src="$shared/models/hub/models--raincandy-u--TinyStories-656K"
dst="$models/hub/models--raincandy-u--TinyStories-656K"
mkdir -p "$dst" "$models/data"
cp -r "$src/refs" "$dst/refs"
cp -rL "$src/snapshots" "$dst/snapshots"   # -L: real files, no links into blobs/ (links may not travel)
cp -r "$shared/data/tinystories" "$models/data/tinystories"

du -sh "$wheels" "$models"
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
carried=$(du -sb "$wheels" "$models" | awk '{s += $1} END {print s}')
total=$(( tracked + ${untracked:-0} + carried ))
echo "to send: checkout $((tracked / 1024)) KiB + untracked $((${untracked:-0} / 1024)) KiB + carried $((carried / 1024)) KiB = $((total / 1048576)) MiB (limit 64 MiB)"
[ "$total" -lt $((64 * 1048576)) ] || { echo "over the 64 MiB limit: remove wheels the GPU machine has" >&2; exit 1; }
