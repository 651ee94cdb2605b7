#!/usr/bin/env bash
# SCAFFOLD on cifar100 (a baseline beside FeDEQ; NIID-Bench's definition, docs/inco_spec section 6):
# the dataset's reference settings (main.sh) with resnet34.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer scaffold_resnet --model resnet34 "$@"
