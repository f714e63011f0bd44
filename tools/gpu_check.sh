#!/usr/bin/env bash
# The repository's GPU check (issue #32): at most ~5 minutes on one GPU; prints one markdown table.
# Usage: tools/gpu_check.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 600 python3 tools/gpu_check.py "$@"
