#!/usr/bin/env bash
# kNN-Per, k 10, knn_lam 0.5 on Shakespeare: Transformer-8, one datastore entry per token
# position, padding included as in the reference (--text_acc_ignores_padding: without).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer knnper_seq --model transformer8 --knn_neighbors 10 --knn_lam 0.5 "$@"
