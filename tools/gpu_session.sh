# The runs of the GPU issue, in parts that each fit one 10-minute command on a lent GPU
# (see README, "Speed"). Each part writes its logs to $OUT (default ./gpu_out), at most 8 files.
#
#   bash tools/gpu_session.sh tests     # the CUDA-only tests, then bench.py's step, loss and memory
#   bash tools/gpu_session.sh profile   # tools/profile_step.py at 256 and 512 images, blur forms, CIFAR epoch,
#                                       # bench.py's views on large photos (CPU work of the data workers)
#   bash tools/gpu_session.sh runs      # pretrain (ResNet-50, 224 px, batch 512, 3 epochs, 3-layer head), then
#                                       # linear_eval.py, finetune.py (v2 recipe) and distill.py from its network
#   bash tools/gpu_session.sh compile   # pretrain.py with and without --compile at 32 px and 224 px
#   bash tools/gpu_session.sh suite     # the rest of the test suite on the device's torch
#
# Every command runs under its own time limit, so a part always returns what it has; a part's limits
# add up to 560 s or less (and each command may take 10 s more to be killed). pytest is stopped at its
# limit with SIGINT, on which it still prints its failures and summary (SIGTERM would end it silently).
# $PYTHON, else python3 (the GPU machines' image has its torch there), else python, runs everything.
set -u -o pipefail
part=${1:?"usage: bash tools/gpu_session.sh tests|profile|runs|compile|suite"}
out=${OUT:-gpu_out}
python=${PYTHON:-$(command -v python3 || command -v python)}  # what `python` in a step below runs
runs=${TMPDIR:-/tmp}/simclr_gpu_session  # pretraining outputs: not returned, not in the repository
mkdir -p "$out" "$runs"
export PYTHONUNBUFFERED=1
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # (nproc alone counts OMP_NUM_THREADS=1 as one CPU)
workers=$(( cpus < 16 ? cpus : 16 ))
# The workers hand batches over in /dev/shm, two batches per worker (data.check_shared_memory stops a
# script in one line when they would not fit): pretraining's 512 images x 2 views of 224 px in uint8 are
# 154 MB; bench.py's path (b) makes whole float32 views, 4x that. A small /dev/shm (Docker's default is
# 64 MB) gets fewer workers, not a lost part: $workers for the uint8 batches, $bench_workers for bench.py.
shm=$(df -B1 --output=avail /dev/shm 2>/dev/null | tail -n 1 | tr -d ' ')
fit() {  # fit BYTES_PER_BATCH: the workers /dev/shm holds two such batches of, at most $workers
    if [[ $shm =~ ^[0-9]+$ ]] && (( shm / (2 * $1) < workers )); then echo $(( shm / (2 * $1) )); else echo "$workers"; fi
}
bench_workers=$(fit $(( 4 * 2 * 3 * 224 * 224 * 512 )))
workers=$(fit $(( 2 * 3 * 224 * 224 * 512 )))

step() {  # step NAME SECONDS COMMAND...: run it, its output to the terminal and $out/NAME.log
    local name=$1 limit=$2 signal=TERM
    shift 2
    [ "$1 ${2:-} ${3:-}" = "python -m pytest" ] && signal=INT  # pytest prints its summary on SIGINT only
    [ "$1" = python ] && set -- "$python" "${@:2}"
    echo "== $name: $* (limit ${limit} s)" | tee -a "$out/$name.log"
    local t0=$SECONDS
    timeout --signal=$signal --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$out/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
timeout 120 "$python" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
    >> "$out/gpu.txt" 2>&1
echo "$cpus CPUs, $workers data workers ($bench_workers for bench.py); $python;" \
    "shared memory of the data workers: $(df -h /dev/shm 2>&1 | tail -1)" >> "$out/gpu.txt"

case $part in
tests)
    step test_cuda 400 python -m pytest -q -rfEs --durations=25 tests/test_cuda.py
    step bench 160 python bench.py --device cuda --workers "$bench_workers" --only step,loss,memory --json "$out/bench.json"
    ;;
profile)
    # the trace gzipped (torch.profiler does it for a .gz name): a file that comes back is 16 MiB at most
    step profile 170 python tools/profile_step.py --device cuda --workers "$workers" --batch-size 256 --blur-forms \
        --trace "$out/trace256.json.gz"
    step profile 120 python tools/profile_step.py --device cuda --workers "$workers" --batch-size 512
    step bench 180 python bench.py --device cuda --workers "$bench_workers" --only step,epoch --batch-size 512 \
        --json "$out/bench512.json"
    # the data workers' CPU work per image (one thread), also on large photos: 36 s on an AMD EPYC
    step views 60 python bench.py --only views --json "$out/views.json"
    ;;
runs)
    rm -rf "$runs/run" "$runs/distill"
    # --proj-layers 3: SimCLRv2's head, so that finetune.py takes its v2 recipe (LARS, from head layer 1)
    step pretrain 240 python -m torch.distributed.run --standalone --nproc_per_node=1 pretrain.py --dataset synthetic \
        --synthetic-size 8192 --image-size 224 --arch resnet50 --batch-size 512 --epochs 3 --knn-every 1 \
        --proj-layers 3 --workers "$workers" --out "$runs/run"
    cp "$runs/run/log.jsonl" "$out/pretrain_log.jsonl" 2>/dev/null
    step linear_eval 90 python linear_eval.py "$runs/run/encoder.pt" --epochs 2 --knn --workers "$workers"
    step finetune 90 python finetune.py "$runs/run/encoder.pt" --epochs 1 --label-fraction 0.1 --workers "$workers" \
        --out "$runs/run/ft.json"
    cp "$runs/run/ft.json" "$out/finetune.json" 2>/dev/null
    # the fine-tuned network (ft.pt) teaches a student of its own architecture on every training image
    step distill 120 python -m torch.distributed.run --standalone --nproc_per_node=1 distill.py "$runs/run/ft.pt" \
        --epochs 1 --batch-size 512 --workers "$workers" --out "$runs/distill"
    cp "$runs/distill/results.json" "$out/distill.json" 2>/dev/null
    grep -h -e "^== .*: exit" -e "^top-1 accuracy" "$out"/{pretrain,linear_eval,finetune,distill}.log  # each top-1, then its step
    ;;
compile)
    # limits: eager 32 px 80 s, compiled 140 s; eager 224 px 120 s, compiled 220 s (a cold compile of
    # ResNet-50's forward and backward takes minutes of the 16 CPUs)
    for size in 32 224; do
        arch=$([ "$size" = 32 ] && echo resnet18 || echo resnet50)
        for mode in eager compile; do
            extra=()
            limit=$([ "$size" = 32 ] && echo 80 || echo 120)
            [ "$mode" = compile ] && extra=(--compile) && limit=$((limit + (size == 32 ? 60 : 100)))
            rm -rf "$runs/${mode}_${size}"
            step compile "$limit" python -m torch.distributed.run --standalone --nproc_per_node=1 pretrain.py \
                --dataset synthetic --synthetic-size 8192 --image-size "$size" --arch "$arch" --batch-size 512 \
                --epochs 2 --workers "$workers" --log-every 4 --out "$runs/${mode}_${size}" ${extra[@]+"${extra[@]}"}
        done
    done
    ;;
suite)
    step suite 560 python -m pytest -q -rfEs -x --ignore tests/test_cuda.py tests
    ;;
*)
    echo "unknown part $part: tests, profile, runs, compile or suite" >&2
    exit 2
    ;;
esac
