#!/usr/bin/env python3
"""Write a deterministic, uncompressed newc cpio archive from a manifest.

Manifest lines (read from stdin), one entry each, fields separated by single spaces:
    dir  PATH MODE
    file PATH MODE SOURCE        (contents copied from SOURCE on the host)
    slink PATH TARGET
    nod  PATH MODE c|b MAJOR MINOR
MODE is octal permission bits. Parents of every path are created (0755) when not listed.
Entries are written sorted by path components, with uid/gid 0, mtime $SOURCE_DATE_EPOCH
(default 0) and inode numbers in that order, so equal inputs give identical bytes.
No host privileges are needed for device nodes.
"""
import os
import stat
import sys


def header(ino, mode, nlink, mtime, size, rmaj, rmin, name):
    namez = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, nlink, mtime, size, 0, 0, rmaj, rmin, len(namez), 0]
    h = b"070701" + b"".join(b"%08X" % f for f in fields) + namez
    return h + b"\0" * (-len(h) % 4)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: mkcpio.py OUT.cpio < manifest")
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    entries = {}
    for lineno, line in enumerate(sys.stdin, 1):
        line = line.rstrip("\n")
        if not line or line.startswith("#"):
            continue
        f = line.split(" ")
        kind, path = f[0], f[1].strip("/")
        if not path or ".." in path.split("/"):
            sys.exit(f"mkcpio: line {lineno}: bad path {f[1]!r}")
        if kind == "dir" and len(f) == 3:
            ent = (stat.S_IFDIR | int(f[2], 8), None, 0, 0)
        elif kind == "file" and len(f) == 4:
            with open(f[3], "rb") as src:
                ent = (stat.S_IFREG | int(f[2], 8), src.read(), 0, 0)
        elif kind == "slink" and len(f) == 3:
            ent = (stat.S_IFLNK | 0o777, f[2].encode(), 0, 0)
        elif kind == "nod" and len(f) == 6 and f[3] in ("c", "b"):
            typ = stat.S_IFCHR if f[3] == "c" else stat.S_IFBLK
            ent = (typ | int(f[2], 8), None, int(f[4]), int(f[5]))
        else:
            sys.exit(f"mkcpio: line {lineno}: cannot parse {line!r}")
        if path in entries and entries[path] != ent:
            sys.exit(f"mkcpio: {path} given twice with different contents")
        entries[path] = ent
    for path in list(entries):
        parts = path.split("/")
        for i in range(1, len(parts)):
            entries.setdefault("/".join(parts[:i]), (stat.S_IFDIR | 0o755, None, 0, 0))
    out = bytearray()
    for ino, path in enumerate(sorted(entries, key=lambda p: p.split("/")), 1):
        mode, data, rmaj, rmin = entries[path]
        data = data or b""
        nlink = 2 if stat.S_ISDIR(mode) else 1
        out += header(ino, mode, nlink, mtime, len(data), rmaj, rmin, path)
        out += data + b"\0" * (-len(data) % 4)
    out += header(0, 0, 1, 0, 0, 0, 0, "TRAILER!!!")
    tmp = sys.argv[1] + ".tmp"
    with open(tmp, "wb") as f:
        f.write(out)
    os.replace(tmp, sys.argv[1])


if __name__ == "__main__":
    main()
