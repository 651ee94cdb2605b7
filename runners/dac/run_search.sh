#!/usr/bin/env bash
# DAC's channel-gate search of MobileNet-V2 on CIFAR-10 (dac_spec 2): SGD lr 0.01,
# momentum 0.9, weight decay 5e-4 (gates too), cosine over 10 epochs, batch 256,
# CE + 0.1 * (entropy + 0.1 * bound). Writes OUT/snapshots.json after every epoch.
# Pass --data_dir ROOT --out DIR; --train_subset/--test_subset N to fit a small CPU.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHONPATH="$here/../..${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m trainers.dac.search \
  --epochs 10 \
  --lr 0.01 \
  --batch_size 256 \
  --penalty_factor 0.1 \
  --threshold 0.1 \
  --floor 8 \
  "$@"
