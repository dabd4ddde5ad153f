# Sourced by the bench scripts: install QEMU (Debian's qemu-system-x86) when it is missing.
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    echo "bench: installing qemu-system-x86" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >/dev/null
fi
