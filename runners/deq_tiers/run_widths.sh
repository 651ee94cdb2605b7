#!/usr/bin/env bash
# FeDEQ with three width tiers (1/4, 1/2 and all of the equilibrium block's hidden
# channels, equal groups of clients), on a dataset's reference settings:
#   bash runners/deq_tiers/run_widths.sh femnist --data_dir ROOT [more flags]
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dataset=${1:?usage: run_widths.sh femnist|cifar10|cifar100 [flags]}
shift
exec bash "$here/../$dataset/run_fedeq.sh" \
  --tiers 'name=w25,width=0.25;name=w50,width=0.5;name=w100,width=1' \
  --eval_maxiter 40 "$@"
