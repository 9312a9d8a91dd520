#!/usr/bin/env bash
# The GPU checks of issue 11 in one prepared run, for a session that is lent
# the device machine (see ../shared/tools/device-wheels.sh for the wheels).
#
#   bash ../shared/tools/device-wheels.sh                # here, once: .whl/
#   device tool, carry [".whl"], command:
#     python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl \
#       && export PYTHONPATH=$PWD/.site:$PWD/src && bash benchmarks/gpu_check.sh
#
# Each step has its own timeout and writes JSON (or its log) under $OUT, so a
# step that runs out of time still leaves the others' results:
#   1. the CUDA-only correctness tests (skipped on a machine without CUDA);
#   2. bench_road.py --device cuda (target: >= 60x ROADCombined per layer);
#   3. bench_callback.py --device cuda at the full setting (targets: blocking
#      <= 3 s, ybROAD phase <= 2 s, TensorBoard <= 6 MiB per epoch).
# DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh is a small dry run on a CPU.
set -u
OUT=${OUT:-out/gpu_check}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${QUICK:-0}" = 1 ]; then
  ROAD_ARGS=(--layers 2 --size 64 --masks 4); CB_ARGS=(--layers 2 --size 64 --probes 2 --pairs 1)
else
  ROAD_ARGS=(--layers 53); CB_ARGS=(--pairs 1)
fi
"$PY" - > "$OUT/environment.json" <<'EOF'
import json, platform, torch
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                  "python": platform.python_version()}))
EOF
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -k "cuda" tests/ > "$OUT/cuda_tests.log" 2>&1
echo "cuda tests rc=$?" >> "$OUT/cuda_tests.log"
timeout 150 "$PY" benchmarks/bench_road.py --device "$DEVICE" "${ROAD_ARGS[@]}" \
  > "$OUT/bench_road.json" 2> "$OUT/bench_road.err"
echo "bench_road rc=$?" >> "$OUT/bench_road.err"
timeout 300 "$PY" benchmarks/bench_callback.py --device "$DEVICE" "${CB_ARGS[@]}" \
  > "$OUT/bench_callback.json" 2> "$OUT/bench_callback.err"
echo "bench_callback rc=$?" >> "$OUT/bench_callback.err"
tail -n 3 "$OUT/cuda_tests.log"; cat "$OUT/bench_road.json" "$OUT/bench_callback.json"
