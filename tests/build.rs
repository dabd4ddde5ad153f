//! Assembles the tiny guest programs in `guests/*.S` into PVH-bootable ELF files in OUT_DIR.
//!
//! Each `guests/NAME.S` becomes `$OUT_DIR/guests/NAME.elf`, exported to the tests as the
//! compile-time variable `TINY_GUEST_<NAME>` (upper case), e.g. `env!("TINY_GUEST_HELLO")`.
//! The code is 32-bit (`.code32`) in an ELF64 container, because linux-loader's ELF loader
//! reads ELF64 only; `guests/guest.ld` puts it at 1 MiB with the PVH note in a PT_NOTE.
//! Tools: GNU `as` and `ld` (binutils), present wherever gcc is.
//!
//! This must not do anything else: no network, nothing outside OUT_DIR.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e} (install binutils)", cmd.get_program()));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let src_dir = manifest.join("guests");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("guests");
    fs::create_dir_all(&out_dir).expect("create OUT_DIR/guests");
    let as_bin = env::var("TINY_GUEST_AS").unwrap_or_else(|_| "as".into());
    let ld_bin = env::var("TINY_GUEST_LD").unwrap_or_else(|_| "ld".into());
    println!("cargo:rerun-if-env-changed=TINY_GUEST_AS");
    println!("cargo:rerun-if-env-changed=TINY_GUEST_LD");
    println!("cargo:rerun-if-changed={}", src_dir.display());

    let script = src_dir.join("guest.ld");
    let mut sources: Vec<PathBuf> = Vec::new();
    for entry in fs::read_dir(&src_dir).expect("read tests/guests") {
        let path = entry.expect("read tests/guests entry").path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("S") => sources.push(path.clone()),
            Some("inc") | Some("ld") => {}
            _ => continue,
        }
        println!("cargo:rerun-if-changed={}", path.display());
    }
    sources.sort();

    for src in &sources {
        let name = src
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("guest file name");
        let obj = out_dir.join(format!("{name}.o"));
        let elf = out_dir.join(format!("{name}.elf"));
        run(Command::new(&as_bin)
            .arg("--64")
            .arg("-I")
            .arg(&src_dir)
            .arg("-o")
            .arg(&obj)
            .arg(src));
        run(Command::new(&ld_bin)
            .args(["-m", "elf_x86_64", "-nostdlib", "-n", "--build-id=none"])
            .args(["-z", "noexecstack"])
            .arg("-T")
            .arg(&script)
            .arg("-o")
            .arg(&elf)
            .arg(&obj));
        check_pvh_note(&elf);
        let var = format!("TINY_GUEST_{}", name.to_uppercase().replace('-', "_"));
        println!("cargo:rustc-env={var}={}", elf.display());
    }
}

/// Fails the build unless the ELF has a PT_NOTE holding the Xen PHYS32_ENTRY note: a program
/// without it would boot as nothing at all.
fn check_pvh_note(elf: &Path) {
    const PT_NOTE: u32 = 4;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    let data = fs::read(elf).expect("read assembled guest");
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap()) as usize;
    assert_eq!(&data[..5], b"\x7fELF\x02", "{}: not ELF64", elf.display());
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(ph) != PT_NOTE {
            continue;
        }
        let (mut off, end) = (u64_at(ph + 8), u64_at(ph + 8) + u64_at(ph + 32));
        while off + 12 <= end {
            let (namesz, descsz, typ) = (u32_at(off), u32_at(off + 4), u32_at(off + 8));
            let name = &data[off + 12..off + 12 + namesz as usize];
            if name == b"Xen\0" && typ == XEN_ELFNOTE_PHYS32_ENTRY && descsz >= 4 {
                return;
            }
            off += 12 + (namesz as usize).div_ceil(4) * 4 + (descsz as usize).div_ceil(4) * 4;
        }
    }
    panic!("{}: no PVH entry note", elf.display());
}
