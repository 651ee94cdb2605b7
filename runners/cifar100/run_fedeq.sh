#!/usr/bin/env bash
# FeDEQ on CIFAR-100: DEQ-ResNet-M, rho 0.01, lam_admm 0.01, lr 0.01 (the script overrides
# the dataset's 0.05) (spec 4.2).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer fedeq_resnet --model deq_resnet_m --rho 0.01 \
  --lam_admm 0.01 --learning_rate 0.01 "$@"
