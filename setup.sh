#!/usr/bin/env bash
# One-time set-up on a fresh machine: the Fashion-MNIST Debian package and the package with its dev extras.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${FASHION_MNIST_DIR:-}" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi
python3 -m pip install -q --disable-pip-version-check -e '.[dev]'
