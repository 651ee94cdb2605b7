#!/usr/bin/env bash
# FedRep on CIFAR-100: ResNet34.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer fedrep_resnet --model resnet34 "$@"
