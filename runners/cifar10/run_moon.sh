#!/usr/bin/env bash
# MOON on cifar10 (a baseline beside FeDEQ; NIID-Bench's definition, docs/inco_spec section 6):
# the dataset's reference settings (main.sh) with resnet34.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer moon_resnet --model resnet34 --moon_mu 0.001 --moon_temperature 0.5 "$@"
