#!/bin/bash
# Give this worker container one GPU of its own, then exec the command (`kru worker`).
#
# Compose cannot hand the replicas of a scaled service different GPUs: with `count: 1` every
# replica gets the same device (docker/compose#11863). So the worker service reserves the node's
# GPUs and each container claims the first free one by holding an exclusive lock on
# $GPU_LOCK_DIR/gpu-<minor>.lock, a volume local to the node. The lock's file descriptor is
# inherited by the worker across `exec`, so the claim lasts exactly as long as the worker process
# (a killed container frees its GPU at once; no stale state to clean up).
#
# No GPU visible (the CPU override): the command runs as is. CUDA_VISIBLE_DEVICES set by the
# operator: respected, nothing is claimed.
set -euo pipefail

lock_dir=${GPU_LOCK_DIR:-/run/kru-gpus}
dev_dir=${GPU_DEV_DIR:-/dev}

if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
  exec "$@"
fi

# The GPU device nodes the container runtime gave us (/dev/nvidia0, /dev/nvidia3, ...), in minor
# number order, which is the driver's PCI bus order: with CUDA_DEVICE_ORDER=PCI_BUS_ID, the k-th
# of them is CUDA device k.
mapfile -t minors < <(
  for node in "$dev_dir"/nvidia[0-9]*; do
    [[ -e $node ]] && echo "${node##*/nvidia}"
  done | sort -n
)
if ((${#minors[@]} == 0)); then
  exec "$@"
fi

mkdir -p "$lock_dir"
for index in "${!minors[@]}"; do
  exec 9>"$lock_dir/gpu-${minors[$index]}.lock"
  if flock --nonblock 9; then
    export CUDA_VISIBLE_DEVICES=$index CUDA_DEVICE_ORDER=PCI_BUS_ID
    echo "kru-gpu-entrypoint: this worker uses GPU ${minors[$index]} (CUDA_VISIBLE_DEVICES=$index)" >&2
    exec "$@"
  fi
  exec 9>&-
done
echo "kru-gpu-entrypoint: all ${#minors[@]} GPUs of this node are held by other workers;" \
  "run at most ${#minors[@]} workers on this node (docker compose up --scale worker=${#minors[@]})" >&2
exit 1
