#!/usr/bin/env bash
# The checks CI cannot run (it has no GPU), as one short script for a machine with a CUDA card:
#   1. the card, torch and CUDA versions;
#   2. the GPU-only tests: AMP pretraining on the card, augmentations and Reobserve on CUDA with
#      CPU and CUDA generators, one GPU per torchrun process (LOCAL_RANK);
#   3. benchmarks/pretrain.py: the CPU rows and the GPU rows (the card's name is printed with them);
#   4. torchrun with the nccl backend: `sim2obs pretrain --device cuda` under torchrun, one process
#      per visible GPU (at least one), one short epoch on synthetic shards.
# Everything it prints also goes to OUTDIR/gpu_check.log.
#
# Usage, in the repository root:  bash benchmarks/gpu_check.sh [OUTDIR]     (about 3-5 min)
# (GPU_CHECK_DEVICE=cpu runs step 4 with gloo on the CPU: a dry run of the script itself.)
# It runs from the source tree (PYTHONPATH=.), so only the dependencies must be installed. Where
# the GPU machine cannot reach PyPI, carry wheels (Python and platform of that machine) in a folder
# and set WHEELS=that/folder: they are installed into /tmp/site first. The pretraining path needs
# torch, numpy, h5py and tqdm; the reddening of the default views also needs extinction, speclite
# and astropy (without them the views skip the dust, and the log says so).
set -uo pipefail
out="${1:-${OUT:-.}}"
mkdir -p "$out"
py="${PYTHON:-python3}"
if [ -n "${WHEELS:-}" ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
status=0
{
    echo "== 1. device"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || status=1
    "$py" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '|',
               torch.cuda.device_count(), 'GPU(s):', torch.cuda.get_device_name(0))" || status=1

    echo "== 2. GPU-only tests"
    "$py" -m pytest -q -p no:cacheprovider --import-mode=importlib -rs \
        tests/pretrain/test_train.py tests/pretrain/test_reobserve.py tests/pretrain/test_augment.py tests/pretrain/test_observing.py \
        -k "cuda or gpu or local_rank" || status=1

    echo "== 3. pretraining throughput (CPU and GPU rows)"
    "$py" benchmarks/pretrain.py || status=1

    echo "== 4. torchrun + nccl"
    shards="$(mktemp -d)"
    "$py" -c "
import sys; sys.path.insert(0, 'tests')
from pathlib import Path
from conftest import make_synthetic_shards
make_synthetic_shards(Path(sys.argv[1]), n=512, bands=('g', 'r', 'i', 'z', 'y'), stamp=64, shard_size=128)
" "$shards/hsc" || status=1
    n_gpu="$("$py" -c 'import torch; print(max(1, torch.cuda.device_count()))')"
    "$py" -m torch.distributed.run --standalone --nproc_per_node "$n_gpu" -m sim2obs pretrain \
        "$shards/hsc" --out "$shards/run" --device "${GPU_CHECK_DEVICE:-cuda}" --epochs 1 \
        --batch-size 64 --precision bf16 --quiet || status=1
    "$py" -c "
import csv, json, sys
run = sys.argv[1]
cfg = json.load(open(run + '/config.json'))
row = list(csv.DictReader(open(run + '/metrics.csv')))[-1]
print('nccl run: world size', cfg['world_size'], 'device', cfg['device'], '| loss', row['train_loss'],
      '| samples/s', row['samples_per_s'])
" "$shards/run" || status=1
    rm -rf "$shards"
    echo "== gpu_check: $([ $status -eq 0 ] && echo all passed || echo SOME STEP FAILED)"
    exit "$status"
} 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
