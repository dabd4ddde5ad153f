//! The command line as a user meets it: `--help`, and a one-line error naming the option for
//! every bad value, with a non-zero status and no VM started.

use tests::run_to_end;

fn rejects(args: &[&str], option: &str) {
    let (status, stderr) = run_to_end(args);
    assert!(!status.success(), "{args:?} was accepted");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.is_empty()).collect();
    assert!(
        lines.iter().any(|l| l.contains(option)),
        "{args:?}: stderr does not name {option}: {stderr}"
    );
}

#[test]
fn bad_values_are_rejected_naming_the_option() {
    let kernel = env!("TINY_GUEST_HELLO");
    rejects(&["--kernel", "/nonexistent/vmlinux"], "--kernel");
    rejects(&["--kernel", kernel, "--memory", "lots"], "--memory");
    rejects(&["--kernel", kernel, "--memory", "1M"], "--memory");
    rejects(&["--kernel", kernel, "--smp", "0"], "--smp");
    rejects(&["--kernel", kernel, "--smp", "many"], "--smp");
    rejects(&["--kernel", kernel, "--acpi", "maybe"], "--acpi");
    rejects(&["--kernel", kernel, "--serial", "bogus:thing"], "--serial");
    rejects(
        &["--kernel", kernel, "--initrd", "/nonexistent/initrd"],
        "--initrd",
    );
    rejects(&["--kernel", kernel, "--frobnicate"], "--frobnicate");
    rejects(&[], "--kernel");
}

#[test]
fn errors_are_one_line() {
    let (status, stderr) = run_to_end(&["--kernel", env!("TINY_GUEST_HELLO"), "--smp", "0"]);
    assert_eq!(status.code(), Some(2));
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        "minivmm: --smp: 0 vCPUs is out of range (1 to 254)"
    );
}

#[test]
fn help_explains_every_option() {
    let (status, _) = run_to_end(&["--help"]);
    assert!(status.success());
    let out = std::process::Command::new(tests::minivmm_bin())
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--kernel", "--initrd", "--append", "--memory", "--smp", "--serial", "--name", "--acpi",
    ] {
        assert!(help.contains(opt), "--help lacks {opt}:\n{help}");
    }
}
