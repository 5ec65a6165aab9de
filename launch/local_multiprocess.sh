#!/usr/bin/env bash
# N processes of transkd_jax.main on this machine (127.0.0.1, CPU devices, gloo
# collectives): the multi-host code path, without a cluster.
#
#   launch/local_multiprocess.sh N <transkd_jax.main arguments>
#   launch/local_multiprocess.sh 2 --config=configs/synthetic.py --workdir=/tmp/mp --mode=train
#
# Environment: DEVICES_PER_PROCESS (CPU devices each process gets, default 1),
# PORT (the coordinator's port, default a free one), PYTHON (default python).
# Each process's output lines start with "[process I]". Waits for all; the exit
# status is the first non-zero one. A process that dies makes the others stop
# with an error after --heartbeat_timeout seconds (default 100).
set -uo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N <transkd_jax.main arguments>   (N: number of processes, >= 1)" >&2
  exit 2
fi
n=$1
shift
python=${PYTHON:-python}
devices=${DEVICES_PER_PROCESS:-1}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${XLA_FLAGS:-}" \
    "$python" -m transkd_jax.main "$@" \
      --coordinator_address="127.0.0.1:$port" --num_processes="$n" --process_id="$i" \
      > >(sed -u "s/^/[process $i] /") 2>&1 &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null' INT TERM

status=0
for ((i = 0; i < n; i++)); do
  wait "${pids[$i]}"
  rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "[process $i] exited with status $rc" >&2
    [[ $status -eq 0 ]] && status=$rc
  fi
done
exit "$status"
