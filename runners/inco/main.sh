#!/usr/bin/env bash
# InCo Aggregation's experiments (docs: shared inco_spec sections 8.2-8.3): CIFAR-10 cut
# into 100 clients by the authors' fixed Dirichlet partition (alpha 0.5; pass it with
# --partition_file, e.g. shared/data/inco/cifar10_hetero-fix-100-0.5.npy), 5 equal groups
# training ResNet10/14/18/22/26 cut from one ResNet26, 10 clients per round, 5 local
# epochs of Adam (lr 1e-3, fresh every round), batch 64, 500 (+1) rounds, the unweighted
# average over owners (HeteroAvg), the global test set scored per group every round.
# --model vit_s12 for layer splitting (then also -lr 0.01 -b 32: SGD with momentum 0.9 and
# weight decay 1e-5 is chosen for the ViT), --dataset fmnist/svhn/cinic10 for the others.
# Extra flags are appended and override these (absl takes the last value given).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec python3 "$here/../../main.py" \
  --dataset cifar10 \
  --model resnet26 \
  --partition hetero-fixed \
  --alpha 0.5 \
  --num_clients 100 \
  --num_rounds 500 \
  --clients_per_round 0.1 \
  --inner_epochs 5 \
  --batch_size 64 \
  --learning_rate 0.001 \
  --unweighted_updates \
  --eval_every 1 \
  --seed 100 \
  "$@"
