#!/usr/bin/env bash
# FeDEQ on CIFAR-10: DEQ-ResNet-M, rho 0.01, lam_admm 0.01 (spec 4.2).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer fedeq_resnet --model deq_resnet_m --rho 0.01 \
  --lam_admm 0.01 "$@"
