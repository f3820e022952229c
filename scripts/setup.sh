#!/usr/bin/env bash
# Installs selecsls with its tested (pinned) dependencies and the Fashion-MNIST data used by
# the real-data tests and examples. Safe to run again; used by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || echo "setup: could not install dataset-fashion-mnist; the Fashion-MNIST tests will be skipped" >&2
fi
python3 -m pip install -q -c constraints.txt -e ".[test]"
