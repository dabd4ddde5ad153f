//! Fuzz target `chardev_spec`: arbitrary text as the option strings of the command line and
//! the monitor, through the real parsers:
//!
//! - `--chardev` ([`ChardevSpec::parse`], the `vproxy` kind registered as the VMM does);
//! - `--serial` ([`chardev::parse_serial`]);
//! - `--device` and HMP/QMP `device_add` (monitor's [`DeviceSpec::parse`] and
//!   [`DeviceProps`], and the VMM's `--device` parser with its `isa-serial` and
//!   `virtio-serial` models, [`vmm::device_spec::DeviceSpec::parse`]);
//! - `--mon` ([`vmm::cli::MonSpec::parse`]) and vproxy's `oforward=`/`iforward=` values.
//!
//! Non-UTF-8 input is taken lossily (the command line hands minivmm UTF-8). Nothing may
//! panic, and what parses prints back in canonical form that parses to the same value, where
//! the type has a printed form: a chardev spec (`Display`), a port (`DeviceSpec::render`), a
//! forward (`Display`). The canonical form is a fixed point: printing the re-parsed value gives
//! the same text.

use std::sync::Once;

use chardev::{parse_serial, ChardevSpec, SerialArg};
use monitor::device_spec::{DeviceProps, DeviceSpec};
use vproxy::forward::{parse_iforward, parse_oforward};

/// The chardev id `--serial` gives its chardev (the VMM's `serial0`, `serial1`, ...).
const SERIAL_ID: &str = "serial0";

/// `spec` prints in a form that parses back to it, and that form is canonical.
fn check_chardev_round_trip(spec: &ChardevSpec, from: &str) {
    let text = spec.to_string();
    let again = ChardevSpec::parse(&text)
        .unwrap_or_else(|e| panic!("{from:?} parsed, its canonical form {text:?} does not: {e}"));
    assert_eq!(&again, spec, "{from:?} -> {text:?} parses to another spec");
    assert_eq!(
        again.to_string(),
        text,
        "canonical form of {from:?} is not a fixed point"
    );
}

fn chardev(s: &str) {
    if let Ok(spec) = ChardevSpec::parse(s) {
        check_chardev_round_trip(&spec, s);
        let _ = spec.mux_base_id();
        let _ = vproxy::spec::of(&spec);
    }
}

fn serial(s: &str) {
    match parse_serial(s, SERIAL_ID) {
        Ok(SerialArg::Spec(spec)) => {
            assert_eq!(
                spec.id, SERIAL_ID,
                "--serial {s:?} named its chardev otherwise"
            );
            check_chardev_round_trip(&spec, s);
        }
        Ok(SerialArg::Chardev(id)) => {
            assert!(
                chardev::spec::is_valid_id(&id),
                "--serial {s:?} took bad id {id:?}"
            );
        }
        Ok(SerialArg::None) | Err(_) => {}
    }
}

fn device(s: &str) {
    if let Ok(port) = DeviceSpec::parse(s) {
        let text = port.render();
        assert_eq!(
            DeviceSpec::parse(&text).as_ref(),
            Ok(&port),
            "--device {s:?} parsed, its rendering {text:?} does not parse back to it"
        );
        let _ = port.bus_device();
    }
    if let Ok(mut props) = DeviceProps::parse(s) {
        assert!(!props.driver().is_empty(), "{s:?}: empty driver accepted");
        // The typed getters on whatever the input named, as the models call them.
        let _ = props.take_number::<u32>("nr", |_| true);
        let _ = props.take_number::<u16>("iobase", |_| true);
        let _ = props.take_number::<u32>("irq", |n| *n < 16);
        let _ = props.take_bool("pacing");
        let _ = props.take_id("chardev");
        let _ = props.take("name");
        let _ = props.finish();
    }
    let _ = vmm::device_spec::DeviceSpec::parse(s);
}

fn forwards(s: &str) {
    for (which, parse) in [
        ("oforward", parse_oforward as fn(&str) -> _),
        ("iforward", parse_iforward),
    ] {
        if let Ok(f) = parse(s) {
            let text = f.to_string();
            let again = parse(&text).unwrap_or_else(|e| {
                panic!("{which} {s:?} parsed, its printed form {text:?} does not: {e}")
            });
            assert_eq!(
                again, f,
                "{which} {s:?} -> {text:?} parses to another forward"
            );
        }
    }
}

/// Runs one input (see the module docs).
pub fn chardev_spec(data: &[u8]) {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(vproxy::register);
    let text = String::from_utf8_lossy(data);
    let s = text.as_ref();
    chardev(s);
    serial(s);
    device(s);
    forwards(s);
    let _ = vmm::cli::MonSpec::parse(s);
}
