#!/usr/bin/env bash
# FedRep on Shakespeare: Transformer-8, bodies averaged uniformly.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer fedrep_seq --model transformer8 "$@"
