#!/usr/bin/env bash
# FedPer on Shakespeare: Transformer-8, bodies averaged uniformly as the reference's
# fedper_seq (--notext_uniform_average: weighted by samples).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer fedper_seq --model transformer8 "$@"
