#!/usr/bin/env bash
# Build the guest initramfs: an uncompressed newc cpio with Debian's busybox-static, /init and
# a few files from this folder, plus extra host files. Deterministic: equal inputs give
# identical bytes (mtime $SOURCE_DATE_EPOCH or 0, uid/gid 0, sorted entries).
#
# usage: build.sh OUT.cpio [HOST_FILE:GUEST_PATH ...]
#   e.g. build.sh build/guest/initramfs.cpio target/x86_64-unknown-linux-gnu/release/minivmm-vp:/bin/minivmm-vp
# An extra file keeps its executable bit (0755, else 0644); missing parent dirs are created.
# VP=PATH (the Makefile passes the static minivmm-vp it builds) adds PATH as /bin/minivmm-vp.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUT.cpio [HOST_FILE:GUEST_PATH ...]}
shift
if [ -n "${VP:-}" ]; then
    [ -f "$VP" ] || { echo "initramfs: VP=$VP: no such file" >&2; exit 1; }
    # A dynamic executable names its loader (PT_INTERP); a static or static-pie one does not.
    if LC_ALL=C readelf -l "$VP" | grep -q "program interpreter"; then
        echo "initramfs: $VP is not statically linked (build it with make vp)" >&2
        exit 1
    fi
    set -- "$@" "$VP:/bin/minivmm-vp"
fi

busybox=${BUSYBOX:-/bin/busybox}
if ! "$busybox" --list 2>/dev/null | grep -x cttyhack >/dev/null; then
    echo "initramfs: installing busybox-static" >&2
    apt-get update -qq && apt-get install -y -qq busybox-static >/dev/null
    busybox=/bin/busybox
fi
if ldd "$busybox" >/dev/null 2>&1; then
    echo "initramfs: $busybox is not statically linked (install busybox-static)" >&2
    exit 1
fi

# Links for what /init, /etc/shrc and test scripts run by name. Inside busybox sh every applet
# works without a link (the shell runs its own applets); the links are for exec() from other
# programs (minivmm-vp, #! lines) and for the ones named here.
applets="sh ash cat echo ls mkdir ln rm mount umount insmod modprobe poweroff reboot halt
    setsid cttyhack sleep stty dmesg ps kill ip ifconfig base64 env uname grep sed head tail
    wc dd md5sum od hexdump printf test true false sync"

have=" $("$busybox" --list | tr '\n' ' ') "
manifest=$(mktemp)
trap 'rm -f "$manifest"' EXIT
{
    echo "dir bin 0755"
    echo "file bin/busybox 0755 $busybox"
    for a in $applets; do
        case "$have" in *" $a "*) ;; *) echo "initramfs: busybox lacks $a" >&2; exit 1 ;; esac
        echo "slink bin/$a busybox"
    done
    echo "slink sbin bin"
    echo "dir usr 0755"
    echo "slink usr/bin ../bin"
    echo "slink usr/sbin ../bin"
    echo "file init 0755 $here/init"
    echo "file etc/fstab 0644 $here/fstab"
    echo "file etc/shrc 0644 $here/shrc"
    echo "file etc/hosts 0644 $here/hosts"
    echo "file etc/passwd 0644 $here/passwd"
    echo "file etc/group 0644 $here/group"
    # the kernel opens /dev/console for /init's stdio before anything is mounted
    echo "dir dev 0755"
    echo "nod dev/console 0600 c 5 1"
    for d in proc sys run root; do echo "dir $d 0755"; done
    echo "dir tmp 1777"
    for extra in "$@"; do
        src=${extra%%:*}
        dst=${extra#*:}
        if [ "$src" = "$extra" ] || [ -z "$src" ] || [ -z "$dst" ]; then
            echo "initramfs: extra file must be HOST_FILE:GUEST_PATH, got '$extra'" >&2; exit 1
        fi
        [ -f "$src" ] || { echo "initramfs: no such file: $src" >&2; exit 1; }
        case "$dst" in *" "*) echo "initramfs: spaces in '$dst'" >&2; exit 1 ;; esac
        src=$(cd "$(dirname "$src")" && pwd)/$(basename "$src")
        if [ -x "$src" ]; then mode=0755; else mode=0644; fi
        echo "file ${dst#/} $mode $src"
    done
} > "$manifest"

mkdir -p "$(dirname "$out")"
python3 "$here/mkcpio.py" "$out" < "$manifest"
echo "$out"
