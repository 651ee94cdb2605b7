#!/usr/bin/env bash
# Local training, no communication on FEMNIST: ResNet20 (the reference's script names
# resnet20, which its argparse rejects; here it runs).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer local_resnet --model resnet20 "$@"
