#!/usr/bin/env bash
# Build the project's test kernel: Debian's linux-source-6.1 on top of tinyconfig, with the
# config fragment and the patches in this folder, as an uncompressed `vmlinux` booted through
# PVH (see resources/README.md for why each piece is there).
#
# The result is cached by (source package version, fragment, patches, this script) under
# $MINIVMM_CACHE (default ~/.cache/minivmm), so a rebuild happens only when one of them changes.
#
# usage: build-kernel.sh OUTDIR      -> OUTDIR/vmlinux (and OUTDIR/bzImage, OUTDIR/System.map)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build-kernel.sh OUTDIR}
cache=${MINIVMM_CACHE:-$HOME/.cache/minivmm}
mkdir -p "$out" "$cache"
out=$(cd "$out" && pwd)

need_pkgs=()
for tool in flex:flex bison:bison bc:bc make:make gcc:gcc xz:xz-utils perl:perl; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need_pkgs+=("${tool#*:}")
done
[ -e /usr/include/libelf.h ] || need_pkgs+=(libelf-dev)
[ -e /usr/include/openssl/ssl.h ] || need_pkgs+=(libssl-dev)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "build-kernel: installing ${need_pkgs[*]}" >&2
    apt-get update -qq && apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# The source package: the version the archive offers now (falls back to an already
# downloaded .deb in the cache when the package lists cannot be read).
version=$(apt-cache policy linux-source-6.1 2>/dev/null | awk '/Candidate:/ {print $2}')
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    apt-get update -qq >/dev/null 2>&1 || true
    version=$(apt-cache policy linux-source-6.1 2>/dev/null | awk '/Candidate:/ {print $2}')
fi
deb=$(ls "$cache"/linux-source-6.1_"${version}"_all.deb 2>/dev/null || true)
if [ -z "$deb" ]; then
    if [ -n "$version" ] && [ "$version" != "(none)" ]; then
        (cd "$cache" && apt-get download -qq "linux-source-6.1=$version")
        deb=$(ls "$cache"/linux-source-6.1_*_all.deb | tail -n 1)
    else
        deb=$(ls "$cache"/linux-source-6.1_*_all.deb 2>/dev/null | tail -n 1)
        [ -n "$deb" ] || { echo "build-kernel: linux-source-6.1 not available" >&2; exit 1; }
        version=$(basename "$deb" | sed 's/^linux-source-6.1_\(.*\)_all.deb$/\1/')
    fi
fi

# One build at a time per cache: a second `make guest` (say, `make run` while `make test` builds)
# waits for the first instead of deleting its source tree.
exec 9>"$cache/.build-lock"
flock 9

key=$( (echo "$version"; cat "$here/kernel.fragment" "$here"/[0-9]*.patch "$here/build-kernel.sh") \
       | sha256sum | cut -c1-16)
built="$cache/kernel-$key"
if [ ! -f "$built/vmlinux" ]; then
    echo "build-kernel: building linux-source $version (key $key); several minutes on 2 cores" >&2
    start=$(date +%s)
    src="$cache/src-$key"
    # Sources of interrupted builds are 1.3 GB each: keep none of them around.
    rm -rf "$cache"/src-* && mkdir -p "$src"
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$src" --wildcards '*/linux-source-6.1.tar.xz'
    tar -xJf "$src"/usr/src/linux-source-6.1.tar.xz -C "$src"
    tree="$src/linux-source-6.1"
    for p in "$here"/[0-9]*.patch; do
        patch -d "$tree" -p1 --quiet < "$p"
    done
    make -C "$tree" -s tinyconfig
    (cd "$tree" && scripts/kconfig/merge_config.sh -m .config "$here/kernel.fragment" >/dev/null)
    make -C "$tree" -s olddefconfig
    # Every line of the fragment must have survived olddefconfig: a silently dropped option is
    # a kernel that boots differently from the one the fragment describes.
    missing=0
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*) grep -qx "$line" "$tree/.config" || { echo "build-kernel: not in .config: $line" >&2; missing=1; } ;;
            "# CONFIG_"*" is not set") opt=${line#\# }; opt=${opt%% *}
                # selected by another option (PERF_EVENTS by x86 itself): say so, do not fail
                if grep -q "^$opt=" "$tree/.config"; then echo "build-kernel: note: $opt stays set (selected by another option)" >&2; fi ;;
        esac
    done < "$here/kernel.fragment"
    [ "$missing" = 0 ] || exit 1
    make -C "$tree" -s -j"$(nproc)" vmlinux bzImage KBUILD_BUILD_TIMESTAMP="2026-01-01 00:00:00 UTC" \
        KBUILD_BUILD_USER=minivmm KBUILD_BUILD_HOST=minivmm
    tmp="$built.tmp"
    rm -rf "$tmp" && mkdir -p "$tmp"
    cp "$tree/vmlinux" "$tree/System.map" "$tree/.config" "$tmp/"
    cp "$tree/arch/x86/boot/bzImage" "$tmp/"
    echo "$version" > "$tmp/source-version"
    echo "$(( $(date +%s) - start ))" > "$tmp/build-seconds"
    rm -rf "$built" && mv "$tmp" "$built"
    rm -rf "$src"
    echo "build-kernel: built in $(cat "$built/build-seconds") s" >&2
fi
for f in vmlinux bzImage System.map .config source-version build-seconds; do
    ln -sf "$built/$f" "$out/$f"
done
echo "$out/vmlinux"
