#!/usr/bin/env bash
# FedAvg, then local fine-tuning from round 0.3 T on FEMNIST: ResNet20 (the reference's
# script names resnet20, which its argparse rejects; here it runs).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer finetune_resnet --model resnet20 "$@"
