#!/usr/bin/env bash
# FEMNIST with the reference's hyper-parameters (spec 4.2): 100 writers, 10 per round, 150
# (+1) rounds, batch 10, lr 0.01, 5 local and 3 personal epochs, seed 100.
# Extra flags are appended and override these (absl takes the last value given).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/../common.sh"
exec python3 "$here/../../main.py" \
  --dataset femnist \
  --num_clients 100 \
  --num_rounds 150 \
  --batch_size 10 \
  --learning_rate 0.01 \
  --clients_per_round 0.1 \
  "${REFERENCE_COMMON_FLAGS[@]}" \
  "$@"
