#!/usr/bin/env bash
# kNN-Per, k 10, knn_lam 0.5 on CIFAR-100: ResNet34.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer knnper_resnet --model resnet34 --knn_neighbors 10 --knn_lam 0.5 "$@"
