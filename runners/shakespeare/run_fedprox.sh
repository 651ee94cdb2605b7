#!/usr/bin/env bash
# FedProx on Shakespeare (a baseline beside FeDEQ; NIID-Bench's definition, docs/inco_spec
# section 6): the dataset's reference settings (main.sh) with Transformer-8.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer fedprox_seq --model transformer8 --prox_mu 0.1 "$@"
