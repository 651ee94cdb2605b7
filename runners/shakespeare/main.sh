#!/usr/bin/env bash
# Shakespeare with the reference's hyper-parameters (spec 4.2): 200 speaking roles, 20 per
# round, 400 (+1) rounds, batch 16, lr 0.1, 5 local and 3 personal epochs, seed 100. The
# reference's "-lpc 16" only named its data files, so it is left out.
# Extra flags are appended and override these (absl takes the last value given).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/../common.sh"
exec python3 "$here/../../main.py" \
  --dataset shakespeare \
  --num_clients 200 \
  --num_rounds 400 \
  --batch_size 16 \
  --learning_rate 0.1 \
  --clients_per_round 0.1 \
  "${REFERENCE_COMMON_FLAGS[@]}" \
  "$@"
