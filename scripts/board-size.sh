#!/usr/bin/env bash
# Where the bytes of the mps2-an386 board image go: section sizes, flash and static RAM, and
# .text split by origin (kiln_runtime, crypto, kiln_device, …) from the symbol table.
#
#   scripts/board-size.sh [ELF]
#
# ELF defaults to target/firmware/thumbv7em-none-eabihf/release/kiln-board-mps2-an386; when it
# is missing and KILN_TRUSTED_KEYS is set, the image is built first (see
# firmware/boards/mps2-an386/README.md). Needs arm-none-eabi-size and arm-none-eabi-nm
# (apt-get install binutils-arm-none-eabi).
#
# The split is by symbol name and approximate: with LTO, code inlined into a caller counts for the
# caller's crate (the board's `main` holds most of the inlined request loop and device code), and
# generic code counts for the crate of the type it was instantiated for.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
ELF="${1:-$ROOT/target/firmware/thumbv7em-none-eabihf/release/kiln-board-mps2-an386}"

for tool in arm-none-eabi-size arm-none-eabi-nm; do
  command -v "$tool" >/dev/null || { echo "error: $tool is missing; install binutils-arm-none-eabi"; exit 1; }
done
if [ ! -f "$ELF" ]; then
  if [ -n "${KILN_TRUSTED_KEYS:-}" ] && [ $# -eq 0 ]; then
    (cd firmware/boards/mps2-an386 && CARGO_TARGET_DIR="$ROOT/target/firmware" \
      cargo build -q --release --target thumbv7em-none-eabihf)
  else
    echo "error: $ELF does not exist"
    echo "hint: build it with KILN_TRUSTED_KEYS=NAME.pub (see firmware/boards/mps2-an386/README.md), or pass an ELF"
    exit 1
  fi
fi

echo "image: $ELF"
arm-none-eabi-size -A "$ELF" | awk '
  $1 ~ /^\.(vector_table|text|rodata|data|bss|uninit)$/ { size[$1] = $2; order[++n] = $1 }
  END {
    printf "\n%-16s %10s\n", "section", "bytes"
    for (i = 1; i <= n; i++) printf "%-16s %10d\n", order[i], size[order[i]]
    flash = size[".vector_table"] + size[".text"] + size[".rodata"] + size[".data"]
    ram = size[".data"] + size[".bss"] + size[".uninit"]
    printf "\nflash (vector table + .text + .rodata + .data): %d bytes (%.1f KiB)\n", flash, flash / 1024
    printf "static RAM (.data + .bss): %d bytes (%.1f KiB); the stack comes on top\n", ram, ram / 1024
  }'

# Hex to decimal in any awk (mawk has no strtonum).
HEX='function hex(s,  i, n) { n = 0; s = tolower(s); for (i = 1; i <= length(s); i++) n = n * 16 + index("0123456789abcdef", substr(s, i, 1)) - 1; return n }'
TEXT=$(arm-none-eabi-size -A "$ELF" | awk '$1 == ".text" { print $2 }')

# Code symbols (t/T/w/W) with sizes: "addr size type name...".
arm-none-eabi-nm -C -S --size-sort "$ELF" | awk -v text="$TEXT" "$HEX"'
  $3 ~ /^[tTwW]$/ {
    size = hex($2)
    name = $0
    sub(/^[^ ]+ [^ ]+ [^ ]+ /, "", name)
    crate = "(no path: mem*, __aeabi_*, Reset)"
    if (match(name, /[A-Za-z_][A-Za-z0-9_]*::/)) crate = substr(name, RSTART, RLENGTH - 2)
    if (name ~ /curve25519|ed25519|sha2::|Sha256|Sha512|subtle::/) group = "crypto (ed25519, curve25519, sha2)"
    else if (crate == "kiln_runtime") group = "kiln_runtime"
    else if (crate == "kiln_device") group = "kiln_device"
    else if (crate ~ /^(kiln_board_mps2_an386|cortex_m|cortex_m_rt|cortex_m_semihosting)$/) group = "board: main (request loop, inlined device code), UART, semihosting"
    else if (crate ~ /^(postcard|serde|serde_core|cobs|crc)$/) group = "encoding: postcard, serde_core, cobs, crc"
    else if (crate ~ /^(core|compiler_builtins|libm|half|heapless)$/ || name !~ /::/ || name ~ /^__/) group = "core, compiler_builtins, libm, half, heapless"
    else group = "other"
    by_group[group] += size
    by_crate[crate] += size
    total += size
  }
  END {
    printf "\n.text by origin (%d bytes in symbols, %d in none: alignment, literal pools)\n", total, text - total
    for (g in by_group) printf "  %8d  %5.1f%%  %s\n", by_group[g], 100 * by_group[g] / text, g | "sort -nr"
    close("sort -nr")
    printf "\n.text by crate\n"
    for (c in by_crate) printf "  %8d  %s\n", by_crate[c], c | "sort -nr"
    close("sort -nr")
  }'

echo
echo "largest RAM objects (.bss, .data):"
arm-none-eabi-nm -C -S --size-sort "$ELF" | awk "$HEX"'
  $3 ~ /^[bBdD]$/ { name = $0; sub(/^[^ ]+ [^ ]+ [^ ]+ /, "", name); printf "  %8d  %s\n", hex($2), name }' |
  sort -nr | head -6
