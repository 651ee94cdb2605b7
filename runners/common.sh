#!/usr/bin/env bash
# Flags every dataset's main.sh passes (spec 4.2, "common to the four datasets").
# shellcheck disable=SC2034  # used by the scripts that source this file
REFERENCE_COMMON_FLAGS=(
  --inner_mode epoch
  --eval_every 1
  --inner_epochs 5
  --personalized_epochs 3
  --seed 100
)
