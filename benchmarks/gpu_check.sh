#!/usr/bin/env bash
# The device check of issue 10, one script that fits in 8 minutes on one H100 / H200:
#   1. bench_pipeline.py --config paper at full size on CUDA (ADM-256 with random weights, smp
#      UNet-resnet34 at 512 px, n0 = 10, n = 100): fp32, bf16, bf16+cl, bf16+cl+compile, against the
#      paper code's approach (batch-1 fp32 sampling, per-pixel binomtest + Holm) on the same GPU;
#   2. the JSRT chapter (notebooks/jsrt.ipynb) at 512 px for one architecture (unet) on 3 test images
#      with the GPU path on (batch_size auto, bf16, channels_last), a random-weight checkpoint in
#      guided-diffusion's layout (ADM-256) and 2 training epochs of the paper preset.
# Everything lands in $OUT (at most 8 files): gpu_check.json (steps, times, exit codes), the
# benchmark's JSON, the executed chapter, its results table and the logs. Each step has a time
# limit inside the overall budget, and the JSON files are written as the steps go, so a step cut
# short still leaves what it had measured.
#
#   here, once:          bash benchmarks/prepare_device.sh       (.device/jsrt and .device/wheels)
#   on the device:       bash benchmarks/gpu_check.sh            (device tool: carry [".device"])
#   here, on the CPU:    bash benchmarks/gpu_check.sh --cpu-smallest   (or MEDCERT_CPU_SMALLEST=1):
#                        the small paper config and a tiny JSRT run (64 px, 1 image, sigma 0.5)
#
# Environment: OUT (default .device/out), PYTHON (default python3; .venv/bin/python for --cpu-smallest),
# GPU_CHECK_BUDGET_S (whole script; default 470 s on the GPU, 1500 s on the CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)

MODE=gpu
for arg in "$@"; do
    case $arg in
        --cpu-smallest) MODE=cpu ;;
        -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (use --cpu-smallest or nothing)" >&2; exit 2 ;;
    esac
done
[[ ${MEDCERT_CPU_SMALLEST:-0} == 1 ]] && MODE=cpu

if [[ $MODE == gpu ]]; then
    PY=${PYTHON:-python3}
    BUDGET=${GPU_CHECK_BUDGET_S:-470}
else
    PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
    BUDGET=${GPU_CHECK_BUDGET_S:-1500}
fi
OUT=${OUT:-$PWD/.device/out}
RUN=.device/run
mkdir -p "$OUT" "$RUN"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # medcert_core, also where the editable install fails

STEPS=()
write_summary() {  # $OUT/gpu_check.json, rewritten after every step
    local IFS=,
    printf '{"mode": "%s", "date": "%s", "budget_s": %d, "elapsed_s": %d, "python": "%s", "steps": [%s]}\n' \
        "$MODE" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$BUDGET" "$(($(date +%s) - START))" "$PY" "${STEPS[*]}" \
        >"$OUT/gpu_check.json"
}

# run_step NAME LIMIT_S COMMAND...: at most LIMIT_S and never past the budget; output to $OUT/NAME.log
run_step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START) - 5))
    ((limit > left)) && limit=$left
    if ((limit < 20)); then
        echo "== $name: skipped, ${left} s of the budget left"
        STEPS+=("{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"limit_s\": 0, \"note\": \"skipped: budget spent\"}")
        write_summary
        return 1
    fi
    echo "== $name (at most ${limit} s)"
    local begin rc
    begin=$(date +%s)
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    local took=$(($(date +%s) - begin))
    local note=""
    ((rc == 124 || rc == 137)) && note=", \"note\": \"timed out\""
    echo "== $name: exit $rc after ${took} s"
    STEPS+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $took, \"limit_s\": $limit$note}")
    write_summary
    return "$rc"
}

setup() {
    if [[ -d .device/wheels ]] && compgen -G ".device/wheels/*.whl" >/dev/null; then
        # --no-deps: never touch the image's torch; only packages it lacks are in .device/wheels
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .device/wheels/*.whl || return 1
    else
        echo "no .device/wheels: run benchmarks/prepare_device.sh here and carry .device"
    fi
    $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . ||
        echo "editable install failed; medcert_core comes from PYTHONPATH"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY - <<'EOF'
import importlib.metadata as md, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("diffusers", "segmentation-models-pytorch", "papermill", "ipykernel", "nbclient", "huggingface-hub", "timm"):
    print(name, md.version(name))
import medcert_core.smoothing, diffusers, segmentation_models_pytorch, papermill  # noqa: F401
print("imports ok")
EOF
}

jsrt_chapter() {
    local form=full size=512 images=3 device=cuda data=.device/jsrt extra='"training": {"epochs": 2}'
    if [[ $MODE == cpu ]]; then
        form=small size=64 images=1 device=cpu
        extra='"training": {"epochs": 1, "preset": "tiny"}, "sigmas": [0.5], "n": 60'
        [[ -d $data ]] || data=../shared/data/jsrt
    fi
    local spec
    spec=$($PY benchmarks/device_denoiser.py --form $form --out $RUN | tail -n 1) || return 1
    echo "denoiser: $spec"
    # the chapter's parameters (JSON is YAML); paths are taken from the project root
    $PY - "$spec" >"$RUN/jsrt_params.yaml" <<EOF || return 1
import json, sys
spec = json.loads(sys.argv[1])
params = {"profile": "paper", "dataset": "jsrt", "data_root": "$data", "image_size": $size, "archs": ["unet"],
          "test_images": $images, "device": "$device", "batch_size": "auto", "precision": "bf16",
          "channels_last": True, "compile": False, "denoiser": spec["denoiser"], "denoiser_flags": spec["denoiser_flags"],
          "results_dir": "$RUN/results", "cache_dir": "$RUN/cache", "interactive": False, $extra}
print(json.dumps(params, indent=1))
EOF
    cat "$RUN/jsrt_params.yaml"
    $PY -m papermill notebooks/jsrt.ipynb "$OUT/jsrt.ipynb" -f "$RUN/jsrt_params.yaml" --cwd . -k python3 \
        --log-output --no-progress-bar
    local rc=$?
    [[ -f $RUN/results/aggregate.csv ]] && cp "$RUN/results/aggregate.csv" "$OUT/jsrt_results.csv"
    return $rc
}

export MODE PY RUN OUT
export -f setup jsrt_chapter  # run_step runs them under timeout, in a child bash
echo "gpu_check.sh: mode $MODE, python $PY, budget ${BUDGET} s, output $OUT"
write_summary
if [[ $MODE == gpu ]]; then
    run_step setup 60 bash -c setup || echo "setup failed; trying the steps anyway"
    run_step bench 270 $PY benchmarks/bench_pipeline.py --config paper --device cuda \
        --settings fp32,bf16,bf16+cl,bf16+cl+compile --images 3 --reference-images 1 \
        --output "$OUT/bench_pipeline_paper_cuda.json"
    run_step jsrt 200 bash -c jsrt_chapter
else
    run_step bench 600 $PY benchmarks/bench_pipeline.py --config paper --small --device cpu --settings fp32,bf16 \
        --images 2 --output "$OUT/bench_pipeline_paper-small_cpu.json"
    run_step jsrt 900 bash -c jsrt_chapter
fi
write_summary
echo "gpu_check.sh: done in $(($(date +%s) - START)) s; results in $OUT:"
ls -l "$OUT"
