#!/usr/bin/env bash
# One host, all its accelerators (or CPU): install, then train. Rerunning the same command resumes.
#
#   bash launch/single_host.sh configs/ln.py:toy workdirs/ln_toy [--config.x=y ...]
#
# Real data / weights come from the environment (see README "Using pretrained weights"):
#   PIXEL_LLM_LN_TFRECORDS, PIXEL_LLM_VOCAB, PIXEL_LLM_INIT_CHECKPOINT.
set -euo pipefail
config=${1:?usage: single_host.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: single_host.sh CONFIG WORKDIR [overrides...]}
shift 2
cd "$(dirname "$0")/.."
if ! python -c "import pixel_llm" 2>/dev/null; then
  extra=""
  if command -v nvidia-smi >/dev/null; then extra="[gpu]"; fi
  pip install -e ".${extra}" -c requirements/constraints.txt
fi
exec python -m pixel_llm.train --config="$config" --workdir="$workdir" "$@"
