#!/bin/bash
# The GPU checks in one call of the device tool (about 6-8 minutes on a warm H100/H200):
# CUDA tests, the engine benchmark on CUDA (throughput by batch size; fp16 eager against CUDA
# graphs), and the load benchmark against the GPU profile at increasing stream counts, then a
# burst of streams at once (how many admission lets in, and whether they stay on time). Build
# `.device` first (`.venv/bin/python scripts/device_bundle.py`) and carry it; results land in $OUT.
#
#   run: bash scripts/device_check.sh          carry: [".device"]      timeout_s: 600
#
# A dry run of the same steps on a CPU machine (no install, the CPU profile, few streams):
#   PYTHON=.venv/bin/python SKIP_INSTALL=1 DEVICE=cpu CONFIG=configs/default.toml \
#       LOAD_STREAMS="2 4" BURST_STREAMS=4 OUT=/tmp/device-dry bash scripts/device_check.sh
set -u
OUT=${OUT:-/tmp/device-out}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-configs/gpu.toml}
LOAD_STREAMS=${LOAD_STREAMS:-"100 400 1000"}
BURST_STREAMS=${BURST_STREAMS:-400}   # then this many at once, refused ones retrying (admission.startup_extra)
PORT=${PORT:-8200}
mkdir -p "$OUT"
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/steps.txt"; }

if [ -z "${SKIP_INSTALL:-}" ]; then
    log "installing libopus0 and the wheels from .device"
    [ -d .device ] || { echo "no .device: run scripts/device_bundle.py and carry .device"; exit 2; }
    for f in .device/deb/*.deb; do dpkg -x "$f" /; done
    ldconfig
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .device/whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
if [ -f .device/voice/en_US-joe-medium.onnx ]; then
    export STREAMING_TTS_DEFAULT_VOICE=$PWD/.device/voice/en_US-joe-medium.onnx
fi
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; "$PYTHON" -c \
    "import torch; print(torch.__version__, torch.cuda.is_available())") > "$OUT/machine.txt" 2>&1

log "CUDA tests"
timeout 150 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider tests/test_engine.py tests/test_cuda_graphs.py \
    > "$OUT/pytest_cuda.txt" 2>&1
echo "rc=$?" >> "$OUT/pytest_cuda.txt"

log "engine benchmark on $DEVICE"
case "$DEVICE" in
    cuda*) engine_args=(--cuda-only) ;;        # the CPU engine's figures come from the build host
    *) engine_args=(--no-ort --reps 1) ;;
esac
timeout 180 "$PYTHON" benchmarks/engine.py --device "$DEVICE" "${engine_args[@]}" --json \
    > "$OUT/engine.json" 2> "$OUT/engine.log"

log "server ($CONFIG) and load"
"$PYTHON" run_server.py --config "$CONFIG" --device "$DEVICE" --port "$PORT" > "$OUT/server.log" 2>&1 &
server=$!
for _ in $(seq 180); do
    curl -sf "http://127.0.0.1:$PORT/healthz" > /dev/null && break
    kill -0 $server 2> /dev/null || break
    sleep 1
done
for n in $LOAD_STREAMS; do
    log "load: $n streams, 15 words/s, 10 ms apart"
    timeout 150 "$PYTHON" benchmarks/load.py --url "ws://127.0.0.1:$PORT/v1/stream" --json \
        --streams "$n" --wps 15 --words 60 --stagger-ms 10 >> "$OUT/load.jsonl" 2>> "$OUT/load.log"
    curl -s "http://127.0.0.1:$PORT/metrics" > "$OUT/metrics_$n.txt"
done
log "load: a burst of $BURST_STREAMS streams at once, refused ones retrying 3 times"
timeout 150 "$PYTHON" benchmarks/load.py --url "ws://127.0.0.1:$PORT/v1/stream" --json \
    --streams "$BURST_STREAMS" --wps 15 --words 60 --retries 3 >> "$OUT/load.jsonl" 2>> "$OUT/load.log"
curl -s "http://127.0.0.1:$PORT/metrics" > "$OUT/metrics_burst.txt"
kill -INT $server
wait $server
log "done"
