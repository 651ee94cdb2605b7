#!/usr/bin/env bash
# HeteroScaffold (InCo Aggregation, Table 2): see main.sh for the settings.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer heteroscaffold "$@"
