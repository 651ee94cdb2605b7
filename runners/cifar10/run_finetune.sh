#!/usr/bin/env bash
# FedAvg, then local fine-tuning from round 0.3 T on CIFAR-10: ResNet34.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer finetune_resnet --model resnet34 "$@"
