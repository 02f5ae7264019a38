#!/usr/bin/env bash
# Builds the instruction-counting QEMU plugin: benches/qemu-insn/build.sh OUT.so
# (scripts/verify-instructions.sh builds it into target/qemu-insn/; never commit the .so).
set -euo pipefail
out="${1:?usage: build.sh OUT.so}"
gcc -shared -fPIC -O2 -Wall -Wextra -o "$out" "$(dirname "$0")/insn.c"
