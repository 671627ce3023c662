#!/usr/bin/env bash
# Issue 5, last device call: the gate tests (planted regressions must fail the gate, unchanged
# code must pass) against the baselines recorded by issue5_final_a.sh and issue5_final_b.sh.
# Needs the nvtx wheel carried in .whl. Usage: FUSIONGUARD_COMMIT=<sha> OUT=out bash $0
source "$(dirname "$0")/common.sh"
TAILN=15 step gate_tests 500 python3 -m pytest tests/test_gate.py -m gpu -q -p no:cacheprovider -rs
