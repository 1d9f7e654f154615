#!/usr/bin/env bash
# The GPU check of issue 19: one script for a machine with a GPU (torch + transformers, no transformer-lens or
# sae-lens, no network, at most 64 MiB of files received), in under 8 minutes. It installs the wheels of
# .gpu-wheels/ and steer_lens (--no-deps), uses TinyStories-656K from .gpu-models/ (both made here by
# benchmarks/gpu_prepare.sh), builds random-weight models of SmolLM2-135M's exact config
# (benchmarks/smollm2_135m_config.json) on the GPU, runs the test suite on the device
# (STEER_LENS_TEST_DEVICE) and every benchmark with GPU-sized settings, and writes to $OUT (at most 8 files):
#   gpu_check.log (everything), tests.log, junit.xml, figures.json (every benchmark's JSON, merged after each
#   step, so a run cut short keeps what it measured), summary.md, all.tar.gz (per-step JSON and logs).
#
# On the GPU machine (device tool, carry [".gpu-wheels", ".gpu-models"]):
#   bash benchmarks/gpu_check.sh
# Dry run here on the CPU (tiny settings, a 2-layer config of the same family, a few test files):
#   DEVICE=cpu QUICK=1 PY=.venv/bin/python WHEELS=0 OUT=gpu-out bash benchmarks/gpu_check.sh
# Knobs: DEVICE (cuda), BUDGET_S (450: steps that would not fit are skipped, and say so), TESTS (tests),
#   TEST_WORKERS (8), TEST_CAP_S (150), PY (python3), WHEELS (1: install .gpu-wheels/*.whl into /tmp/site).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
PY=${PY:-python3}
WHEELS=${WHEELS:-1}
BUDGET_S=${BUDGET_S:-450}
OUT=${OUT:-gpu-out}
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 HF_HUB_OFFLINE=1
export HF_HUB_CACHE=${HF_HUB_CACHE_OVERRIDE:-$PWD/.gpu-models/hub}
export STEER_LENS_DATA=${STEER_LENS_DATA_OVERRIDE:-$PWD/.gpu-models/data/tinystories}
echo "== gpu_check: device $DEVICE, quick $QUICK, budget ${BUDGET_S}s, out $OUT, $(date -u +%FT%TZ)"

