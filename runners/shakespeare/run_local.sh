#!/usr/bin/env bash
# Local training, no communication on Shakespeare: Transformer-8.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer local_seq --model transformer8 "$@"
