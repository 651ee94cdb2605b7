#!/usr/bin/env bash
# InCoMOON (InCo Aggregation, Table 2): see main.sh; the paper runs MOON for 100 rounds.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer incomoon --num_rounds 100 "$@"