if [ "$WHEELS" = 1 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu-wheels/*.whl || { echo "FAILED: wheel install"; exit 1; }
  $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site-sl . \
    || echo "(steer_lens metadata not installed: versions show steer-lens None)"
  export PYTHONPATH=$PWD:/tmp/site:/tmp/site-sl${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
echo "== installed ($(elapsed)s)"

CONFIG=benchmarks/smollm2_135m_config.json
if [ "$QUICK" = 1 ]; then  # same family and code path, 2 layers: a dry run, not a figure
  CONFIG=$WORK/tiny_config.json
  $PY - "$CONFIG" <<'PYEOF'
import json, sys
d = json.load(open("benchmarks/smollm2_135m_config.json"))
d.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
         head_dim=16, vocab_size=512)
json.dump(d, open(sys.argv[1], "w"))
PYEOF
fi

merge() {  # every step's JSON into $OUT/figures.json
  $PY - "$WORK" "$OUT/figures.json" <<'PYEOF'
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
out = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json")) if p.name != "tiny_config.json"}
pathlib.Path(sys.argv[2]).write_text(json.dumps(out, indent=1) + "\n")
PYEOF
}

# step NAME CAP_S COMMAND...: run under `timeout CAP_S` if the budget allows; the log goes to $WORK/NAME.log
STATUS=()
step() {
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET_S - $(elapsed) ))
  if [ "$left" -lt "$cap" ]; then
    echo "== $name: SKIPPED (needs up to ${cap}s, ${left}s of the budget left)"; STATUS+=("$name: skipped (time)"); return
  fi
  echo "== $name (cap ${cap}s, at $(elapsed)s): $*"
  local t=$(date +%s)
  timeout -k 5 "$cap" "$@" 2>&1 | tee "$WORK/$name.log"
  local rc=${PIPESTATUS[0]}
  STATUS+=("$name: rc $rc in $(( $(date +%s) - t ))s")
  echo "== $name: rc $rc ($(( $(date +%s) - t ))s)"
  merge
}

step smoke 90 $PY - "$DEVICE" "$CONFIG" "$WORK/smoke.json" <<'PYEOF'
import json, sys, time
sys.path.insert(0, "benchmarks")
import torch
from _report import header, write_json
from _models import config_models
import steer_lens as sl, transformer_lens, sae_lens  # noqa: F401  (the wheels work)
dev, config, out = sys.argv[1:4]
head = header("smoke", "none (build + one forward of the SmolLM2-135M-shaped model)", dev)
t = time.perf_counter(); tl, hf = config_models(config, dev); build = time.perf_counter() - t
toks = torch.randint(0, tl.cfg.d_vocab, (4, 32), device=dev)
with torch.no_grad():
    diff = float((tl(toks) - hf(toks).logits).abs().max())
tiny = sl.load_model("raincandy-u/TinyStories-656K", device=dev)
print(f"built in {build:.1f}s; TL vs HF max |logit diff| {diff:.2e}; TinyStories on {tiny.cfg.device}")
write_json(out, head, {"build_s": build, "tl_vs_hf_max_abs_logit_diff": diff, "n_layers": tl.cfg.n_layers})
PYEOF

if [ "$QUICK" = 1 ]; then
  step patching_smol 120 $PY benchmarks/bench_patching.py --device "$DEVICE" --models smol --model-config "$CONFIG" \
    --sweeps resid_pre --repeats 1 --no-memory --json "$WORK/patching_smol.json"
  step rl_smol_fp32 120 $PY benchmarks/bench_rl.py --device "$DEVICE" --model-config "$CONFIG" --batch 4 --new 4 \
    --repeats 1 --json "$WORK/rl_smol_fp32.json"
  step rl_smol_bf16 120 $PY benchmarks/bench_rl.py --device "$DEVICE" --model-config "$CONFIG" --dtype bfloat16 \
    --batch 4 --new 4 --repeats 1 --json "$WORK/rl_smol_bf16.json"
  step rollouts_smol 120 $PY benchmarks/bench_rollouts.py --device "$DEVICE" --model-config "$CONFIG" --batch 2 \
    --new-tokens 4 --repeats 1 --json "$WORK/rollouts_smol.json"
  step tests 300 env OMP_NUM_THREADS=1 STEER_LENS_TEST_DEVICE="$DEVICE" $PY -m pytest -q -p no:cacheprovider -rs \
    --junitxml="$OUT/junit.xml" ${TESTS:-tests/test_models.py tests/test_global_state.py}
  step patching 200 $PY benchmarks/bench_patching.py --device "$DEVICE" --models real --sweeps resid_pre --repeats 1 \
    --real-repeats 1 --no-memory --json "$WORK/patching.json"
  step rl_tinystories 120 $PY benchmarks/bench_rl.py --device "$DEVICE" --batch 4 --new 4 --repeats 1 \
    --json "$WORK/rl_tinystories.json"
  step core 300 $PY benchmarks/bench_core.py --device "$DEVICE" --quick --no-memory --json "$WORK/core.json"
  step sae 200 $PY benchmarks/bench_sae.py --device "$DEVICE" --texts 4 --json "$WORK/sae.json"
  step lora 200 $PY benchmarks/bench_lora.py --device "$DEVICE" --texts 8 --repeat 1 --train-steps 2 \
    --json "$WORK/lora.json"
  step sft_step 120 $PY benchmarks/bench_sft_step.py --device "$DEVICE" --model-config "$CONFIG" --batch 16 --seq 128 \
    --steps 1 --repeats 1 --json "$WORK/sft_step.json"
  step ab_recompute 60 $PY benchmarks/ab_recompute.py --device "$DEVICE" --model-config "$CONFIG" --batch 2 --seq 16 \
    --repeats 1 --json "$WORK/ab_recompute.json"
  step rl_step 120 $PY benchmarks/bench_rl_step.py --device "$DEVICE" --model-config "$CONFIG" --prompts 2 --group 2 \
    --new-tokens 4 --steps 1 --compare-share --json "$WORK/rl_step.json"
  step patching_smol_opaque 120 $PY benchmarks/bench_patching.py --device "$DEVICE" --models smol \
    --model-config "$CONFIG" --sweeps resid_pre --metric opaque --tl-sites 8 --no-plain --repeats 1 --no-memory \
    --json "$WORK/patching_smol_opaque.json"
  step patching_smol_minimal 120 $PY benchmarks/bench_patching.py --device "$DEVICE" --models smol \
    --model-config "$CONFIG" --sweeps resid_pre --pairs minimal --tl-sites 8 --no-plain --repeats 1 --no-memory \
    --json "$WORK/patching_smol_minimal.json"
  step ab_patching_skip 120 $PY benchmarks/ab_patching_skip.py --device "$DEVICE" --model-config "$CONFIG" \
    --vector-layer 1 --repeats 1 --json "$WORK/ab_patching_skip.json"
  step profile_tl_vs_hf 120 $PY benchmarks/profile_tl_vs_hf.py --device "$DEVICE" --batch 2 --seq 16 --repeats 1 \
    --json "$WORK/profile_tl_vs_hf.json"
  step profile_decode 120 $PY benchmarks/profile_tl_vs_hf.py --device "$DEVICE" --decode 4 --batch 2 --seq 8 \
    --repeats 1 --json "$WORK/profile_decode.json"
  step ab_bridge_sft 120 $PY benchmarks/ab_bridge_sft.py --device "$DEVICE" --batch 2 --seq 16 --steps 1 \
    --repeats 1 --json "$WORK/ab_bridge_sft.json"
else
  # P1 and P3 on the 30-layer shape first: the figures the issue asks for
  step patching_smol 75 $PY benchmarks/bench_patching.py --device "$DEVICE" --models smol --model-config "$CONFIG" \
    --sweeps resid_pre,head_out_by_pos --tl-sites 300 --no-plain --repeats 2 --no-memory \
    --json "$WORK/patching_smol.json"
  step rl_smol_fp32 60 $PY benchmarks/bench_rl.py --device "$DEVICE" --model-config "$CONFIG" --batch 64 --new 128 \
    --repeats 2 --json "$WORK/rl_smol_fp32.json"
  step rl_smol_bf16 50 $PY benchmarks/bench_rl.py --device "$DEVICE" --model-config "$CONFIG" --dtype bfloat16 \
    --batch 64 --new 128 --repeats 2 --json "$WORK/rl_smol_bf16.json"
  step rollouts_smol 60 $PY benchmarks/bench_rollouts.py --device "$DEVICE" --model-config "$CONFIG" --batch 64 \
    --new-tokens 128 --repeats 2 --json "$WORK/rollouts_smol.json"
  cap=${TEST_CAP_S:-150}
  # pytest-timeout (in the GPU image) ends a long session with its report instead of being killed
  tflags=(); $PY -m pytest --help 2>/dev/null | grep -q -- --session-timeout \
    && tflags=(--session-timeout $(( cap - 20 )) --timeout 60)
  step tests "$cap" env OMP_NUM_THREADS=1 STEER_LENS_TEST_DEVICE="$DEVICE" $PY -m pytest -q \
    -p no:cacheprovider -rs -n "${TEST_WORKERS:-8}" --durations=15 "${tflags[@]}" --junitxml="$OUT/junit.xml" \
    ${TESTS:-tests}
  step patching 50 $PY benchmarks/bench_patching.py --device "$DEVICE" --models real,pythia --repeats 3 \
    --real-repeats 5 --no-memory --json "$WORK/patching.json"
  step rl_tinystories 20 $PY benchmarks/bench_rl.py --device "$DEVICE" --batch 64 --new 40 --repeats 3 \
    --json "$WORK/rl_tinystories.json"
  step core 75 $PY benchmarks/bench_core.py --device "$DEVICE" --json "$WORK/core.json"
  step sae 40 $PY benchmarks/bench_sae.py --device "$DEVICE" --texts 64 --json "$WORK/sae.json"
  step lora 40 $PY benchmarks/bench_lora.py --device "$DEVICE" --repeat 2 --train-steps 10 --json "$WORK/lora.json"
  step sft_step 50 $PY benchmarks/bench_sft_step.py --device "$DEVICE" --model-config "$CONFIG" --batch 16 --seq 128 \
    --steps 3 --repeats 3 --recompute --json "$WORK/sft_step.json"
  step ab_recompute 25 $PY benchmarks/ab_recompute.py --device "$DEVICE" --model-config "$CONFIG" --batch 16 --seq 128 \
    --repeats 5 --json "$WORK/ab_recompute.json"
  # P5: one RL step of the Sinii recipe at the paper's 16 x 16, both samplers
  step rl_step 60 $PY benchmarks/bench_rl_step.py --device "$DEVICE" --model-config "$CONFIG" --prompts 16 \
    --group 16 --new-tokens 128 --micro-batch 64 --steps 2 --json "$WORK/rl_step.json"
  step patching_smol_opaque 45 $PY benchmarks/bench_patching.py --device "$DEVICE" --models smol \
    --model-config "$CONFIG" --sweeps resid_pre,head_out_by_pos --metric opaque --tl-sites 200 --no-plain \
    --repeats 2 --no-memory --json "$WORK/patching_smol_opaque.json"
  # P1 on minimal pairs (one token swapped half-way: the sites before it are not run) and what the skips buy
  step patching_smol_minimal 30 $PY benchmarks/bench_patching.py --device "$DEVICE" --models smol \
    --model-config "$CONFIG" --sweeps resid_pre,head_out_by_pos --pairs minimal --tl-sites 300 --no-plain \
    --repeats 2 --no-memory --json "$WORK/patching_smol_minimal.json"
  step ab_patching_skip 30 $PY benchmarks/ab_patching_skip.py --device "$DEVICE" --model-config "$CONFIG" \
    --repeats 3 --json "$WORK/ab_patching_skip.json"
  step profile_tl_vs_hf 25 $PY benchmarks/profile_tl_vs_hf.py --device "$DEVICE" --batch 16 --seq 128 --repeats 3 \
    --json "$WORK/profile_tl_vs_hf.json"
  # P3: where the TransformerLens sampler's decoding time goes against generate's
  step profile_decode 30 $PY benchmarks/profile_tl_vs_hf.py --device "$DEVICE" --decode 64 --batch 64 --seq 40 \
    --repeats 2 --json "$WORK/profile_decode.json"
  # P4: the Sinii layout's SFT step on a TransformerBridge vs the HookedTransformer vs LoRA
  step ab_bridge_sft 40 $PY benchmarks/ab_bridge_sft.py --device "$DEVICE" --batch 16 --seq 128 --steps 3 \
    --repeats 3 --json "$WORK/ab_bridge_sft.json"
fi

[ -f "$WORK/tests.log" ] && cp "$WORK/tests.log" "$OUT/tests.log"
merge
{
  echo "# gpu_check $(date -u +%FT%TZ): device $DEVICE, quick $QUICK, $(elapsed)s"
  for s in "${STATUS[@]}"; do echo "- $s"; done
  echo; echo "tests: $(grep -E '(passed|failed|error)' "$WORK/tests.log" 2>/dev/null | tail -1)"
} > "$OUT/summary.md"
tar -czf "$OUT/all.tar.gz" -C "$WORK" .
cat "$OUT/summary.md"
echo "== done in $(elapsed)s"
