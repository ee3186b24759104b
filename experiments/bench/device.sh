#!/bin/bash
# The GPU figures in one device run (about 5 minutes on one H200): issue 14's overhead,
# throughput and memory on DDPM's CIFAR-10 UNet (gpu.py) and SD 1.5's pairs/s and rectify
# steps/s at the real size (sd_throughput.py). Results go to $OUT (or out/device).
#
# The device image has torch, accelerate, transformers, torchdiffeq and safetensors but not
# diffusers or POT: download their Python 3.12 wheels here first, into .whl (ignored by git),
# and name .whl in the run's carry:
#
#   echo /.whl/ >> .git/info/exclude
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 POT==0.9.7.post1
#
# (39 MB, checked: diffusers 0.42.1 needs nothing else the image lacks, and with the 4 MB
# tree it stays under the 64 MiB a run carries), then run `bash experiments/bench/device.sh`
# there. `--tiny` runs both harnesses on tiny networks on this machine's CPU (a check of the
# script, not a measurement).
set -o pipefail
cd "$(dirname "$0")/../.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
out=${OUT:-out/device}
mkdir -p "$out"
if [ "$1" = "--tiny" ]; then
    gpu_args=(--tiny --device cpu --rounds 4 --block 2 --batch 16 --pairs 64)
    sd_args=(--tiny --pairs 8 24 --steps 2 6)
else
    gpu_args=()
    sd_args=()
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu_name.txt"
fi
"$python" experiments/bench/gpu.py "${gpu_args[@]}" 2>&1 | tee "$out/gpu.txt" || exit 1
"$python" experiments/bench/sd_throughput.py --work /tmp/sd_bench "${sd_args[@]}" 2>&1 \
    | grep -v "it/s\]\|pair/s\]" | tee "$out/sd_throughput.txt" || exit 1
