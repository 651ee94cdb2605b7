#!/usr/bin/env bash
# FedNova on femnist (a baseline beside FeDEQ; NIID-Bench's definition, docs/inco_spec section 6):
# the dataset's reference settings (main.sh) with resnet20.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer fednova_resnet --model resnet20 "$@"
