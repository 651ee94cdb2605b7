#!/usr/bin/env bash
# SCAFFOLD on Shakespeare (a baseline beside FeDEQ; NIID-Bench's definition, docs/inco_spec
# section 6): the dataset's reference settings (main.sh) with Transformer-8.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer scaffold_seq --model transformer8 "$@"
