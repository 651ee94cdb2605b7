#!/usr/bin/env bash
# DAC's federated part (dac_spec 4.1) on the shared engine: CIFAR-10 normalised with
# 0.5/0.5, no augmentation, K = 10 clients (--partition dac-iid: 50,000/K each;
# dac-shards: 2 label-sorted shards of 200), max(floor(0.1 K), 1) clients per round,
# 5 local epochs of SGD (lr 0.1, momentum 0.5, no weight decay, fresh each round),
# batch 128, the unweighted mean of the full state (BN statistics and counters too),
# the global model scored on the 10,000 test images (every round here; DAC only after
# the last). 50 rounds as the report (-t 49: the engine runs num_rounds + 1).
# Extra flags are appended and override these (absl takes the last value given).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec python3 "$here/../../main.py" \
  --trainer heteroavg \
  --dataset cifar10 \
  --partition dac-iid \
  --num_clients 10 \
  --clients_per_round 0.1 \
  --num_rounds 49 \
  --inner_epochs 5 \
  --batch_size 128 \
  --learning_rate 0.1 \
  --optimizer sgd \
  --momentum 0.5 \
  --unweighted_updates \
  --augment none \
  --noglobal_eval_drop_last \
  --eval_every 1 \
  --seed 100 \
  "$@"
