#!/usr/bin/env bash
# The benchmark suite on one GPU, in float32 and bfloat16, against PyTorch eager and torch.compile
# on the same GPU; designed to finish in under 7 minutes (each part has its own time limit, and the
# suite writes its JSON after every case, so a part cut short keeps the cases it finished).
#
#   bash experiments/gpu_bench.sh            # from the repository root; results in $OUT or ./gpu_bench_results
#
# Parts (limits in seconds):
#   1. float32  suite, kdjax vs PyTorch eager                      -> bench_float32.json   (95)
#   2. bfloat16 suite, kdjax vs PyTorch eager                      -> bench_bfloat16.json  (85)
#   3. bfloat16 teacher_cnn_small + kd_r18_mnv2, + torch.compile   -> bench_bfloat16_compile.json (95)
#   4. bfloat16 kd_r34_r18_224 + kd_r50_deit_s_224 (ImageNet, 224) -> bench_bfloat16_imagenet.json (120)
# bfloat16 = bf16 compute with float32 parameters and BatchNorm statistics on both sides (kdjax's
# --dtype; PyTorch autocast). On a GPU a timing sample is 10 steps with one synchronisation, so
# both frameworks overlap dispatch with compute; the ratio is kdjax / torch images/s, interleaved
# ABBA (see experiments/bench.py). MFU is against the H200's dense peaks (bf16 989 TFLOP/s; float32
# against TF32's 494.7, since XLA and cuDNN use TF32 for float32 convolutions by default: check
# jax_default_matmul_precision and the torch TF32 flags recorded in the JSON).
#
# The GPU machine's python3 has jax (CUDA), flax, optax, orbax and torch but not ml_collections,
# which kdjax imports: carry its wheel. Once, here, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0
# and name .whl in the device tool's carry. kdjax itself runs from the checkout (PYTHONPATH).
#
# Environment: PY (python with jax; default python3), TORCH_PY (python with torch; default $PY),
# OUT, GPU_BENCH_STEPS (timed steps per contender, default 60), GPU_BENCH_CASES (restrict parts 1
# and 2), GPU_BENCH_ALLOW_CPU=1 (run anyway without a GPU: to test this script on a CPU machine).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
TORCH_PY=${TORCH_PY:-$PY}
OUT=${OUT:-gpu_bench_results}
STEPS=${GPU_BENCH_STEPS:-60}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# JAX would take 75% of the GPU's memory at start; leave room for the PyTorch processes.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.4}

if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  "$PY" -c "import ml_collections" || { echo "ml_collections missing: carry its wheel in .whl (see the header)"; exit 2; }
fi

(nvidia-smi || true) > "$OUT/nvidia-smi.txt" 2>&1
backend=$("$PY" -c "import jax; print(jax.default_backend())" 2>/dev/null)
echo "jax backend: ${backend:-none}"
if [ "$backend" != "gpu" ] && [ "${GPU_BENCH_ALLOW_CPU:-0}" != 1 ]; then
  echo "no GPU visible to jax (backend: ${backend:-none}); set GPU_BENCH_ALLOW_CPU=1 to run on CPU anyway"
  exit 2
fi
device=cpu; [ "$backend" = gpu ] && device=cuda

common=(--steps "$STEPS" --warmup 3 --rounds 2 --compare-torch --torch-python "$TORCH_PY" --torch_device "$device")
if [ "$device" = cuda ]; then common+=(--sync_every 10); fi
cases=()
[ -n "${GPU_BENCH_CASES:-}" ] && cases=(--cases "$GPU_BENCH_CASES")
compile_cases=${GPU_BENCH_CASES:-teacher_cnn_small,kd_r18_mnv2}

status=0
part() {  # part LIMIT_S NAME ARGS...: one bench run with its own time limit and log
  local limit=$1 name=$2; shift 2
  echo "== $name (limit ${limit} s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$PY" -m experiments.bench "$@" --out "$OUT/$name.json" \
    2>&1 | grep -v -E "^(I|W)[0-9]{4} |libtpu|tpu_" | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "== $name exited with $rc (124: time limit; partial results kept)"; status=1; }
  return 0
}

start=$SECONDS
part 95 bench_float32 --suite "${cases[@]}" --dtype float32 --peak_tflops 494.7 "${common[@]}"
part 85 bench_bfloat16 --suite "${cases[@]}" --dtype bfloat16 --peak_tflops 989 "${common[@]}"
part 95 bench_bfloat16_compile --cases "$compile_cases" --dtype bfloat16 --peak_tflops 989 --torch-compile "${common[@]}"
# ImageNet shapes at 224 (torchvision's ResNets and timm's DeiT-S on the PyTorch side: torchvision and timm must import there)
part 120 bench_bfloat16_imagenet --cases kd_r34_r18_224,kd_r50_deit_s_224 --dtype bfloat16 --peak_tflops 989 "${common[@]}"
echo "== total $((SECONDS - start)) s; results in $OUT"

"$PY" - "$OUT" <<'EOF'
import glob, json, os, sys
print(f"{'file':28s} {'case':18s} {'kdjax img/s':>12s} {'TFLOP/s':>8s} {'MFU':>6s} {'torch':>9s} {'ratio':>6s} {'compile':>9s} {'ratio':>6s}")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "bench_*.json"))):
    for r in json.load(open(path))["cases"]:
        if "error" in r:
            print(f"{os.path.basename(path):28s} {r['case']:18s} error: {r['error'][:60]}")
            continue
        t, c = r.get("torch") or {}, r.get("torch_compile") or {}
        f = lambda d, k="median": f"{d['images_per_s'][k]:9.0f}" if d else f"{'-':>9s}"
        print(f"{os.path.basename(path):28s} {r['case']:18s} {r['images_per_s']['median']:12.0f} "
              f"{(r.get('achieved_flops_per_s') or 0) / 1e12:8.2f} {r.get('mfu', 0):6.1%} {f(t)} "
              f"{t.get('ratio_kdjax_over_torch', 0):6.2f} {f(c)} {c.get('ratio_kdjax_over_torch', 0):6.2f}")
EOF
exit $status
