#!/usr/bin/env bash
# Runs a firmware ELF on the QEMU mps2-an386 machine and decodes its defmt output.
#
# Usage: qemu-run.sh FIRMWARE.elf
# Cargo calls this as the runner of `cargo run` and `cargo test`.
#
# Exit status:
#   QEMU's status, which is the firmware's semihosting exit code, unless a case below applies;
#   124 when QEMU ran longer than QEMU_TIMEOUT_SECS (default 120);
#   127 when qemu-system-arm or defmt-print is not installed;
#   defmt-print's status when QEMU exited 0 but defmt-print failed.
# A firmware exit code of 124 or 137 is reported as a timeout, so firmware should not use them.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 FIRMWARE.elf" >&2
    exit 2
fi
elf=$1
shift
if [[ $# -gt 0 ]]; then
    echo "qemu-run.sh: ignoring extra arguments, because the firmware reads none: $*" >&2
fi

missing=0
if ! command -v qemu-system-arm >/dev/null; then
    echo "error: qemu-system-arm not found; install it with: apt-get install -y qemu-system-arm" >&2
    missing=1
fi
if ! command -v defmt-print >/dev/null; then
    echo "error: defmt-print not found; install it with: cargo install defmt-print --locked" >&2
    missing=1
fi
if [[ $missing -ne 0 ]]; then
    exit 127
fi

timeout_secs=${QEMU_TIMEOUT_SECS:-120}
if ! [[ $timeout_secs =~ ^[1-9][0-9]*$ ]]; then
    echo "error: invalid QEMU_TIMEOUT_SECS='$timeout_secs'; expected a positive whole number" \
        "of seconds" >&2
    exit 2
fi

# Semihosting writes the defmt frames to QEMU's stdout. Reading stdin from /dev/null keeps
# QEMU from switching the terminal to raw mode, which a killed QEMU would leave behind.
# --foreground keeps QEMU in the terminal's process group, so Ctrl-C reaches it.
set +e
timeout --foreground --kill-after=5 "$timeout_secs" \
    qemu-system-arm \
    -machine mps2-an386 \
    -cpu cortex-m4 \
    -nographic \
    -semihosting-config enable=on,target=native \
    -kernel "$elf" \
    </dev/null |
    defmt-print -e "$elf"
statuses=("${PIPESTATUS[@]}")
set -e
qemu_status=${statuses[0]}
print_status=${statuses[1]}

if [[ $qemu_status -eq 124 || $qemu_status -eq 137 ]]; then
    echo "error: timed out: QEMU was stopped after QEMU_TIMEOUT_SECS=$timeout_secs s because" \
        "the firmware did not exit" >&2
    exit 124
fi
if [[ $qemu_status -ne 0 ]]; then
    exit "$qemu_status"
fi
# QEMU exits 0 when a signal such as Ctrl-C stops it, so a failed defmt-print must not be hidden.
if [[ $print_status -gt 128 ]]; then
    echo "error: defmt-print was stopped by signal $((print_status - 128))" >&2
    exit "$print_status"
fi
if [[ $print_status -ne 0 ]]; then
    echo "error: defmt-print failed with status $print_status" >&2
    exit "$print_status"
fi
exit 0
