#!/usr/bin/env bash
# The stock kernel, for users on hardware KVM: Debian's cloud kernel (the image package that
# linux-image-cloud-amd64 depends on today) and an initramfs carrying the virtio modules it
# needs, resolved through modules.dep. It cannot reach userspace under kvm_pvm (see
# ../README.md); it is built so that the path stays right for everyone else.
#
# usage: build.sh OUTDIR   -> OUTDIR/bzImage, OUTDIR/initramfs.cpio, OUTDIR/kernel-release
# Extra HOST_FILE:GUEST_PATH arguments after OUTDIR go into the initramfs as with
# ../initramfs/build.sh. The .deb is cached under ${MINIVMM_CACHE:-$HOME/.cache/minivmm}.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUTDIR [HOST_FILE:GUEST_PATH ...]}
shift
cache=${MINIVMM_CACHE:-$HOME/.cache/minivmm}
mkdir -p "$out" "$cache"
out=$(cd "$out" && pwd)
modules="virtio virtio_ring virtio_mmio virtio_console"

image_pkg() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-.*-cloud-amd64(-unsigned)?$/ {print $2; exit}'
}
pkg=$(image_pkg)
if [ -z "$pkg" ]; then
    apt-get update -qq >/dev/null 2>&1 || true
    pkg=$(image_pkg)
fi
if [ -n "$pkg" ]; then
    version=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
    deb=$(ls "$cache/${pkg}_${version}_amd64.deb" 2>/dev/null || true)
    if [ -z "$deb" ]; then
        echo "stock: downloading $pkg $version" >&2
        # apt's download sandbox user may not write into $cache: fetch in a temp dir it owns
        dl=$(mktemp -d) && chmod 777 "$dl"
        (cd "$dl" && apt-get download -qq "$pkg=$version") && mv "$dl"/*.deb "$cache/"
        rmdir "$dl"
        deb=$(ls "$cache/${pkg}_${version}"_amd64.deb)
    fi
else
    # no package lists: use the newest image already in the cache
    deb=$(ls "$cache"/linux-image-*-cloud-amd64*_amd64.deb 2>/dev/null | sort -V | tail -n 1)
    [ -n "$deb" ] || { echo "stock: linux-image-cloud-amd64 not available" >&2; exit 1; }
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$deb" "$work/root"
vmlinuz=$(ls "$work"/root/boot/vmlinuz-* | head -n 1)
release=${vmlinuz##*/vmlinuz-}
moddir="$work/root/lib/modules/$release"
# the package leaves modules.dep to depmod at install time: run it on the unpacked tree
if ! command -v depmod >/dev/null 2>&1 && [ ! -x /sbin/depmod ]; then
    echo "stock: installing kmod (depmod)" >&2
    apt-get install -y -qq kmod >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq kmod >/dev/null; }
fi
PATH=$PATH:/sbin:/usr/sbin depmod -b "$work/root" "$release"
[ -f "$moddir/modules.dep" ] || { echo "stock: depmod wrote no modules.dep for $release" >&2; exit 1; }

# Resolve the modules and their dependencies, dependencies first. A module built into the
# kernel (modules.builtin) needs nothing.
python3 - "$moddir" $modules > "$work/load-list" <<'PY'
import sys, os
moddir, wanted = sys.argv[1], sys.argv[2:]
dep = {}
for line in open(os.path.join(moddir, "modules.dep")):
    mod, _, deps = line.partition(":")
    dep[mod.strip()] = deps.split()
def name(path):
    base = os.path.basename(path)
    return base.split(".ko")[0].replace("-", "_")
by_name = {name(p): p for p in dep}
builtin = set()
bpath = os.path.join(moddir, "modules.builtin")
if os.path.exists(bpath):
    builtin = {name(l.strip()) for l in open(bpath) if l.strip()}
order, seen = [], set()
def visit(path):
    if path in seen:
        return
    seen.add(path)
    # modprobe loads a module's dependency list from its end
    for d in reversed(dep.get(path, [])):
        visit(d)
    order.append(path)
for w in wanted:
    n = w.replace("-", "_")
    if n in by_name:
        visit(by_name[n])
    elif n in builtin:
        print(f"stock: {w} is built into the kernel", file=sys.stderr)
    else:
        sys.exit(f"stock: module {w} not found in modules.dep or modules.builtin")
print("\n".join(order))
PY

mkdir -p "$work/mods"
: > "$work/mods/load-order"
extras=()
while IFS= read -r rel; do
    [ -n "$rel" ] || continue
    src="$moddir/$rel"
    base=$(basename "$rel")
    case "$base" in
        *.ko) cp "$src" "$work/mods/$base" ;;
        *.ko.xz) base=${base%.xz}; xz -dc "$src" > "$work/mods/$base" ;;
        *.ko.zst) base=${base%.zst}; zstd -qdc "$src" > "$work/mods/$base" ;;
        *.ko.gz) base=${base%.gz}; gzip -dc "$src" > "$work/mods/$base" ;;
        *) echo "stock: unknown module format $base" >&2; exit 1 ;;
    esac
    echo "$base" >> "$work/mods/load-order"
    extras+=("$work/mods/$base:/lib/modules/$base")
done < "$work/load-list"
extras+=("$work/mods/load-order:/lib/modules/load-order")

cp "$vmlinuz" "$out/bzImage.tmp" && mv "$out/bzImage.tmp" "$out/bzImage"
echo "$release" > "$out/kernel-release"
"$here/../initramfs/build.sh" "$out/initramfs.cpio" "${extras[@]}" "$@" >/dev/null
echo "stock: $release, modules: $(tr '\n' ' ' < "$work/mods/load-order")" >&2
echo "$out/bzImage"
