#!/usr/bin/env bash
# The checks CI cannot run (it has no GPU), as one short script for a machine with a CUDA card.
# Most important first, each step under its own time limit, so a hang cannot eat the device time:
#   1. the card, torch and CUDA versions;
#   2. the GPU-only tests: AMP pretraining on the card, augmentations and Reobserve on CUDA with
#      CPU and CUDA generators, the encoders in bf16 on CUDA, one GPU per torchrun process;
#   3. short runs on the card: (a) the DDP path with nccl -- one rank joined by `pretrain`
#      (DDP with device_ids, SyncBatchNorm, nccl all_reduce and barrier; on one GPU NCCL cannot
#      run two ranks) and the differentiable all-gather under nccl; (b) fp16 with the GradScaler;
#      (c) views made in 2 DataLoader workers, pinned and copied to the card; (d) the GPU run's
#      checkpoint loaded with CUDA hidden; (e) torchrun with one process per GPU (a real
#      multi-rank nccl run when the machine has 2 or more); (f) --compile on the card;
#   4. benchmarks/pretrain.py: the CPU rows and the GPU rows (the card's name is printed with them).
# Everything it prints goes to OUTDIR/gpu_check.log; the runs' config.json and metrics.csv are
# copied to OUTDIR/runs/.
#
# Usage, in the repository root:  bash benchmarks/gpu_check.sh [OUTDIR]     (about 5-7 min)
# (GPU_CHECK_DEVICE=cpu runs step 3 on the CPU with gloo: a dry run of the script itself.)
# It runs from the source tree (PYTHONPATH=.), so only the dependencies must be installed: torch,
# numpy, h5py, tqdm and pytest; the reddening of the default views and RedshiftDimming's test also
# need extinction, speclite and astropy. Where the GPU machine cannot reach PyPI, carry wheels
# (Python and platform of that machine) in a folder and set WHEELS=that/folder: they are
# installed into /tmp/site first.
set -uo pipefail
out="${1:-${OUT:-.}}"
mkdir -p "$out/runs"
py="${PYTHON:-python3}"
dev="${GPU_CHECK_DEVICE:-cuda}"
if [ -n "${WHEELS:-}" ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
status=0
work="$(mktemp -d)"
# step LABEL SECONDS COMMAND...: run it under a time limit, report and remember a failure
step() {
    local label="$1" limit="$2"
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    [ $rc -eq 124 ] && echo "   ($label: stopped after its ${limit} s limit)"
    [ $rc -ne 0 ] && { echo "   FAILED: $label (exit $rc)"; status=1; }
    echo "   [$label: $((SECONDS - t0)) s]"
}
keep() { for r in "$@"; do [ -d "$work/$r" ] && mkdir -p "$out/runs/$r" && cp "$work/$r"/*.json "$work/$r"/*.csv "$out/runs/$r/" 2>/dev/null; done; }
{
    echo "== 1. device"
    step nvidia-smi 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    step torch 60 "$py" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '|',
               torch.cuda.device_count(), 'GPU(s):', torch.cuda.get_device_name(0))"

    echo "== 2. GPU-only tests"
    step gpu-tests 300 "$py" -m pytest -q -p no:cacheprovider -rs \
        tests/pretrain/test_train.py tests/pretrain/test_reobserve.py tests/pretrain/test_augment.py \
        tests/pretrain/test_observing.py tests/encoders/test_encoders.py -k "cuda or gpu or local_rank"

    echo "== 3. short runs on the card ($dev)"
    step shards 60 "$py" -c "
import sys; sys.path.insert(0, 'tests')
from pathlib import Path
from conftest import make_synthetic_shards
make_synthetic_shards(Path(sys.argv[1]), n=512, bands=('g', 'r', 'i', 'z', 'y'), stamp=64, shard_size=128)
" "$work/hsc"
    run=(-m sim2obs pretrain "$work/hsc" --device "$dev" --epochs 1 --batch-size 64 --quiet)
    echo "-- (a) one nccl rank: the DDP path, and the all-gather's forward and backward"
    step ddp-one-rank 180 "$py" -c "
import csv, json, socket, sys, torch, torch.distributed as dist
from sim2obs.pretrain.losses import gather_with_grad
from sim2obs.pretrain.train import PretrainConfig, pretrain
dev = sys.argv[2]
backend = 'nccl' if dev == 'cuda' else 'gloo'
if dev == 'cuda':
    torch.cuda.set_device(0)
with socket.socket() as s:
    s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
dist.init_process_group(backend, init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1)
z = torch.randn(8, 4, device=dev, requires_grad=True)
g = gather_with_grad(z)
(g * torch.arange(4.0, device=dev)).sum().backward()
assert torch.equal(g.detach(), z.detach()) and torch.equal(z.grad, torch.arange(4.0, device=dev).expand(8, 4))
print('all-gather under', backend, 'ok')
run = pretrain([sys.argv[1] + '/hsc'], sys.argv[1] + '/ddp1', PretrainConfig(epochs=1, batch_size=64, precision='bf16'),
               device=dev, progress=False, max_steps_per_epoch=6, log=print)
cfg = json.load(open(run / 'config.json'))
row = list(csv.DictReader(open(run / 'metrics.csv')))[-1]
print('one-rank', backend, 'run: world size', cfg['world_size'], '| device', cfg['device'], '| loss', row['train_loss'])
dist.destroy_process_group()
" "$work" "$dev"
    echo "-- (b) fp16 + GradScaler"
    step fp16 180 "$py" "${run[@]}" --out "$work/fp16" --precision fp16 --max-steps-per-epoch 6
    echo "-- (c) views in 2 DataLoader workers, pinned, to the card"
    step loader-workers 180 "$py" "${run[@]}" --out "$work/loader" --augment-on loader --num-workers 2 \
        --max-steps-per-epoch 6
    echo "-- (d) the card's checkpoint read with CUDA hidden"
    step cpu-load 60 env CUDA_VISIBLE_DEVICES= "$py" -c "
import sys, torch
from sim2obs.pretrain.train import load_encoder
enc, norm, meta = load_encoder(sys.argv[1])
print('loaded on', next(enc.parameters()).device, '| cuda visible:', torch.cuda.is_available())
" "$work/fp16"
    echo "-- (e) torchrun, one process per GPU"
    n_gpu="$("$py" -c 'import torch; print(max(1, torch.cuda.device_count()))')"
    [ "$n_gpu" -lt 2 ] && echo "   one GPU: torchrun runs one process, no group (step (a) covered the nccl DDP path)"
    step torchrun 240 "$py" -m torch.distributed.run --standalone --nproc_per_node "$n_gpu" "${run[@]}" \
        --out "$work/torchrun" --precision bf16
    echo "-- (f) torch.compile on the card"
    step compile 300 "$py" "${run[@]}" --out "$work/compile" --compile --max-steps-per-epoch 6
    "$py" -c "
import csv, json, sys
for name in sys.argv[2:]:
    try:
        cfg = json.load(open(f'{sys.argv[1]}/{name}/config.json'))
        row = list(csv.DictReader(open(f'{sys.argv[1]}/{name}/metrics.csv')))[-1]
    except (OSError, IndexError) as e:
        print(f'{name:9s} no result ({e})'); continue
    print(f'{name:9s} world size {cfg[\"world_size\"]} | {cfg[\"device\"]} | precision {cfg[\"config\"][\"precision\"]} | '
          f'loss {float(row[\"train_loss\"]):.4f} | {float(row[\"samples_per_s\"]):.0f} samples/s')
" "$work" ddp1 fp16 loader torchrun compile
    keep ddp1 fp16 loader torchrun compile

    echo "== 4. pretraining throughput (CPU and GPU rows)"
    step benchmark 420 "$py" benchmarks/pretrain.py
    rm -rf "$work"
    echo "== gpu_check: $([ $status -eq 0 ] && echo all passed || echo SOME STEP FAILED)"
    exit "$status"
} 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
