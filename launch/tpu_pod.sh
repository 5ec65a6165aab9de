#!/usr/bin/env bash
# transkd_jax.main on every worker of an existing Cloud TPU VM pod slice, from your
# workstation: one process per worker. Each worker runs main with --distributed=on: JAX
# finds the other workers from the TPU VM metadata server (transkd_jax/distributed.py);
# no coordinator flags.
#
#   TPU_NAME=NAME ZONE=ZONE launch/tpu_pod.sh <transkd_jax.main arguments>
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh --config=configs/cityscapes.py \
#       --workdir=gs://my-bucket/runs/b0 --mode=train --config.data.root=/mnt/nfs/cityscapes \
#       --config.teacher.checkpoint=gs://my-bucket/ckpt/b2
#
# Creates nothing: the slice must exist (gcloud compute tpus tpu-vm create ...). Then:
# 1. The code. By default this checkout's last commit: `git archive HEAD` (committed files
#    only: uncommitted changes are not shipped, and the script says when there are some)
#    to a tarball, copied to every worker with `gcloud compute tpus tpu-vm scp
#    --worker=all` and unpacked into ~/REMOTE_DIR (over the files already there). With
#    REPO_URL set, every worker clones it into ~/REMOTE_DIR instead (or pulls that clone).
# 2. `gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command=...`;
#    each worker makes the virtualenv ~/VENV with a Python >= 3.11 unless it exists (no
#    such Python: the worker stops with one line naming what to install), runs
#    `pip install -e '.[tpu]'` in it (JAX with its matching libtpu, and gcsfs for gs://
#    workdirs), then `VENV/bin/python -m transkd_jax.main --distributed=on <arguments>`
#    from ~/REMOTE_DIR, so relative configs/ paths work. The arguments are quoted with
#    printf %q: spaces and quotes arrive intact.
# --workdir, the data and any checkpoint must be on storage every worker sees (a gs://
# bucket, NFS / Filestore): all workers write the checkpoints together. The run lasts as
# long as this ssh session: start it in tmux or screen. Running it again with the same
# --workdir resumes the run.
#
# Environment:
#   TPU_NAME, ZONE  required: the slice and its zone
#   PROJECT         the Google Cloud project (default: gcloud's configured one)
#   REPO_URL        a repository each worker clones instead of receiving this checkout
#                   (the workers need read access to it, e.g. a public https URL)
#   BRANCH          with REPO_URL: the branch to check out (default: its default branch)
#   REMOTE_DIR      the code on each worker, relative to ~ unless absolute (default:
#                   transkd-jax)
#   VENV            the virtualenv on each worker, relative to ~ unless absolute
#                   (default: transkd-venv); made when missing, reused after
#   REMOTE_PYTHON   the Python that makes the virtualenv, as typed in the workers' shell
#                   (default: the first of python3.12, python3.11, python3 that is >= 3.11)
#   INSTALL=0       no code shipped or cloned, no virtualenv made, no pip install: main
#                   runs with VENV's Python in ~/REMOTE_DIR as they are
#   DRY_RUN=1       print the commands (git archive, gcloud scp, gcloud ssh) and what each
#                   worker runs, and run none of them
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
dry_run=${DRY_RUN:-0}
remote_dir=${REMOTE_DIR:-transkd-jax}
venv=${VENV:-transkd-venv}
pythons=${REMOTE_PYTHON:-python3.12 python3.11 python3}
branch=${BRANCH:-}
repo_url=${REPO_URL:-}
tarball=transkd-jax.tar.gz  # the shipped code in ~ on each worker, removed once unpacked

gcloud_flags=(--zone="$ZONE" --worker=all)
[[ -n "${PROJECT:-}" ]] && gcloud_flags+=(--project="$PROJECT")

