# The runs of the GPU issue, in parts that each fit one 10-minute command on a lent GPU
# (see README, "Speed"). Each part writes its logs to $OUT (default ./gpu_out), at most 8 files.
#
#   bash tools/gpu_session.sh tests     # the CUDA-only tests, then bench.py's step, loss and memory
#   bash tools/gpu_session.sh profile   # tools/profile_step.py at 256 and 512 images, blur forms, CIFAR epoch
#   bash tools/gpu_session.sh runs      # pretrain (ResNet-50, 224 px, batch 512, 3 epochs), then both evaluations
#   bash tools/gpu_session.sh compile   # pretrain.py with and without --compile at 32 px and 224 px
#   bash tools/gpu_session.sh suite     # the rest of the test suite on the device's torch
#
# Every command runs under its own time limit, so a part always returns what it has.
set -u -o pipefail
part=${1:?"usage: bash tools/gpu_session.sh tests|profile|runs|compile|suite"}
out=${OUT:-gpu_out}
runs=${TMPDIR:-/tmp}/simclr_gpu_session  # pretraining outputs: not returned, not in the repository
mkdir -p "$out" "$runs"
export PYTHONUNBUFFERED=1
workers=$(( $(nproc) < 16 ? $(nproc) : 16 ))

step() {  # step NAME SECONDS COMMAND...: run it, its output to the terminal and $out/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name: $* (limit ${limit} s)" | tee -a "$out/$name.log"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$out/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" >> "$out/gpu.txt"

case $part in
tests)
    step test_cuda 300 python -m pytest -q -rs tests/test_cuda.py
    step bench 270 python bench.py --device cuda --workers "$workers" --only step,loss,memory --json "$out/bench.json"
    ;;
profile)
    step profile 180 python tools/profile_step.py --device cuda --workers "$workers" --batch-size 256 --blur-forms \
        --trace "$out/trace256.json"
    step profile 120 python tools/profile_step.py --device cuda --workers "$workers" --batch-size 512
    step bench 200 python bench.py --device cuda --workers "$workers" --only step,epoch --batch-size 512 \
        --json "$out/bench512.json"
    ;;
runs)
    rm -rf "$runs/run"
    step pretrain 300 python -m torch.distributed.run --standalone --nproc_per_node=1 pretrain.py --dataset synthetic \
        --synthetic-size 8192 --image-size 224 --arch resnet50 --batch-size 512 --epochs 3 --knn-every 1 --workers "$workers" --out "$runs/run"
    cp "$runs/run/log.jsonl" "$out/pretrain_log.jsonl" 2>/dev/null
    step eval 120 python linear_eval.py "$runs/run/encoder.pt" --epochs 2 --knn --workers "$workers"
    step eval 120 python finetune.py "$runs/run/encoder.pt" --epochs 1 --label-fraction 0.1 --workers "$workers"
    ;;
compile)
    for size in 32 224; do
        arch=$([ "$size" = 32 ] && echo resnet18 || echo resnet50)
        for mode in eager compile; do
            extra=()
            [ "$mode" = compile ] && extra=(--compile)
            rm -rf "$runs/${mode}_${size}"
            step compile 140 python -m torch.distributed.run --standalone --nproc_per_node=1 pretrain.py \
                --dataset synthetic --synthetic-size 8192 --image-size "$size" --arch "$arch" --batch-size 512 \
                --epochs 2 --workers "$workers" --log-every 4 --out "$runs/${mode}_${size}" ${extra[@]+"${extra[@]}"}
        done
    done
    ;;
suite)
    step suite 560 python -m pytest -q -x --ignore tests/test_cuda.py tests
    ;;
*)
    echo "unknown part $part: tests, profile, runs, compile or suite" >&2
    exit 2
    ;;
esac
