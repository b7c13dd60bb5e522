#!/usr/bin/env bash
# Runs launch/main.py on every worker of a Cloud TPU VM pod slice (e.g. v4-32: 4 hosts x 4 chips).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh \
#       --config=configs/vladva.py --workdir=/mnt/shared/runs/vladva [--config.mesh.fsdp=-1 ...]
#
# Every argument goes to main.py unchanged, on every worker. Steps (each can be skipped, see below):
#   1. sync: this checkout (tracked and untracked-but-not-ignored files, no .git) is copied to ~/$REPO_DIR
#      on all workers;
#   2. install: `pip install -e '.[tpu]'` (pyproject's [tpu] extra: jax[tpu] in pyproject's jax range) on all workers;
#   3. run: `python3 launch/main.py --distributed=on ARGS` on all workers at once. jax.distributed.initialize()
#      finds the coordinator and the process ids from the TPU metadata; every host runs the same program.
#
# --workdir must be the same path on every worker and on a file system they all share (Filestore/NFS, or a
# gcsfuse mount of a bucket): each host writes its own shards of a checkpoint, and process 0 writes results.
#
# Environment:
#   TPU_NAME, ZONE  (required)      the TPU VM and its zone; PROJECT optional (else gcloud's default)
#   REPO_DIR=vlm_jax                where the checkout goes on the workers (relative to the home directory)
#   SYNC=1 INSTALL=1                set to 0 to skip a step (e.g. INSTALL=0 for a second run)
#   EXTRAS=tpu                      the pyproject extras to install (e.g. EXTRAS=tpu,tfds,wandb)
#   DETACH=0                        1: start the run under nohup (log in ~/$REPO_DIR/run.log on each worker)
#                                   and return; otherwise stream every worker's output until it ends
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
REPO_DIR="${REPO_DIR:-vlm_jax}"
SYNC="${SYNC:-1}"
INSTALL="${INSTALL:-1}"
DETACH="${DETACH:-0}"
EXTRAS="${EXTRAS:-tpu}"
if [[ $# -eq 0 ]]; then
  echo "usage: TPU_NAME=... ZONE=... $0 --config=configs/<method>.py[:args] --workdir=DIR [--config.a.b=v ...]" >&2
  exit 2
fi

gcloud_tpu() {  # gcloud_tpu ssh|scp ARGS...: on all workers of the slice
  local cmd="$1"; shift
  gcloud compute tpus tpu-vm "$cmd" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all "$@"
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ "$SYNC" == 1 ]]; then
  tarball="$(mktemp -t vlm_jax_XXXXXX).tar.gz"
  trap 'rm -f "$tarball"' EXIT
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
     | while IFS= read -r -d '' f; do if [[ -f "$f" ]]; then printf '%s\0' "$f"; fi; done \
     | tar --null -T - -czf "$tarball")
  echo "syncing $(du -h "$tarball" | cut -f1) to ~/$REPO_DIR on every worker of $TPU_NAME"
  gcloud_tpu scp "$tarball" "$TPU_NAME:~/vlm_jax_sync.tar.gz"
  gcloud_tpu ssh "$TPU_NAME" --command="mkdir -p ~/$REPO_DIR && tar -xzf ~/vlm_jax_sync.tar.gz -C ~/$REPO_DIR && rm ~/vlm_jax_sync.tar.gz"
fi

if [[ "$INSTALL" == 1 ]]; then
  echo "installing on every worker"
  gcloud_tpu ssh "$TPU_NAME" --command="cd ~/$REPO_DIR && python3 -m pip install -q -U pip \
    && python3 -m pip install -q -e '.[$EXTRAS]' -c constraints.txt -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
fi

# Every argument, quoted for the remote shell.
args="$(printf '%q ' "$@")"
run="cd ~/$REPO_DIR && PYTHONUNBUFFERED=1 python3 launch/main.py --distributed=on $args"
if [[ "$DETACH" == 1 ]]; then
  gcloud_tpu ssh "$TPU_NAME" --command="cd ~/$REPO_DIR && nohup bash -c $(printf '%q' "$run") > run.log 2>&1 < /dev/null &"
  echo "started on every worker of $TPU_NAME; logs: ~/$REPO_DIR/run.log on each (worker 0 has the summary)"
else
  gcloud_tpu ssh "$TPU_NAME" --command="$run"
fi
