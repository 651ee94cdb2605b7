#!/usr/bin/env bash
# DAC's own federation: every client trains the one snapshot its budget selects
# (--dac_snapshots FILE; default budget DAC's 113,329,664 MACs / 2,932,095 params, which
# selects the first snapshot). Add --random_epoch for E_c uniform on 1..5.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --budgets 113329664:2932095 "$@"
