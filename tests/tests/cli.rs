//! The command line as a user meets it: `--help`, and a one-line error naming the option for
//! every bad value, with a non-zero status and no VM started; and what every run does first
//! (the open-file limit).

use std::os::unix::process::CommandExt;

use tests::run_to_end;

/// A soft open-file limit below the usual 1024, for minivmm to raise.
const LOW_SOFT_NOFILE: libc::rlim_t = 256;

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

/// minivmm raises a low soft open-file limit to the hard one before anything else (here
/// before `--version` is even parsed) and says so in its debug log.
#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for the call to fill; the result is checked.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    let hard = limit.rlim_max;
    assert!(hard > LOW_SOFT_NOFILE, "hard limit {hard} too low to test");
    let mut cmd = std::process::Command::new(tests::minivmm_bin());
    cmd.arg("--version")
        .env("RUST_LOG", "vmm=debug,minivmm=debug")
        .stdin(std::process::Stdio::null());
    // SAFETY: the closure runs in the forked child before exec and only calls setrlimit, which
    // is async-signal-safe, on a local value.
    unsafe {
        cmd.pre_exec(move || {
            let low = libc::rlimit {
                rlim_cur: LOW_SOFT_NOFILE,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &low) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("run minivmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let said = format!("open files: soft limit {LOW_SOFT_NOFILE} raised to {hard} (hard {hard})");
    assert!(stderr.contains(&said), "no {said:?} in: {stderr}");
}
