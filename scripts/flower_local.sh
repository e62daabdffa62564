#!/usr/bin/env bash
# Start a Flower SuperLink and N SuperNodes on 127.0.0.1, run a fedsb federation, stop everything.
#
#   scripts/flower_local.sh                                  # 2 nodes, insecure, built-in tiny demo
#   scripts/flower_local.sh --nodes 3 --config my.toml --out results/fl
#   scripts/flower_local.sh --tls                            # self-signed CA + server certificate
#   scripts/flower_local.sh --auth                           # TLS + SuperNode key pairs, registered
#   scripts/flower_local.sh --run-config secagg=true         # Fed-SB through SecAgg+
#   scripts/flower_local.sh --nodes 3 --config configs/node-data.toml \
#       --node-data parties/a --node-data parties/b --node-data parties/c
#                         # node-data mode: node K reads only the K-th folder, the server none
#                         # (docs/deployment.md)
#
# All processes are started and stopped by pid (see src/fedsb/flower/launch.py); logs, certificates
# and keys are written under <out>/flower-workdir. Recipe and run-config keys: docs/flower.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
export HF_HUB_OFFLINE=1
exec "$PY" -m fedsb.flower.launch "$@"
