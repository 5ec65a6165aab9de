#!/usr/bin/env bash
# transkd_jax.main on every worker of an existing Cloud TPU VM pod slice, from your
# workstation: one process per worker, started by
# `gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command=...`.
# Each worker runs main with --distributed=on: JAX finds the other workers from the TPU VM
# metadata server (transkd_jax/distributed.py); no coordinator flags.
#
#   TPU_NAME=NAME ZONE=ZONE launch/tpu_pod.sh <transkd_jax.main arguments>
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh --config=configs/cityscapes.py \
#       --workdir=/mnt/nfs/runs/b0 --mode=train --config.data.root=/mnt/nfs/cityscapes
#
# Creates nothing: the slice must exist (gcloud compute tpus tpu-vm create ...). On each
# worker it clones REPO_URL into ~/REMOTE_DIR (or pulls it), runs
# `pip install -e ".[tpu]"` there (JAX with its matching libtpu, and gcsfs for gs://
# workdirs), then `python3 -m transkd_jax.main --distributed=on <arguments>` from
# the repository root, so relative configs/ paths work. --workdir, the data and any
# checkpoint must be on storage every worker sees (a gs:// bucket, NFS / Filestore): all
# workers write the checkpoints together. The run lasts as long as this ssh session: start it in
# tmux or screen. Running it again with the same --workdir resumes the run.
#
# Environment:
#   TPU_NAME, ZONE  required: the slice and its zone
#   PROJECT         the Google Cloud project (default: gcloud's configured one)
#   REPO_URL        the repository to clone (default: this checkout's `origin` remote; the
#                   workers need read access to it, e.g. a public https URL)
#   BRANCH          the branch to check out (default: the repository's default branch)
#   REMOTE_DIR      the checkout on each worker, relative to ~ (default: transkd-jax)
#   REMOTE_PYTHON   the workers' Python, as typed in their shell (default: python3; e.g.
#                   ~/venv/bin/python where the system Python refuses pip installs)
#   INSTALL=0       skip the clone/pull and pip install (the workers are set up already)
#   DRY_RUN=1       print the gcloud command (and what each worker runs) instead of running it
set -euo pipefail

usage() {
  echo "usage: [DRY_RUN=1] TPU_NAME=NAME ZONE=ZONE $0 <transkd_jax.main arguments>"
  echo
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

if [[ $# -eq 0 ]]; then
  usage >&2
  exit 2
fi
if [[ "$1" == "-h" || "$1" == "--help" ]]; then
  usage
  exit 0
fi

missing=()
[[ -n "${TPU_NAME:-}" ]] || missing+=(TPU_NAME)
[[ -n "${ZONE:-}" ]] || missing+=(ZONE)
if [[ ${#missing[@]} -gt 0 ]]; then
  names="${missing[*]}"
  echo "error: ${names// / and } not set: required environment variables TPU_NAME (the TPU VM slice) and ZONE (its zone); usage: $0 --help" >&2
  exit 2
fi

install=${INSTALL:-1}
remote_dir=${REMOTE_DIR:-transkd-jax}
remote_python=${REMOTE_PYTHON:-python3}
branch=${BRANCH:-}
repo_url=${REPO_URL:-}
if [[ "$install" != 0 && -z "$repo_url" ]]; then
  repo_url=$(git -C "$(dirname "$0")" remote get-url origin 2>/dev/null || true)
  if [[ -z "$repo_url" ]]; then
    echo "error: set REPO_URL (the repository each worker clones; this checkout has no 'origin' remote), or INSTALL=0 if the workers are set up" >&2
    exit 2
  fi
fi

q() { printf '%q' "$1"; }  # one word, quoted for the workers' shell (bash)

# What every worker runs (one line: gcloud passes it to the remote shell).
remote="set -e; "
if [[ "$install" != 0 ]]; then
  d=$(q "$remote_dir")
  if [[ -n "$branch" ]]; then
    update="git -C $d fetch --quiet origin; git -C $d checkout --quiet $(q "$branch"); git -C $d pull --quiet --ff-only"
    clone="git clone --quiet --branch $(q "$branch") $(q "$repo_url") $d"
  else
    update="git -C $d pull --quiet --ff-only"
    clone="git clone --quiet $(q "$repo_url") $d"
  fi
  remote+="if [ -d $d/.git ]; then $update; else $clone; fi; "
  remote+="cd $d; $remote_python -m pip install --quiet -e '.[tpu]'; "
else
  remote+="cd $(q "$remote_dir"); "
fi
main="exec $remote_python -m transkd_jax.main --distributed=on"  # REMOTE_PYTHON: shell words
for arg in "$@"; do
  main+=" $(q "$arg")"
done
remote+="$main"

cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all)
[[ -n "${PROJECT:-}" ]] && cmd+=(--project="$PROJECT")
cmd+=(--command="$remote")

if [[ "${DRY_RUN:-0}" != 0 ]]; then
  echo "# each worker runs: $remote"
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
if ! command -v gcloud >/dev/null; then
  echo "error: gcloud not found (install the Google Cloud CLI), or DRY_RUN=1 to print the command" >&2
  exit 2
fi
exec "${cmd[@]}"
