#!/usr/bin/env bash
# Does lorakit's diffusers-format LoRA file load, and reproduce outputs, in an older stack?
#
#   tests/compat/check_old_stack.sh          (from the repo root, lorakit's venv active)
#
# Another old stack: LORAKIT_OLD_STACK=DIR LORAKIT_OLD_STACK_PINS="diffusers==0.32.* ..." (pip
# specs; include huggingface_hub and tokenizers versions that transformers accepts).
#
# Builds diffusers 0.39 / transformers 4.57 / peft 0.17 (and the huggingface_hub and
# tokenizers those need) into $LORAKIT_OLD_STACK with pip --target, reusing the venv's torch,
# safetensors, numpy, ...; trains tiny SD1.5 and SDXL LoRAs (text encoders too) in lorakit's
# own stack, then loads each file with the old stack's load_lora_weights and compares the
# denoiser's and text encoders' outputs (max abs diff < 1e-5). Needs PyPI (not a model hub);
# not part of the pytest suite.
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET=${LORAKIT_OLD_STACK:-/tmp/lorakit-old-stack}
PINS=${LORAKIT_OLD_STACK_PINS:-"diffusers==0.39.* transformers==4.57.* peft==0.17.* huggingface_hub>=0.34,<1.0 tokenizers>=0.22,<0.23"}
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1

if [ "$(cat "$TARGET/.lorakit-complete" 2>/dev/null)" != "$PINS" ]; then
  echo "building the old stack in $TARGET: $PINS"
  rm -rf "$TARGET"
  # --no-deps: everything else (torch above all) comes from the venv
  read -r -a SPECS <<< "$PINS"  # one pip argument per spec, no globbing of the '*'s
  $PY -m pip install -q --no-deps --target "$TARGET" "${SPECS[@]}"
  echo "$PINS" > "$TARGET/.lorakit-complete"
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
$PY tests/compat/check_old_stack.py produce "$WORK"
PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}" $PY tests/compat/check_old_stack.py check "$WORK"
