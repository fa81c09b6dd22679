#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one run (one lent GPU, minutes of device time):
#   1. the full configs/ln.py train step (bf16, largest batch of TRAIN_BATCH that fits): MFU;
#      REMAT_BATCH=64 adds the same step with rematerialisation (REMAT_POLICY, dots_saveable)
#   2. SAM ViT-H at 1024 px and EVA02-L at 384 px: images/s, XLA attention vs cuDNN flash attention
#   3. caption + trace decoding with Flan-T5-XL (whole network), 128 tokens, batch 1 and 64
#
#   OUT=/tmp/gpu_out bash benchmarks/gpu_suite.sh
#
# Each stage has its own time limit and writes OUT/<stage>.json; a stage that fails or runs out of
# time does not stop the next. The GPU image carries JAX but not ml_collections (and possibly other
# flax/optax versions than requirements/constraints.txt): wheels in .whl/ (downloaded with `pip
# download`, see /work/.library/device/README.md) are installed into a private folder first, and
# the pinned flax/optax are used only if the image's own fail the smoke test. Fetch them once with
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl \
#     ml_collections==1.1.0 flax==0.12.8 optax==0.2.8
# and carry `.whl` with the device call (it is listed in .git/info/exclude, not committed).
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
CONFIG=${CONFIG:-configs/ln.py} TOWERS=${TOWERS:-sam_vit_h@1024,eva02_L@384}
TRAIN_LIMIT=${TRAIN_LIMIT:-250} ENCODER_LIMIT=${ENCODER_LIMIT:-100} DECODE_LIMIT=${DECODE_LIMIT:-180}

stage() {  # stage NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit} s) $(date +%T)"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@"
  echo "=== $name exit $? after $((SECONDS - t0)) s"
}

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_extra \
  .whl/ml_collections-*.whl
export PYTHONPATH=/tmp/site_extra:$PWD
smoke='import jax, flax, optax; from pixel_llm import trainer; import configs.ln as c;
from pixel_llm.models import build; cfg = c.get_config("toy");
jax.eval_shape(build.build_model(cfg).init_variables, jax.random.key(0), build.example_batch(cfg))
print("smoke ok: jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__)'
if ! python3 -c "$smoke"; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_pinned \
    .whl/flax-*.whl .whl/optax-*.whl
  export PYTHONPATH=/tmp/site_pinned:$PYTHONPATH
  python3 -c "$smoke" || echo "smoke test failed with the pinned flax/optax too"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
MATMUL_N=${MATMUL_N:-8192} python3 - <<'EOF'
import os, time, jax, jax.numpy as jnp
# The bf16 matmul ceiling on random data (the denominator MFU should be read against).
n = int(os.environ["MATMUL_N"])
a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
f = jax.jit(lambda a, b: a @ b)
f(a, b).block_until_ready()
t0 = time.perf_counter()
for _ in range(20):
  c = f(a, b)
c.block_until_ready()
dt = (time.perf_counter() - t0) / 20
print(f"bf16 {n}^3 matmul: {2 * n**3 / dt / 1e12:.1f} TFLOP/s on {jax.devices()[0].device_kind}")
EOF

stage train_step "$TRAIN_LIMIT" python3 benchmarks/train_step.py --config="$CONFIG" \
  --batch="${TRAIN_BATCH:-32,16}" --stop_after_first_fit --dtype=bfloat16 --frozen_dtype=bfloat16 \
  --attention="${TRAIN_ATTENTION:-cudnn}" --scan --steps=5 --out="$OUT/train_step.json"
# Batch 64 needs rematerialisation on one H200 (run of 2026-11-27: ~164 GiB without it).
[ -z "${REMAT_BATCH:-}" ] || stage train_step_remat "$TRAIN_LIMIT" python3 benchmarks/train_step.py \
  --config="$CONFIG" --batch="$REMAT_BATCH" --stop_after_first_fit --dtype=bfloat16 \
  --frozen_dtype=bfloat16 --attention="${TRAIN_ATTENTION:-cudnn}" --scan \
  --remat="${REMAT_POLICY:-dots_saveable}" --steps=5 --out="$OUT/train_step_remat.json"
[ "${SKIP_ENCODERS:-0}" = 1 ] || stage encoders "$ENCODER_LIMIT" python3 benchmarks/encoders.py \
  --towers="$TOWERS" --attention=xla,cudnn --dtype=bfloat16 --batch="${ENCODER_BATCH:-16}" \
  --iters=10 --scan --out="$OUT/encoders.json"
stage caption_decode "$DECODE_LIMIT" python3 benchmarks/caption_decode.py --config="$CONFIG" \
  --batch="${DECODE_BATCH:-1,64}" --new_tokens=128 --dtype=bfloat16 --repeats=3 --scan \
  --attention="${DECODE_ATTENTION:-cudnn}" --out="$OUT/caption_decode.json"
echo "=== done $(date +%T)"
