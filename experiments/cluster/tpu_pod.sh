#!/bin/bash
# DDPM on CIFAR-10 on a Cloud TPU VM pod slice (v4-32: 4 workers x 4 chips). Run the steps one by
# one from your machine, in the repository root; gcloud's --worker=all runs a command on every
# worker at once, which is what jax.distributed needs: one process per worker.
#
# On TPU, jax.distributed.initialize() (the --distributed flag) finds the coordinator, the number
# of processes and each worker's id from the TPU metadata: nothing to set by hand.
set -euo pipefail

TPU=${TPU:-ddpm-v4-32}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-32}
# Must be the same folder on every worker (orbax writes each checkpoint from all of them into
# one folder): e.g. a Filestore share mounted at /mnt/shared on each worker (step 2).
WORKDIR=${WORKDIR:-/mnt/shared/runs/cifar10_ddpm}
DATA_DIR=${DATA_DIR:-/mnt/shared/tensorflow_datasets}
ALL=(--zone="$ZONE" --worker=all)

# 1. Create the slice.
gcloud compute tpus tpu-vm create "$TPU" --zone="$ZONE" --accelerator-type="$ACCELERATOR" \
  --version=tpu-ubuntu2204-base

# 2. Copy the repository to every worker and install it (and mount the shared folder here:
#    sudo mount -t nfs FILESTORE_IP:/share /mnt/shared).
gcloud compute tpus tpu-vm scp --recurse . "$TPU":~/diffusion_jax "${ALL[@]}"
gcloud compute tpus tpu-vm ssh "$TPU" "${ALL[@]}" \
  --command="cd ~/diffusion_jax && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"

# 3. Prepare CIFAR-10 once, from worker 0 (the workers have network access).
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=0 \
  --command="cd ~/diffusion_jax && .venv/bin/tfds build cifar10 --data_dir=$DATA_DIR"

# 4. Train: the same command on all workers. Run it again to resume from the newest checkpoint.
gcloud compute tpus tpu-vm ssh "$TPU" "${ALL[@]}" \
  --command="cd ~/diffusion_jax && . .venv/bin/activate && python -m diffusion_jax.main --config configs/cifar10_ddpm.py --workdir $WORKDIR --distributed --config.data.data_dir=$DATA_DIR 2>&1 | tee -a ~/train.log"

# 5. Watch (process 0 writes the TensorBoard events and log.INFO to WORKDIR), then delete.
#    tensorboard --logdir $WORKDIR
#    gcloud compute tpus tpu-vm delete "$TPU" --zone="$ZONE"
