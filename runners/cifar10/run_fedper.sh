#!/usr/bin/env bash
# FedPer on CIFAR-10: ResNet34.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer fedper_resnet --model resnet34 "$@"
