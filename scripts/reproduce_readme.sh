#!/usr/bin/env bash
# Re-runs every offline command quoted in README.md and RESULTS.md (tiny models, synthetic data, CPU)
# and checks that each quoted table is exactly what the command prints (timings and speed ratios exempt).
# Usage: scripts/reproduce_readme.sh [LOG_DIR]      (exit 0 = every quoted result reproduced)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python scripts/check_readme.py --logs "${1:-runs/reproduce_readme}"
