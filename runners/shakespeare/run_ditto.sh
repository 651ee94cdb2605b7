#!/usr/bin/env bash
# Ditto, lambda 0.1 on Shakespeare: Transformer-8 (the reference's script glues extra
# arguments onto "0.1"; here they are separate).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer ditto_seq --model transformer8 --lambda 0.1 "$@"
