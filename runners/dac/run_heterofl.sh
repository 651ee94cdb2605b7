#!/usr/bin/env bash
# The baseline for the mixed federation: nested width-multiplier sub-models (HeteroFL's
# prefix slicing) of one MobileNet-V2, one group per multiplier.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --width_multipliers 0.35,0.5,0.75,1.0 "$@"