q() { printf '%q' "$1"; }  # one word, quoted for the workers' shell (bash)
# A path on the workers, quoted: relative paths are under ~ (left unquoted, so it expands).
home_path() {
  if [[ "$1" == /* ]]; then q "$1"; else printf '~/%s' "$(q "$1")"; fi
}

ship=0
if [[ "$install" != 0 && -z "$repo_url" ]]; then
  ship=1
  if ! root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel 2>/dev/null); then
    echo "error: $(dirname "$0") is not in a git checkout, so there is no commit to ship: set REPO_URL (a repository each worker clones), or INSTALL=0 if the workers are set up" >&2
    exit 2
  fi
  commit=$(git -C "$root" rev-parse --short HEAD)
  # GIT_OPTIONAL_LOCKS=0: status only reads; it does not refresh the index file.
  if [[ -n "$(GIT_OPTIONAL_LOCKS=0 git -C "$root" status --porcelain --untracked-files=no)" ]]; then
    echo "note: $root has uncommitted changes; they are not shipped (git archive HEAD ships commit $commit)" >&2
  fi
  if [[ "$dry_run" != 0 ]]; then
    archive_dir="${TMPDIR:-/tmp}/transkd-jax.XXXXXX"  # mktemp -d makes it in a real run
  else
    archive_dir=$(mktemp -d "${TMPDIR:-/tmp}/transkd-jax.XXXXXX")
    trap 'rm -rf "$archive_dir"' EXIT
  fi
  archive="$archive_dir/$tarball"
  archive_cmd=(git -C "$root" archive --format=tar.gz -o "$archive" HEAD)
  scp_cmd=(gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:$tarball" "${gcloud_flags[@]}")
fi

# What every worker runs (one line: gcloud passes it to the remote shell).
d=$(home_path "$remote_dir")
python="$(home_path "$venv")/bin/python"
remote="set -e; "
if [[ "$install" != 0 ]]; then
  # The virtualenv, made once with the first of $pythons that is Python >= 3.11.
  remote+="if [ ! -x $python ]; then py=; for p in $pythons; do "
  remote+='if command -v "$p" >/dev/null && "$p" -c "import sys; sys.exit(sys.version_info < (3, 11))"; then py=$p; break; fi; done; '
  remote+='if [ -z "$py" ]; then echo "$(hostname): no Python >= 3.11 among '"$pythons"': install one (e.g. sudo apt-get install python3.11 python3.11-venv) or set REMOTE_PYTHON" >&2; exit 1; fi; '
  remote+="\"\$py\" -m venv $(home_path "$venv"); fi; "
  if [[ "$ship" == 1 ]]; then
    remote+="mkdir -p $d; tar -xzf ~/$tarball -C $d; rm -f ~/$tarball; "
  else
    if [[ -n "$branch" ]]; then
      update="git -C $d fetch --quiet origin; git -C $d checkout --quiet $(q "$branch"); git -C $d pull --quiet --ff-only"
      clone="git clone --quiet --branch $(q "$branch") $(q "$repo_url") $d"
    else
      update="git -C $d pull --quiet --ff-only"
      clone="git clone --quiet $(q "$repo_url") $d"
    fi
    remote+="if [ -d $d/.git ]; then $update; else $clone; fi; "
  fi
  remote+="cd $d; $python -m pip install --quiet -e '.[tpu]'; "
else
  remote+="cd $d; "
fi
main="exec $python -m transkd_jax.main --distributed=on"
for arg in "$@"; do
  main+=" $(q "$arg")"
done
remote+="$main"

ssh_cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_flags[@]}" --command="$remote")

if [[ "$dry_run" != 0 ]]; then
  if [[ "$ship" == 1 ]]; then
    echo "# ship commit $commit to every worker:"
    printf '%q ' "${archive_cmd[@]}"
    echo
    printf '%q ' "${scp_cmd[@]}"
    echo
  fi
  echo "# each worker runs: $remote"
  printf '%q ' "${ssh_cmd[@]}"
  echo
  exit 0
fi
if ! command -v gcloud >/dev/null; then
  echo "error: gcloud not found (install the Google Cloud CLI), or DRY_RUN=1 to print the commands" >&2
  exit 2
fi
if [[ "$ship" == 1 ]]; then
  echo "shipping commit $commit of $root to every worker of $TPU_NAME" >&2
  "${archive_cmd[@]}"
  "${scp_cmd[@]}"
  rm -rf "$archive_dir"
fi
exec "${ssh_cmd[@]}"
