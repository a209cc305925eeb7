#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine, skipping what is already there:
# build libraries for librdkafka, redis-server, curl, the tansu broker (from crates.io) and
# schemathesis (from PyPI). Safe to run again.
set -euo pipefail

TANSU_VERSION=0.6.0
SCHEMATHESIS_VERSION=4.32.5

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need_apt=()
for pkg in redis-server curl pkg-config libssl-dev cmake g++ make; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

export PATH="$HOME/.cargo/bin:$PATH"
if ! tansu --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
  echo "installing tansu $TANSU_VERSION (a Kafka-compatible broker; takes several minutes)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore --quiet
fi

if ! command -v st >/dev/null 2>&1 && ! command -v schemathesis >/dev/null 2>&1; then
  echo "installing schemathesis $SCHEMATHESIS_VERSION"
  python3 -m pip install --quiet "schemathesis==$SCHEMATHESIS_VERSION" 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages "schemathesis==$SCHEMATHESIS_VERSION"
fi
# Python tools of the packaging tests (Helm's engine through its Go SDK, Kubernetes schemas,
# PromQL and Compose parsers), pinned.
if ! python3 -c "import helm_python, kubernetes_validate, promql_parser" >/dev/null 2>&1; then
  echo "installing the packaging tests' Python tools"
  python3 -m pip install --quiet -r "$(dirname "$0")/packaging-requirements.txt" 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages -r "$(dirname "$0")/packaging-requirements.txt"
fi
echo "prerequisites ready: $(tansu --version 2>/dev/null | head -1), $(redis-server --version | cut -d' ' -f3)"
