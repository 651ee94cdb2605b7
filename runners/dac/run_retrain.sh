#!/usr/bin/env bash
# Retrain one configuration from scratch (dac_spec 3): --snapshots FILE with --epoch K or
# --macs_budget M --params_budget P; --width_multiplier WM for the baseline. SGD lr 0.1,
# momentum 0.9, weight decay 5e-4, cosine over 10 epochs, batch 100.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHONPATH="$here/../..${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m trainers.dac.retrain \
  --epochs 10 \
  --lr 0.1 \
  --batch_size 100 \
  "$@"
