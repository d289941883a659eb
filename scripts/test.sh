#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite, slow end-to-end tests included;
# the summary lists every skipped test and why (-rs). QCOMPILE_REQUIRE (tests/conftest.py)
# turns the skips for missing tools it names into failures.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q -rs -p no:cacheprovider "$@" tests
