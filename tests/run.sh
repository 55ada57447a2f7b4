#!/usr/bin/env bash
# The test command of README.md: every test of the workspace on the embedded
# broker (librdkafka's mock cluster), then the integration suite again on a
# real broker, tansu 0.6.0, which tests/broker.sh installs if missing,
# starts on loopback and stops on exit.
#
#   bash tests/run.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

echo "== all tests on the embedded broker"
env -u MS2M_TEST_BROKERS cargo test --workspace

echo "== integration tests on tansu (a real Kafka-compatible broker)"
bash tests/broker.sh install
trap 'bash tests/broker.sh stop' EXIT
brokers="$(bash tests/broker.sh start)"
export "${brokers?}"
echo "using $MS2M_TEST_BROKERS"
cargo test -p ms2m-tests
