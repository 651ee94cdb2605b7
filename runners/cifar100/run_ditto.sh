#!/usr/bin/env bash
# Ditto, lambda 0.3 on CIFAR-100: ResNet34.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer ditto_resnet --model resnet34 --lambda 0.3 "$@"
