#!/usr/bin/env bash
# A Cloud TPU VM slice: create it, install pixel_llm on every worker, train on every worker.
#
#   TPU_NAME=pixel-llm ZONE=us-west4-a ACCELERATOR=v5litepod-256 \
#   WORKDIR=gs://BUCKET/pixel_llm/ln  bash launch/tpu_pod.sh configs/ln.py [--config.x=y ...]
#
# Every worker runs the same command; jax.distributed finds the other workers by itself on a TPU
# slice (pixel_llm.train initialises it when TPU_WORKER_HOSTNAMES lists several hosts). WORKDIR must
# be shared storage (a gs:// bucket): orbax writes each host's shards of the checkpoint there, and a
# rerun of this script after a preemption resumes from the latest one. Data and converted weights
# also live in the bucket: PIXEL_LLM_LN_TFRECORDS, PIXEL_LLM_VOCAB, PIXEL_LLM_INIT_CHECKPOINT.
# Check the memory of a config/mesh first, without TPUs:
#   python -m pixel_llm.tools.aot --config=configs/ln.py --topology=v5e:16x16 --mesh=...
set -euo pipefail
config=${1:?usage: tpu_pod.sh CONFIG [overrides...]}
shift
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR:?set ACCELERATOR, e.g. v5litepod-256}"
: "${WORKDIR:?set WORKDIR to a gs:// path}"
RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite}

run_all() {  # the same command on every worker of the slice
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

if ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
fi
# This checkout (its committed HEAD) goes to every worker, so all hosts run the same code.
cd "$(dirname "$0")/.."
git archive --format=tar.gz -o /tmp/pixel_llm.tar.gz HEAD
gcloud compute tpus tpu-vm scp /tmp/pixel_llm.tar.gz "$TPU_NAME": --zone="$ZONE" --worker=all
run_all "rm -rf pixel_llm && mkdir pixel_llm && tar -xzf pixel_llm.tar.gz -C pixel_llm && \
  cd pixel_llm && pip install -q -e '.[tpu]' -c requirements/constraints.txt"
env_vars="PIXEL_LLM_LN_TFRECORDS='${PIXEL_LLM_LN_TFRECORDS:-}' PIXEL_LLM_VOCAB='${PIXEL_LLM_VOCAB:-}' \
PIXEL_LLM_INIT_CHECKPOINT='${PIXEL_LLM_INIT_CHECKPOINT:-}'"
run_all "cd pixel_llm && $env_vars python -m pixel_llm.train --config=$config --workdir=$WORKDIR $*"
