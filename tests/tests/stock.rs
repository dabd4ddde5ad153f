//! The stock Debian cloud kernel (a bzImage) with an initramfs carrying its virtio modules:
//! the path users on hardware KVM take with their own distro kernels.
//!
//! On a nested kvm_pvm host a stock kernel cannot reach userspace (its ring-0 code meets
//! instructions the host's emulator lacks; see resources/README.md). There the test proves
//! what can be proven: the bzImage loader, the 64-bit entry and boot_params bring the kernel
//! to its first console line. Elsewhere it boots to the shell, loads the virtio modules and
//! finds the virtio-console device through ACPI (`LNRO0005`): its named port appears as
//! `/dev/virtio-ports/NAME`.

use std::time::Duration;

use tests::{host_is_kvm_pvm, require_kvm, run64, workspace_root, Vmm, READY_MARKER};

/// The named port the stock kernel must find.
const PORT: &str = "org.minivmm.stock";

#[test]
fn stock_debian_kernel_boots_through_the_bzimage_path() {
    require_kvm();
    let dir = workspace_root().join("build/stock");
    let kernel = dir.join("bzImage");
    let initrd = dir.join("initramfs.cpio");
    assert!(
        kernel.exists() && initrd.exists(),
        "{} missing: run `make stock` (make test does)",
        dir.display()
    );
    let release = std::fs::read_to_string(dir.join("kernel-release")).unwrap();
    let release = release.trim();
    // On kvm_pvm: print from the first instant (earlyprintk), and keep the kernel away from
    // instructions the host's emulator lacks for as long as options can.
    let script = run64("lsmod; ls /dev/virtio-ports/\n");
    let cmdline = if host_is_kvm_pvm() {
        format!(
            "console=ttyS0 earlyprintk=ttyS0 reboot=k noxsave clearcpuid=smap,popcnt,cx16 {script}"
        )
    } else {
        format!("console=ttyS0 reboot=k {script}")
    };
    let port = format!("virtserialport,chardev=s0,name={PORT}");
    let mut vm = Vmm::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--append",
        &cmdline,
        "--memory",
        "512M",
        "--chardev",
        "null,id=s0",
        "--device",
        &port,
    ]);
    let banner = vm.wait_for("Linux version", Duration::from_secs(420));
    assert!(banner.contains(release), "{banner}");
    if host_is_kvm_pvm() {
        eprintln!(
            "kvm_pvm host: the stock kernel reached its first console line through the \
             bzImage path; userspace is out of reach on this KVM (resources/README.md)"
        );
        return;
    }
    vm.wait_for(READY_MARKER, Duration::from_secs(300));
    vm.wait_for("virtio_console", Duration::from_secs(60));
    vm.wait_for(PORT, Duration::from_secs(60));
    assert_eq!(vm.wait_exit(Duration::from_secs(60)).code(), Some(0));
}
