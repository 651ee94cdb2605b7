#!/usr/bin/env bash
# CIFAR-10 with the reference's hyper-parameters (spec 4.2): 150 (+1) rounds, 100 clients
# with 5 labels each, 10 per round, batch 20, lr 0.01, 5 local and 3 personal epochs, seed
# 100.
# Extra flags are appended and override these (absl takes the last value given).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/../common.sh"
exec python3 "$here/../../main.py" \
  --dataset cifar10 \
  --num_clients 100 \
  --num_rounds 150 \
  --batch_size 20 \
  --learning_rate 0.01 \
  --clients_per_round 0.1 \
  --labels_per_client 5 \
  "${REFERENCE_COMMON_FLAGS[@]}" \
  "$@"
