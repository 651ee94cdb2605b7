#!/usr/bin/env bash
# Local training, no communication on CIFAR-100: ResNet34.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer local_resnet --model resnet34 "$@"
