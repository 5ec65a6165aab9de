#!/usr/bin/env bash
# transkd_jax.main on every worker of a Cloud TPU VM pod slice, from your workstation: one
# process per worker. Each worker runs main with --distributed=on: JAX finds the other
# workers from the TPU VM metadata server (transkd_jax/distributed.py); no coordinator flags.
#
#   TPU_NAME=NAME ZONE=ZONE launch/tpu_pod.sh [--watch] <transkd_jax.main arguments>
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh --config=configs/cityscapes.py \
#       --workdir=gs://my-bucket/runs/b0 --mode=train --config.data.root=/mnt/nfs/cityscapes \
#       --config.teacher.checkpoint=gs://my-bucket/ckpt/b2
#
# Without --watch the slice must exist (gcloud compute tpus tpu-vm create ...). Then:
# 1. The code. By default this checkout's last commit: `git archive HEAD` (committed files
#    only: uncommitted changes are not shipped, and the script says when there are some)
#    to a tarball, copied to every worker with `gcloud compute tpus tpu-vm scp
#    --worker=all` and unpacked into ~/REMOTE_DIR (over the files already there). With
#    REPO_URL set, every worker clones it into ~/REMOTE_DIR instead (or pulls that clone).
# 2. `gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command=...`;
#    each worker makes the virtualenv ~/VENV with a Python >= 3.11 unless it exists (no
#    such Python: the worker stops with one line naming what to install), runs
#    `pip install -e '.[tpu]'` in it (JAX with its matching libtpu, and gcsfs for gs://
#    workdirs), then starts `VENV/bin/python -m transkd_jax.main --distributed=on
#    <arguments>` from ~/REMOTE_DIR (relative configs/ paths work) in the background, in a
#    session of its own (setsid nohup): it goes on when the ssh connection drops. Its output
#    goes to ~/transkd-run.log on each worker (the one before to ~/transkd-run.log.1), its
#    exit status to ~/transkd-run.exit; a lock on ~/transkd-run.lock, held while any of its
#    processes lives, marks it running, and a worker where it runs refuses a second start.
#    The arguments are quoted with printf %q: spaces and quotes arrive intact.
# 3. Unless FOLLOW=0: the log of worker 0 (process 0 prints for the run), until the run
#    ends; the script exits with worker 0's exit status. Ctrl-C or a dropped connection stop
#    only this; follow again with
#      gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 \
#          --command='tail -n +1 -f ~/transkd-run.log'
# --workdir, the data and any checkpoint must be on storage every worker sees (a gs://
# bucket, NFS / Filestore): all workers write the checkpoints together. Running it again
# with the same --workdir resumes the run.
#
# --watch: a supervisor that sees the run through preemption; keep it running (tmux,
# screen, or a small VM). Every POLL seconds it looks at the slice (gcloud compute tpus
# tpu-vm describe, or queued-resources describe with QUEUED_RESOURCE):
#   READY, the run not running on any worker: steps 1 and 2 again (the same commit, the
#     same command), so the run resumes from its newest checkpoint, unless the run has
#     ended for good: --workdir's run_status.json (written by process 0; read with
#     `gcloud storage cat` for gs://, else on the workers) says "done" (total_steps
#     reached: the supervisor exits 0), or it exited 0 without "preempted" (nothing to
#     resume: exits 0), or it failed (non-zero exit) MAX_FAILURES times in a row (exits 1).
#     The first time, it starts the run unless it is running already.
#   PREEMPTED or TERMINATED (queued resource: SUSPENDED or FAILED), or missing: with
#     ACCELERATOR_TYPE and RUNTIME_VERSION set, deletes it and creates it again (tpu-vm
#     create, or queued-resources create), then waits for READY; without them it waits
#     for someone else to re-create it.
#   anything else (CREATING, WAITING_FOR_RESOURCES, ...): waits.
# Stopping the supervisor leaves the run going.
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
#   FOLLOW=0        start the run and return, without following the log
#   DRY_RUN=1       print the commands (git archive, gcloud scp, gcloud ssh; with --watch
#                   also the describe, delete and create commands) and what each worker
#                   runs, and run none of them
# With --watch:
#   POLL            seconds between looks at the slice (default 60)
#   MAX_FAILURES    failed runs in a row before the supervisor gives up (default 3)
#   QUEUED_RESOURCE the slice is the node TPU_NAME of this queued resource
#   ACCELERATOR_TYPE, RUNTIME_VERSION  e.g. v4-32 and tpu-ubuntu2204-base: the slice's type
#                   and software version, to re-create it; unset: the supervisor only waits
#   SPOT=1          re-create it as a Spot TPU (--spot)
#   PREEMPTIBLE=1   re-create it as a preemptible TPU (--preemptible; not with
#                   QUEUED_RESOURCE)
#   CREATE_FLAGS    more flags for the create command, split at spaces (e.g.
#                   "--network=my-net --subnetwork=my-subnet" or "--reserved")
set -euo pipefail

