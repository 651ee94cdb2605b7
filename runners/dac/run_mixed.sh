#!/usr/bin/env bash
# Beyond DAC: clients of the five logged budgets (fl/res.logs) in ONE federation, each
# group training the channels its snapshot keeps, the server averaging each channel over
# its owners. Needs --dac_snapshots FILE.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" \
  --budgets 26328640:714658,34196512:840828,51755680:1096978,64238800:1338288,94604800:2932095 \
  "$@"
