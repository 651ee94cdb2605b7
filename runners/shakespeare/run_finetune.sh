#!/usr/bin/env bash
# FedAvg, then local fine-tuning from round 0.3 T on Shakespeare: Transformer-8.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer finetune_seq --model transformer8 "$@"
