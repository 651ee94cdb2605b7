#!/usr/bin/env bash
# FedAvg on Shakespeare: Transformer-8, clients drawn with replacement as the reference's
# fedavg_seq (--notext_sample_with_replacement: without).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer fedavg_seq --model transformer8 "$@"
