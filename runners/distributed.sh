#!/usr/bin/env bash
# Runs any runner as N processes on this machine, joined by jax.distributed, the cohort
# sharded over all their devices (--executor sharded). Process 0 writes the run directory
# and prints; the others write nothing. Exits with the first non-zero status.
#
#   bash runners/distributed.sh N runners/<dataset>/run_<algo>.sh [flags]
#   bash runners/distributed.sh N main.py [flags]
#
# Environment: PORT (coordinator port; default a free one), CPU_DEVICES (CPU devices per
# process, default 1; on CPU the processes share the machine's cores).
set -uo pipefail
if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: bash runners/distributed.sh N runners/<dataset>/run_<algo>.sh|main.py [flags]" >&2
  exit 2
fi
n=$1
runner=$2
shift 2
if [[ ! -f "$runner" ]]; then
  echo "error: runner $runner not found" >&2
  exit 2
fi
port=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < n; i++)); do
  if [[ "$runner" == *.py ]]; then launch=(python3 "$runner"); else launch=(bash "$runner"); fi
  "${launch[@]}" "$@" --executor sharded --cpu_devices "${CPU_DEVICES:-1}" \
    --coordinator "127.0.0.1:$port" --num_processes "$n" --process_id "$i" &
  pids+=($!)
done
status=0
for ((k = 0; k < n; k++)); do
  wait -n
  code=$?
  if [[ $code -ne 0 && $status -eq 0 ]]; then
    status=$code
    # One process failing leaves the others waiting on a collective: stop them.
    kill "${pids[@]}" 2>/dev/null
  fi
done
exit $status
