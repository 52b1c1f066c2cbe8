#!/usr/bin/env bash
# Runs the three seed scenarios (healthy quorum, slow node, Byzantine detection) against
# an already running testnet — local (`annactl testnet up`) or compose — on ports
# 8001-8003 (RPC, mTLS) and 9001-9003 (metrics/failpoints), once its nodes answer /ready.
# Keys, certificates and artifacts live in $ANNA_TESTNET_DIR (default ./artifacts/testnet;
# the compose testnet's is ./artifacts/compose-testnet). Exits non-zero when any scenario fails.
set -euo pipefail
dir="${ANNA_TESTNET_DIR:-./artifacts/testnet}"
if [ ! -f "$dir/node1/peers.yml" ]; then
  echo "run_rounds.sh: no testnet in $dir (annactl testnet init --dir $dir, then up;" \
    "for the compose testnet: ANNA_TESTNET_DIR=./artifacts/compose-testnet)" >&2
  exit 2
fi
exec annactl testnet scenarios --dir "$dir"
