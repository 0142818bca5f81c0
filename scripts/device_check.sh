#!/bin/bash
# The GPU checks in one call of the device tool (about 6-8 minutes on a warm H100/H200), most
# important first: CUDA tests (the server end to end on the GPU among them), one stream's first
# audio (8 streams one at a time, ~40 s), the load benchmark against the GPU profile (served
# by FRONT_ENDS=4 front-end processes) at increasing stream counts, then a burst of streams at once (how many admission lets in, and
# whether they stay on time), then the engine benchmark on CUDA (throughput by batch size; fp16
# eager against CUDA graphs) with what time is left. Build `.device` first
# (`.venv/bin/python scripts/device_bundle.py`) and carry it. The device tool returns at most 8
# files, so results are written to $WORK and packed into $OUT/results.tgz after every step (a
# step cut short by the time limit leaves the earlier ones packed), with $OUT/steps.txt beside
# it. Each step's timeout is cut to what is left of DEADLINE_S (540 s: the tool allows 600 s a
# command), so the whole script ends in time.
#
#   run: bash scripts/device_check.sh          carry: [".device"]      timeout_s: 600
#
# A dry run of the same steps on a CPU machine (no install, the CPU profile, few streams):
#   PYTHON=.venv/bin/python SKIP_INSTALL=1 DEVICE=cpu CONFIG=configs/default.toml \
#       LOAD_STREAMS="2 4" BURST_STREAMS=4 OUT=/tmp/device-dry bash scripts/device_check.sh
set -u
START=$SECONDS
DEADLINE_S=${DEADLINE_S:-540}
OUT=${OUT:-/tmp/device-out}
WORK=${WORK:-/tmp/device-work}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-configs/gpu.toml}
LOAD_STREAMS=${LOAD_STREAMS:-"100 400 1000"}
BURST_STREAMS=${BURST_STREAMS:-400}   # then this many at once, refused ones retrying (admission.startup_extra)
PORT=${PORT:-8200}
# The server as several processes (docs/architecture.md, "Several processes"): one process's GIL
# does not hold 1000 streams; 0 runs it as one process.
FRONT_ENDS=${FRONT_ENDS:-4}
mkdir -p "$OUT" "$WORK" && : > "$WORK/steps.txt"
log() { echo "== $(date -u +%H:%M:%S) +$((SECONDS - START))s $*" | tee -a "$WORK/steps.txt"; }
pack() { tar czf "$OUT/results.tgz" -C "$WORK" . && cp "$WORK/steps.txt" "$OUT/steps.txt"; }
# The timeout for a step: at most $1 s, and no more than what is left before the deadline.
budget() { local left=$((DEADLINE_S - (SECONDS - START) - 15)); echo $((left < $1 ? (left > 5 ? left : 5) : $1)); }

if [ -z "${SKIP_INSTALL:-}" ]; then
    log "installing libopus0 and the wheels from .device"
    [ -d .device ] || { echo "no .device: run scripts/device_bundle.py and carry .device"; exit 2; }
    # Unpacked beside /, not over it; ldconfig adds the directory to the loader's cache, where
    # ctypes.util.find_library (opuslib) looks.
    for f in .device/deb/*.deb; do dpkg -x "$f" /tmp/debs; done
    ldconfig /tmp/debs/usr/lib/x86_64-linux-gnu
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .device/whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
if [ -f .device/voice/en_US-joe-medium.onnx ]; then
    export STREAMING_TTS_DEFAULT_VOICE=$PWD/.device/voice/en_US-joe-medium.onnx
fi
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; "$PYTHON" -c \
    "import torch; print(torch.__version__, torch.cuda.is_available())") > "$WORK/machine.txt" 2>&1

pack
# (the engine against the CPU's, CUDA graphs against eager, then the server on the GPU profile
# end to end: streams batched, NVML energy in `done`, a stream refused while VRAM is held)
log "CUDA tests"
timeout "$(budget 180)" "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider tests/test_engine.py \
    tests/test_cuda_graphs.py tests/test_gpu_server.py > "$WORK/pytest_cuda.txt" 2>&1
echo "rc=$?" >> "$WORK/pytest_cuda.txt"
pack

log "server ($CONFIG, $FRONT_ENDS front ends) and load"
"$PYTHON" run_server.py --config "$CONFIG" --device "$DEVICE" --port "$PORT" \
    --front-ends "$FRONT_ENDS" > "$WORK/server.log" 2>&1 &
server=$!
for _ in $(seq "$(budget 150)"); do
    curl -sf "http://127.0.0.1:$PORT/healthz" > /dev/null && break
    kill -0 $server 2> /dev/null || break
    sleep 1
done
# (12 words: each stream lasts until its audio has nearly played out, ~4 s; 30 words took 10 s)
log "first audio: one stream at a time, 12 words at once, 8 times"
for _ in 1 2 3 4 5 6 7 8; do
    timeout "$(budget 20)" "$PYTHON" benchmarks/load.py --url "ws://127.0.0.1:$PORT/v1/stream" --json \
        --streams 1 --wps 0 --words 12 >> "$WORK/first_audio.jsonl" 2>> "$WORK/load.log"
    sleep 0.5
done
pack
for n in $LOAD_STREAMS; do
    log "load: $n streams, 15 words/s, 10 ms apart"
    timeout "$(budget 75)" "$PYTHON" benchmarks/load.py --url "ws://127.0.0.1:$PORT/v1/stream" --json \
        --streams "$n" --wps 15 --words 60 --stagger-ms 10 >> "$WORK/load.jsonl" 2>> "$WORK/load.log"
    curl -s "http://127.0.0.1:$PORT/metrics" > "$WORK/metrics_$n.txt"
    pack
done
log "load: a burst of $BURST_STREAMS streams at once, refused ones retrying 3 times"
timeout "$(budget 75)" "$PYTHON" benchmarks/load.py --url "ws://127.0.0.1:$PORT/v1/stream" --json \
    --streams "$BURST_STREAMS" --wps 15 --words 60 --retries 3 >> "$WORK/load.jsonl" 2>> "$WORK/load.log"
curl -s "http://127.0.0.1:$PORT/metrics" > "$WORK/metrics_burst.txt"
kill -INT $server
timeout 20 tail --pid=$server -f /dev/null || kill -9 $server
pack
log "engine benchmark on $DEVICE"
case "$DEVICE" in
    cuda*) engine_args=(--cuda-only) ;;        # the CPU engine's figures come from the build host
    *) engine_args=(--no-ort --reps 1) ;;
esac
timeout "$(budget 240)" "$PYTHON" benchmarks/engine.py --device "$DEVICE" "${engine_args[@]}" --json \
    > "$WORK/engine.json" 2> "$WORK/engine.log"
echo "rc=$? (124: cut short by its timeout)" >> "$WORK/engine.log"
pack

log "done"
pack
