#!/usr/bin/env bash
# The whole test suite (unit, component, end to end, chaos): installs the prerequisites it needs
# (tansu, redis-server, schemathesis) when missing, then runs every test with the default test
# threads (no test depends on running alone: each has its own telemetry, ports and topics).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-prereqs.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo test --locked
