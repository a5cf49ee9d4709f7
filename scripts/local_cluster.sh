#!/usr/bin/env bash
# Runs deepcf as an N-worker MultiWorkerMirroredStrategy cluster on this machine (127.0.0.1 only).
#
#   scripts/local_cluster.sh N [deepcf flags...]
#   e.g. scripts/local_cluster.sh 2 --mode=train --data_dir=data/yes_small --model_dir=/tmp/mw
#
# Worker i gets TF_CONFIG {"cluster": {"worker": [127.0.0.1:<free port>, ...]}, "task": {"type":
# "worker", "index": i}} and runs `python deepcf.py --strategy=multi_worker FLAGS`; worker 0 is the
# chief. Each worker logs to $LOG_DIR/worker_<i>.log (default: a new temporary directory). If a
# worker fails, the others are stopped (a cluster cannot go on without it). Exits with the chief's
# status, or, if the chief was stopped that way, with the status of the worker that failed first.
# Set PYTHON to choose the interpreter. See docs/scaling.md.
set -euo pipefail

usage="usage: $0 N [deepcf flags...]"
[[ $# -ge 1 && $1 =~ ^[1-9][0-9]*$ ]] || { echo "$0: N must be a positive integer; $usage" >&2; exit 2; }
n=$1
shift
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
log_dir=${LOG_DIR:-$(mktemp -d -t deepcf-cluster.XXXXXX)}
mkdir -p "$log_dir"

# N distinct free loopback ports: bind them all at once, then release them for the workers.
ports=$("$python" -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(",".join(f"\"127.0.0.1:{s.getsockname()[1]}\"" for s in socks))
' "$n")
cluster="{\"worker\": [$ports]}"

pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < n; i++)); do
  TF_CONFIG="{\"cluster\": $cluster, \"task\": {\"type\": \"worker\", \"index\": $i}}" \
    "$python" "$root/deepcf.py" --strategy=multi_worker "$@" >"$log_dir/worker_$i.log" 2>&1 &
  pids+=("$!")
done
echo "local_cluster: $n workers on $cluster; logs in $log_dir" >&2

declare -A status=()
failed="" # the worker that failed first
while ((${#status[@]} < n)); do
  running=()
  for ((i = 0; i < n; i++)); do
    [[ -v "status[$i]" ]] || running+=("${pids[$i]}")
  done
  finished=""
  rc=0
  wait -n -p finished "${running[@]}" || rc=$?
  [[ -n $finished ]] || { echo "local_cluster: lost track of the workers" >&2; stop_all; exit 1; }
  for ((i = 0; i < n; i++)); do
    [[ ${pids[$i]} == "$finished" ]] || continue
    status[$i]=$rc
    echo "local_cluster: worker $i exited with status $rc" >&2
    if ((rc != 0)) && [[ -z $failed ]]; then
      failed=$i
      stop_all
    fi
  done
done

if [[ -n $failed ]]; then
  echo "local_cluster: worker $failed failed first; the end of $log_dir/worker_$failed.log:" >&2
  tail -n 20 "$log_dir/worker_$failed.log" >&2
  exit "${status[$failed]}"
fi
exit "${status[0]}"
