#!/usr/bin/env bash
# Runs the learning firmware on the QEMU mps2-an386 machine for a manual session: UART0 listens
# on 127.0.0.1:${FIXEDPC_LINK_PORT:-4321}, and the defmt log is decoded to this terminal. From
# another terminal, run: pcsim board learn --port tcp:127.0.0.1:4321. Stop QEMU with Ctrl-C.
#
# Usage: qemu-run.sh FIRMWARE.elf   (cargo calls this as the runner of `cargo run`)
#
# `pcsim board learn` without --port does not use this script: it starts QEMU itself, with
# UART0 on a loopback TCP socket of its own.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 FIRMWARE.elf" >&2
    exit 2
fi
elf=$1
port=${FIXEDPC_LINK_PORT:-4321}
if ! [[ $port =~ ^[1-9][0-9]*$ ]] || ((port > 65535)); then
    echo "error: invalid FIXEDPC_LINK_PORT='$port'; expected a TCP port from 1 to 65535" >&2
    exit 2
fi

for tool in qemu-system-arm defmt-print; do
    if ! command -v "$tool" >/dev/null; then
        echo "error: $tool not found; run scripts/setup from the repository root" >&2
        exit 127
    fi
done

echo "UART0 listens on 127.0.0.1:$port; run: pcsim board learn --port tcp:127.0.0.1:$port" >&2
# Semihosting writes the defmt frames to QEMU's stdout. Reading stdin from /dev/null keeps
# QEMU from switching the terminal to raw mode.
qemu-system-arm \
    -machine mps2-an386 \
    -cpu cortex-m4 \
    -nographic \
    -monitor none \
    -icount shift=0 \
    -semihosting-config enable=on,target=native \
    -chardev "socket,id=link,host=127.0.0.1,port=$port,server=on,wait=off,nodelay=on" \
    -serial chardev:link \
    -kernel "$elf" \
    </dev/null |
    defmt-print -e "$elf"
