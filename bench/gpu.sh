#!/usr/bin/env bash
# Every benchmark of BENCHMARKS.md at GPU sizes, in one run that needs no network; the tables go
# to OUT (default bench/gpu_results/), one file per benchmark plus table.md with all of them.
#
#   bash bench/gpu.sh [OUT]
#
# Budget: about 8 minutes on one H100 (each benchmark has its own timeout, so one that hangs or
# runs out of memory costs its slot, not the run). What it measures:
#   core      the sorter vs N and iterations (time, memory flat in iterations), the objective
#   train     the training step vs its bound and the once-per-class bound: ViT-B/16 @224 in bf16
#             (the paper's step), EfficientNet-Lite0, the demo; then the largest ViT-B/16 batch
#             that fits, and from its images/s the projected time of one ImageNet epoch on 8 cards
#   eval      the paper protocol vs its bound and every method's attribution cost per image
#   rollouts  one image's evaluation and refinement on 1 vs all local devices
# Python packages: jax with CUDA, flax, optax, orbax-checkpoint, numpy, pillow, safetensors; the
# configs need ml_collections. Wheels of what the machine lacks can be carried in .whl/ (not
# tracked by git): they are installed from there with --no-index, never downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/gpu_results}}"
mkdir -p "$out"
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  python -m pip install --quiet --no-index --no-deps .whl/*.whl || echo "(some carried wheels did not install)"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'EOF' | tee "$out/machine.md"
import datetime, platform, jax
print(f"{datetime.date.today()}, {platform.node()}, {jax.devices()[0].device_kind} x "
      f"{jax.device_count()}, jax {jax.__version__}")
EOF

run() {  # name seconds command...: the command's stdout to OUT/name.md, its stderr to .err
  local name=$1 seconds=$2
  shift 2
  echo "== $name: $*"
  if timeout "$seconds" python "$@" > "$out/$name.md" 2> "$out/$name.err"; then
    tail -n 20 "$out/$name.md"
  else
    echo "(failed or timed out after ${seconds}s: $(tail -n 1 "$out/$name.err"))" | tee -a "$out/$name.md"
    return 1
  fi
}

run core 90 bench/bench_core.py --objective-batch 32 --repeats 5
run train 150 bench/bench_train.py --configs vit:imagenet,efficientnet:imagenet,vit:mnist --batch 32 --repeats 5
largest=32
for batch in 64 128 256; do  # the largest ViT-B/16 training batch that fits (doubling)
  run "train_b$batch" 60 bench/bench_train.py --configs vit:imagenet --batch "$batch" --repeats 3 || break
  largest=$batch
done
python - "$out" "$largest" <<'EOF' | tee "$out/epoch.md"
import re, sys
out, batch = sys.argv[1], int(sys.argv[2])
name = "train.md" if batch == 32 else f"train_b{batch}.md"
rows = [l for l in open(f"{out}/{name}") if l.startswith("| vit:imagenet")]
if not rows:
  sys.exit(f"no vit:imagenet row in {name}")
images_per_s = float(rows[0].split("|")[7].replace(",", ""))
minutes = 1_281_167 / (8 * images_per_s) / 60
print(f"ViT-B/16 @224 bf16: largest batch that fit {batch} ({images_per_s:,.1f} images/s on one "
      f"card); one ImageNet epoch (1,281,167 images) on 8 such cards, data parallel with no "
      f"communication cost: {minutes:,.1f} minutes (the bound is about 11)")
EOF
run eval 150 bench/bench_eval.py --targets vit_b16,efficientnet_lite0,vit_tiny_p4_28 --batch 32 --repeats 3
run rollouts 60 bench/bench_rollouts.py --configs vit:mnist,efficientnet:imagenet --repeats 3
cat "$out"/machine.md "$out"/core.md "$out"/train*.md "$out"/epoch.md "$out"/eval.md \
  "$out"/rollouts.md > "$out/table.md" 2> /dev/null
echo "== all tables: $out/table.md"
