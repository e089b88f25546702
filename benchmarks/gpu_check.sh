#!/usr/bin/env bash
# One short prepared run on a lent GPU machine (no internet there): the CUDA paths of the trainer (bf16 autocast,
# fp16 with a gradient scaler, gradient caching at the paper's batch of 320 for ViT-B/16) and of the benchmark.
# Missing packages travel as wheels in .whl/ (see the device tool's README). Results land in $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
T=/tmp/tbps; mkdir -p $T
python3 -m tbps_compress.cli synth $T/synth --identities 160 --images-per-id 4 --workers 8 --size 384x128 \
  > "$OUT/synth.json" || exit 1
run() { echo "== $*"; SECONDS=0; python3 -m tbps_compress.cli "$@" 2>&1 | tail -25; echo "($SECONDS s)"; }
# full TBPS-CLIP recipe, bf16 autocast, gradient caching in chunks of 16
run train recipes/teacher/synth-teacher.yaml --force --set output=$T/bf16 --set data.root=$T/synth \
  --set optim.precision=bf16 --set optim.epochs=2 --set optim.grad_cache_chunk=16 \
  --set "losses={n_itc: {weight: 0.5}, mvs_i: {weight: 0.5}, ss_i: {weight: 0.4}, r_itc: {weight: 1.0}, c_itc: {weight: 0.1}}" \
  | tee "$OUT/train_bf16.txt"
cp $T/bf16/train_log.csv "$OUT/train_bf16_log.csv" 2>/dev/null
# fp16 with a gradient scaler
run train recipes/teacher/synth-teacher.yaml --force --set output=$T/fp16 --set data.root=$T/synth \
  --set optim.precision=fp16 --set optim.max_steps=30 | tee "$OUT/train_fp16.txt"
# paper shape: ViT-B/16 at 384x128, global batch 320 on one GPU, with and without gradient caching (peak memory)
python3 - <<'PY' 2>&1 | tee "$OUT/gradcache_vitb.txt"
import time, torch
from tbps_compress.recipes import TrainRecipe
from tbps_compress.engine.train import Trainer
for chunk in (80, None):
    r = TrainRecipe.model_validate({"output": "/tmp/tbps/vitb", "data": {"root": "/tmp/tbps/synth"},
        "model": {"config": "tbps-vit-b-16"}, "device": "cuda",
        "optim": {"batch_size": 320, "grad_cache_chunk": chunk, "precision": "bf16", "epochs": 1},
        "losses": {"n_itc": {"weight": 1.0}, "r_itc": {"weight": 1.0}}})
    t = Trainer(r); t.prepare(); torch.cuda.reset_peak_memory_stats(); it = iter(t.loader); times = []
    for i in range(3):
        b = next(it); torch.cuda.synchronize(); t0 = time.time(); terms = t.step(b, 0.1); torch.cuda.synchronize()
        times.append(time.time() - t0)
    print(f"ViT-B/16 384x128 batch 320 grad_cache_chunk={chunk}: peak {torch.cuda.max_memory_allocated()/2**30:.2f} GiB,"
          f" step {min(times[1:]):.3f} s, loss {terms['loss']:.3f}")
    del t; torch.cuda.empty_cache()
PY
# the benchmark's CUDA path (torch fp32 / fp16 / bf16) on the bf16-trained teacher
run bench $T/bf16 --data $T/synth --device cuda --runtimes torch --batch 1,32 --out $T/bench --reps 20
cp $T/bench/bench.md $T/bench/bench.json "$OUT/" 2>/dev/null
echo done
