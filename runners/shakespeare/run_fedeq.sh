#!/usr/bin/env bash
# FeDEQ on Shakespeare: DEQ-Transformer, rho 0.01, lam_admm 0.001 (spec 4.2); duals start at
# lam_admm, ADMM terms divided by the batch's token count, uniform server mean, as the
# reference's fedeq_seq.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/main.sh" --trainer fedeq_seq --model deq_transformer --rho 0.01 \
  --lam_admm 0.001 "$@"
