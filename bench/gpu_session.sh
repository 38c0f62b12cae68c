#!/usr/bin/env bash
# One lent-GPU session's checks and benchmarks in one call (issues "one packed step" and "kernel vs
# FlexAttention"): GPU tests of the kernel and of the packed step, the attention benchmark, and tokens/s + MFU
# with the per-phase split of a So400m and a Base training step. Every log lands in $OUT; the last lines printed
# are a short table of the figures.
#
# The device machine has its own python3 + torch + triton and no network: packages it lacks (lpips, open_clip,
# av, torch-fidelity, ftfy) come as wheels made here beforehand and carried with the working tree:
#
#     bash bench/gpu_session.sh --wheels            # here: download them into wheels/ (for the device's Python)
#     run(command="bash bench/gpu_session.sh", carry=["wheels"], timeout_s=540)   # there
#
# On a machine without CUDA it still runs the same steps on the CPU (a smoke test of the script itself):
#     OUT=/tmp/gpu_out bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-out/gpu_session}
mkdir -p "$OUT"

if [ "${1:-}" = "--wheels" ]; then       # here, with network access to the package registry
    # the device's python3 is 3.12 (see the device notes); pure-Python wheels need no platform
    mkdir -p wheels
    $PY -m pip download --no-deps -d wheels lpips==0.1.4 open_clip_torch==3.3.0 torch-fidelity==0.4.0 ftfy wcwidth
    $PY -m pip download --no-deps -d wheels --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 av==18.1.0
    du -sh wheels
    exit 0
fi

log() { echo "$*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"
if [ -d wheels ]; then
    $PY -m pip install --no-index --no-deps -q wheels/*.whl > "$OUT/pip.log" 2>&1 || log "pip: see pip.log"
fi
cuda=$($PY -c "import torch; print(int(torch.cuda.is_available()))")
dev=$([ "$cuda" = 1 ] && echo cuda || echo cpu)
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, '|',
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" 2>&1 | tee "$OUT/env.txt"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

# 1. correctness on the device: the kernel against its reference (fp32, bf16, fp16), the packed step's
#    structural tests (no host reads, op counts, one compilation)
$PY -m pytest -q tests/test_kernels.py tests/test_step.py > "$OUT/tests.log" 2>&1
log "tests: $(tail -n 1 "$OUT/tests.log")"

# 2. attention: our kernel vs SDPA backends vs FlexAttention on a packed mixed-resolution batch
size=$([ "$cuda" = 1 ] && echo full || echo small)
timeout 240 $PY kernels/bench_attention.py --size "$size" > "$OUT/bench_attention.log" 2>&1
log "attention ($size): see bench_attention.log"
grep -E "^(method|triton kernel|sdpa flash: nested|sdpa cudnn: padding|flex attention)|^  (triton|reference)" "$OUT/bench_attention.log" | cut -c1-110 | tee -a "$OUT/summary.txt"

# 3. training steps: tokens/s, MFU on tokenizer FLOPs, per-phase split (data, copy, fwd, loss, bwd, optimizer)
if [ "$cuda" = 1 ]; then
    for preset in so400m base; do
        timeout 240 $PY bench/bench_step.py --device=cuda --preset=$preset --tokens=16384 --compile=1 \
            --json="$OUT/step_$preset.json" > "$OUT/step_$preset.log" 2>&1
        log "$preset: $(grep -E 'MFU' "$OUT/step_$preset.log" | tail -n 1)"
    done
else
    timeout 600 $PY bench/bench_step.py --tasks=image_rec --reps=3 > "$OUT/step_cpu.log" 2>&1
    log "cpu tiny: $(grep -E 'image_rec' "$OUT/step_cpu.log" | tail -n 1)"
fi
echo "---"
cat "$OUT/summary.txt"
