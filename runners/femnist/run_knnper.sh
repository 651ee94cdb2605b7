#!/usr/bin/env bash
# kNN-Per, k 10, knn_lam 0.5 on FEMNIST: ResNet20 (the reference's script names resnet20,
# which its argparse rejects; here it runs).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer knnper_resnet --model resnet20 --knn_neighbors 10 --knn_lam 0.5 "$@"
