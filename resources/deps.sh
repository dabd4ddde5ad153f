#!/usr/bin/env bash
# Install the Debian packages minivmm's build, guest images and tests need, when missing.
# Idempotent and quiet when everything is there.
set -euo pipefail
pkgs=()
need() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed" || pkgs+=("$1"); }
# python3-venv: `make pyenv` (qemu.qmp for the QMP tests) builds a venv. acpica-tools: iasl, which
# checks the ACPI tables in the vmm unit tests. strace: `make bench` counts the event loop's syscalls.
for p in flex bison bc libelf-dev libssl-dev busybox-static cpio xz-utils make gcc binutils python3 python3-venv acpica-tools strace; do
    need "$p"
done
if [ ${#pkgs[@]} -gt 0 ]; then
    echo "deps: installing ${pkgs[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi
