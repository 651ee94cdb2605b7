#!/usr/bin/env bash
# FeDEQ with three solver-iteration tiers (caps 4 / 10 / 20, equal groups of clients),
# also scored at 40 iterations, on a dataset's reference settings:
#   bash runners/deq_tiers/run_caps.sh femnist --data_dir ROOT [more flags]
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dataset=${1:?usage: run_caps.sh femnist|cifar10|cifar100 [flags]}
shift
exec bash "$here/../$dataset/run_fedeq.sh" \
  --tiers 'name=cap4,maxiter=4;name=cap10,maxiter=10;name=cap20,maxiter=20' \
  --eval_maxiter 40 "$@"