usage() {
  echo "usage: [DRY_RUN=1] TPU_NAME=NAME ZONE=ZONE $0 [--watch] <transkd_jax.main arguments>"
  echo
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

watch=0
if [[ "${1:-}" == --watch ]]; then
  watch=1
  shift
fi
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
follow=${FOLLOW:-1}
remote_dir=${REMOTE_DIR:-transkd-jax}
venv=${VENV:-transkd-venv}
pythons=${REMOTE_PYTHON:-python3.12 python3.11 python3}
branch=${BRANCH:-}
repo_url=${REPO_URL:-}
tarball=transkd-jax.tar.gz  # the shipped code in ~ on each worker, removed once unpacked
# shellcheck disable=SC2088  # ~ expands on the workers
run='~/transkd-run'         # the run's files on each worker: .log .exit .pid .lock
poll=${POLL:-60}
max_failures=${MAX_FAILURES:-3}
queued=${QUEUED_RESOURCE:-}
accelerator=${ACCELERATOR_TYPE:-}
runtime=${RUNTIME_VERSION:-}
read -r -a create_flags <<<"${CREATE_FLAGS:-}"

project=()
[[ -n "${PROJECT:-}" ]] && project=(--project="$PROJECT")
# ${a[@]+"${a[@]}"}: an array that may be empty, under set -u in bash < 4.4 (macOS) too.
gcloud_flags=(--zone="$ZONE" --worker=all ${project[@]+"${project[@]}"})
stamp() { date '+%Y-%m-%dT%H:%M:%S'; }

q() { printf '%q' "$1"; }  # one word, quoted for the workers' shell (bash)
# A path on the workers, quoted: relative paths are under ~ (left unquoted, so it expands).
home_path() {
  if [[ "$1" == /* ]]; then q "$1"; else printf '~/%s' "$(q "$1")"; fi
}

# main's --workdir (--workdir=DIR or --workdir DIR; the last one counts).
workdir=
prev=
for arg in "$@"; do
  [[ "$prev" == --workdir ]] && workdir=$arg
  [[ "$arg" == --workdir=* ]] && workdir=${arg#--workdir=}
  prev=$arg
done
status_path="${workdir%/}/run_status.json"
if [[ "$watch" == 1 ]]; then
  if [[ -z "$workdir" ]]; then
    echo "error: --watch needs main's --workdir: its run_status.json tells when the run is done" >&2
    exit 2
  fi
  if [[ -n "$queued" && "${PREEMPTIBLE:-0}" != 0 ]]; then
    echo "error: PREEMPTIBLE=1 is for tpu-vm create; a queued resource takes SPOT=1 (--spot)" >&2
    exit 2
  fi
fi

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
fi
if [[ "$dry_run" != 0 ]]; then
  work="${TMPDIR:-/tmp}/transkd-jax.XXXXXX"  # mktemp -d makes it in a real run
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/transkd-jax.XXXXXX")
  trap 'rm -rf "$work"' EXIT
fi
if [[ "$ship" == 1 ]]; then
  archive="$work/$tarball"
  archive_cmd=(git -C "$root" archive --format=tar.gz -o "$archive" HEAD)
  scp_cmd=(gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:$tarball" "${gcloud_flags[@]}")
fi

# What every worker runs to start the run (one line: gcloud passes it to the remote shell).
d=$(home_path "$remote_dir")
python="$(home_path "$venv")/bin/python"
remote="set -e; "
# fd 9 holds the lock: taken first, so a second start fails at once, before it ships or
# installs anything under a live run, and kept by the run's processes, which inherit fd 9.
remote+="exec 9>>$run.lock; "
remote+="if ! flock -n 9; then echo \"\$(hostname): transkd_jax.main is already running here ($run.log)\" >&2; exit 1; fi; "
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
# The run, in a bash of its own: its EXIT trap writes main's exit status.
main="$python -m transkd_jax.main --distributed=on"
for arg in "$@"; do
  main+=" $(q "$arg")"
done
inner="trap 'echo \$? > $run.exit' EXIT; echo \"== \$(date -Is) \$(hostname): transkd_jax.main starts\"; $main"
remote+="rm -f $run.exit; if [ -f $run.log ]; then mv -f $run.log $run.log.1; fi; "
remote+="setsid nohup bash -c $(q "$inner") > $run.log 2>&1 < /dev/null & echo \$! > $run.pid; "
remote+="echo \"\$(hostname): transkd_jax.main started in the background (log: $run.log)\""
ssh_cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_flags[@]}" --command="$remote")

# Worker 0's log until the run ends, then its exit status.
follow_remote="if [ ! -f $run.pid ]; then echo \"\$(hostname): no run started here\" >&2; exit 1; fi; "
follow_remote+="tail -n +1 --pid=\"\$(cat $run.pid)\" -f $run.log; "
follow_remote+="if [ -f $run.exit ]; then exit \"\$(cat $run.exit)\"; fi; "
follow_remote+="echo \"\$(hostname): the run ended without an exit status (killed)\" >&2; exit 1"
worker0_flags=(--zone="$ZONE" --worker=0 ${project[@]+"${project[@]}"})
follow_cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${worker0_flags[@]}" --command="$follow_remote")
follow_hint="gcloud compute tpus tpu-vm ssh $TPU_NAME ${worker0_flags[*]} --command='tail -n +1 -f $run.log'"

# --watch: each worker says whether the run is running there, and how it ended; the
# workers also print run_status.json when the workdir is not on gs://.
probe="if ! flock -n $run.lock true 2>/dev/null; then echo 'transkd-run: running'; "
probe+="elif [ -f $run.exit ]; then echo \"transkd-run: exited \$(cat $run.exit)\"; "
probe+="elif [ -f $run.pid ]; then echo 'transkd-run: killed'; else echo 'transkd-run: none'; fi"
status_on_gs=0
status_cmd=(gcloud storage cat "$status_path" ${project[@]+"${project[@]}"})
if [[ "$status_path" == gs://* ]]; then
  status_on_gs=1
else
  # From the code's directory, where main runs (a relative --workdir).
  probe+="; echo \"transkd-status: \$(cd $d 2>/dev/null; cat $(q "$status_path") 2>/dev/null | tr -d '\\n')\""
fi
probe_cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_flags[@]}" --command="$probe")
node_flags=(--zone="$ZONE" ${project[@]+"${project[@]}"})
node_describe=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${node_flags[@]}" --format='value(state)')
tier=()
[[ "${SPOT:-0}" != 0 ]] && tier+=(--spot)
[[ "${PREEMPTIBLE:-0}" != 0 ]] && tier+=(--preemptible)
if [[ -n "$queued" ]]; then
  qr_describe=(gcloud compute tpus queued-resources describe "$queued" "${node_flags[@]}" --format='value(state.state)')
  delete_cmd=(gcloud compute tpus queued-resources delete "$queued" "${node_flags[@]}" --force --quiet)
  create_cmd=(gcloud compute tpus queued-resources create "$queued" --node-id="$TPU_NAME" "${node_flags[@]}"
    --accelerator-type="$accelerator" --runtime-version="$runtime")
else
  delete_cmd=(gcloud compute tpus tpu-vm delete "$TPU_NAME" "${node_flags[@]}" --quiet)
  create_cmd=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${node_flags[@]}"
    --accelerator-type="$accelerator" --version="$runtime")
fi
create_cmd+=(${tier[@]+"${tier[@]}"} ${create_flags[@]+"${create_flags[@]}"})
can_create=0
[[ -n "$accelerator" && -n "$runtime" ]] && can_create=1

print_cmd() {
  printf '%q ' "$@"
  echo
}
if [[ "$dry_run" != 0 ]]; then
  if [[ "$ship" == 1 ]]; then
    echo "# ship commit $commit to every worker:"
    print_cmd "${archive_cmd[@]}"
    print_cmd "${scp_cmd[@]}"
  fi
  echo "# each worker runs: $remote"
  print_cmd "${ssh_cmd[@]}"
  if [[ "$watch" == 0 ]]; then
    if [[ "$follow" != 0 ]]; then
      echo "# then worker 0's log, until the run ends:"
      print_cmd "${follow_cmd[@]}"
    fi
    exit 0
  fi
  echo "# --watch, every $poll s: the slice's state"
  [[ -n "$queued" ]] && print_cmd "${qr_describe[@]}"
  print_cmd "${node_describe[@]}"
  echo "# READY: whether the run is running on the workers (and how it ended)"
  print_cmd "${probe_cmd[@]}"
  if [[ "$status_on_gs" == 1 ]]; then
    echo "# its run_status.json"
    print_cmd "${status_cmd[@]}"
  fi
  if [[ "$can_create" == 1 ]]; then
    echo "# preempted or gone: re-create it"
    print_cmd "${delete_cmd[@]}"
    print_cmd "${create_cmd[@]}"
  else
    echo "# preempted or gone: wait (set ACCELERATOR_TYPE and RUNTIME_VERSION to re-create it)"
  fi
  exit 0
fi
if ! command -v gcloud >/dev/null; then
  echo "error: gcloud not found (install the Google Cloud CLI), or DRY_RUN=1 to print the commands" >&2
  exit 2
fi
if [[ "$ship" == 1 ]]; then  # once: every start ships the same commit
  "${archive_cmd[@]}"
fi

start() {  # ship the code (unless cloned) and start the run on every worker
  if [[ "$ship" == 1 ]]; then
    echo "shipping commit $commit of $root to every worker of $TPU_NAME" >&2
    "${scp_cmd[@]}" || return
  fi
  "${ssh_cmd[@]}"
}

if [[ "$watch" == 0 ]]; then
  start
  [[ "$follow" != 0 ]] || exit 0
  echo "following worker 0's log; the run goes on without this connection; follow it again with: $follow_hint" >&2
  "${follow_cmd[@]}"
  exit
fi

say() { echo "$(stamp) watch: $*" >&2; }
last_note=
note() {  # say, unless it is what the last note said
  [[ "$*" == "$last_note" ]] || say "$*"
  last_note="$*"
}
gcloud_value() {  # gcloud_value CMD...: the value it prints, or NOT_FOUND, or ERROR
  local out
  if out=$("$@" 2>"$work/err"); then
    echo "${out:-UNKNOWN}"
  elif grep -q NOT_FOUND "$work/err"; then
    echo NOT_FOUND
  else
    echo ERROR
  fi
}
last_error() { tail -n 1 "$work/err" 2>/dev/null || true; }
slice_state() {  # sets state (READY, GONE, WAIT or UNKNOWN), what (for the log) and exists
  local qr="" node
  exists=1  # the queued resource, or the slice without one: to delete before creating
  if [[ -n "$queued" ]]; then
    qr=$(gcloud_value "${qr_describe[@]}")
    what="queued resource $queued: $qr"
    [[ "$qr" != NOT_FOUND ]] || exists=0
    case "$qr" in
      ACTIVE) ;;
      NOT_FOUND | SUSPENDED | FAILED) state=GONE && return ;;
      ERROR) state=UNKNOWN && what+=" ($(last_error))" && return ;;
      *) state=WAIT && return ;;
    esac
  fi
  node=$(gcloud_value "${node_describe[@]}")
  what="${qr:+queued resource $queued: $qr, }slice $TPU_NAME: $node"
  [[ -n "$queued" || "$node" != NOT_FOUND ]] || exists=0
  case "$node" in
    READY) state=READY ;;
    PREEMPTED | TERMINATED | NOT_FOUND) state=GONE ;;
    ERROR) state=UNKNOWN && what+=" ($(last_error))" ;;
    *) state=WAIT ;;
  esac
}
field() {  # field JSON NAME: the value of "NAME" (a word or a number) in JSON
  sed -n "s/.*\"$2\": *\"\{0,1\}\([A-Za-z0-9_.-]*\).*/\1/p" <<<"$1" | head -n 1
}

say "watching $TPU_NAME${queued:+ (queued resource $queued)} every $poll s; run_status.json: $status_path; follow the run with: $follow_hint"
[[ "$can_create" == 1 ]] || say "ACCELERATOR_TYPE and RUNTIME_VERSION not set: a preempted slice is not re-created here"
started=0
seen_running=0
failures=0
while :; do
  slice_state
  case "$state" in
    READY)
      if ! answer=$("${probe_cmd[@]}" 2>"$work/err"); then
        note "$what; the workers do not answer ($(last_error))"
      else
        states=$(sed -n 's/.*transkd-run: //p' <<<"$answer")
        workers=$(grep -c . <<<"$states" || true)
        running=$(grep -c '^running' <<<"$states" || true)
        codes=$(sed -n 's/^exited //p' <<<"$states" | tr '\n' ' ')
        if [[ "$status_on_gs" == 1 ]]; then
          status_json=$("${status_cmd[@]}" 2>/dev/null || true)
        else
          status_json=$(sed -n 's/.*transkd-status: //p' <<<"$answer" | head -n 1)
        fi
        status=$(field "$status_json" status)
        at="step $(field "$status_json" step) of $(field "$status_json" total_steps)"
        [[ -n "$status" ]] || at="no run_status.json"
        if [[ "$workers" == 0 ]]; then
          note "$what; no answer from the workers"
        elif [[ "$running" -gt 0 ]]; then
          seen_running=1
          note "$what; running on $running of $workers worker(s)"
        else
          if [[ "$started" == 1 || "$seen_running" == 1 ]]; then  # a run of ours ended
            if [[ -n "$(tr -d ' 0' <<<"$codes")" ]]; then
              failures=$((failures + 1))
              say "the run failed (exit status per worker: ${codes% }; $at): failure $failures of $max_failures"
              if [[ "$failures" -ge "$max_failures" ]]; then
                say "giving up after $failures failed runs in a row; worker 0's log: $follow_hint"
                exit 1
              fi
            elif [[ "$status" == "done" ]]; then
              say "the run is done ($at)"
              exit 0
            elif [[ -n "$codes" && "$status" != preempted ]]; then
              say "the run exited 0 without run_status.json saying preempted (${status:-none}; $at): nothing to resume"
              exit 0
            else
              failures=0
              say "the run stopped (${status:-no status}; $at)${codes:+, exit status ${codes% }}: starting it again"
            fi
          elif [[ "$status" == "done" ]]; then
            say "run_status.json says done ($at): starting the run once (to go on if total_steps grew)"
          fi
          last_note=
          say "$what: starting the run"
          if ! start; then
            failures=$((failures + 1))
            say "the start failed: failure $failures of $max_failures"
            if [[ "$failures" -ge "$max_failures" ]]; then
              say "giving up after $failures failures in a row"
              exit 1
            fi
          fi
          started=1
        fi
      fi
      ;;
    GONE)
      if [[ "$can_create" == 1 ]]; then
        say "$what: re-creating it"
        if [[ "$exists" == 1 ]] && ! "${delete_cmd[@]}"; then
          say "delete failed; trying again in $poll s"
        elif ! "${create_cmd[@]}"; then
          say "create failed; trying again in $poll s"
        fi
        last_note=
      else
        note "$what: waiting for it to be re-created (ACCELERATOR_TYPE and RUNTIME_VERSION unset)"
      fi
      ;;
    *) note "$what" ;;
  esac
  sleep "$poll"
done
