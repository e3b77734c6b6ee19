#!/usr/bin/env bash
# The train-step benchmark on an accelerator, float32 against bfloat16 compute, written to DIR/*.json:
#   bash experiments/benchmark_device.sh DIR
# Shapes and vocabularies are given, so no dataset (TFDS) is needed where this runs.
set -u
out=${1:?usage: benchmark_device.sh DIR}
mkdir -p "$out"
bench() { python3 -m experiments.benchmark_train_step --matmul_size=8192 "$@" || echo "FAILED: $*"; }
for dtype in float32 bfloat16; do
  bench --config=configs/vdm_digits.py --image_shape=8,8,1 --vocab_size=17 --batch_size=512 --steps=50 \
    --config.model.score_net.dtype=$dtype --out="$out/digits_b512_$dtype.json"
  bench --config=configs/vdm_cifar10.py --image_shape=32,32,3 --vocab_size=256 --batch_size=64 --steps=20 \
    --config.model.score_net.dtype=$dtype --out="$out/cifar10_b64_$dtype.json"
done
for substeps in 1 4; do
  bench --config=configs/vdm_digits.py --image_shape=8,8,1 --vocab_size=17 --batch_size=64 --steps=200 \
    --substeps=$substeps --out="$out/digits_b64_substeps$substeps.json"
done
