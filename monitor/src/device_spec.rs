//! Device options in QEMU's syntax, parsed once for every path that names a device: the
//! command line's `--device DRIVER,key=value,...` (through `vmm::device_spec`), HMP
//! `device_add` (the same string) and QMP `device_add` (JSON properties, flattened to strings).
//!
//! [`DeviceProps`] is the option syntax (`,,` a literal comma, `driver=X` in place of the
//! leading name, a bare `key` meaning `key=on`, a property given twice refused) with typed
//! access to the values and QEMU's error wording. [`DeviceSpec`] is the port models
//! (`virtserialport`, `virtconsole`), the devices that cross the [`crate::Machine`]
//! boundary; the models only the command line has (`isa-serial`, `virtio-serial`) are parsed
//! in the VMM on the same [`DeviceProps`]. Parsing and static checks only: whether a chardev
//! exists, a bus is there or a port name suits the device is for the machine to say.

use std::collections::BTreeMap;

use chardev::spec::{is_valid_id, split_options};
use thiserror::Error;

/// A bad device specification, in QEMU's words.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DeviceSpecError {
    /// No driver given.
    #[error("Parameter 'driver' is missing")]
    MissingDriver,
    /// Not a model this path has.
    #[error("'{0}' is not a valid device model name")]
    UnknownDriver(String),
    /// A property the model does not have.
    #[error("Property '{driver}.{property}' not found")]
    UnknownProperty {
        /// The model.
        driver: String,
        /// The property.
        property: String,
    },
    /// A property given twice.
    #[error("Property '{driver}.{property}' given twice")]
    Duplicate {
        /// The model.
        driver: String,
        /// The property.
        property: String,
    },
    /// A value of the wrong shape.
    #[error("Property '{driver}.{property}' doesn't take value '{value}'")]
    BadValue {
        /// The model.
        driver: String,
        /// The property.
        property: String,
        /// The value given.
        value: String,
    },
    /// A property the model needs is missing.
    #[error("Parameter '{property}' is missing")]
    Missing {
        /// The model.
        driver: String,
        /// The property.
        property: String,
    },
}

/// What a bare `key` stands for: `key=on`.
const BARE_KEY_VALUE: &str = "on";
/// The property that may name the model in place of the leading name.
const DRIVER_KEY: &str = "driver";

/// A device's model name and its `key=value` properties, taken out one by one by the model's
/// parser; [`DeviceProps::finish`] refuses what no model took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceProps {
    driver: String,
    props: BTreeMap<String, String>,
}

impl DeviceProps {
    /// The model `driver` with `props` as given (QMP `device_add`).
    pub fn new(driver: &str, props: BTreeMap<String, String>) -> Self {
        DeviceProps {
            driver: driver.to_string(),
            props,
        }
    }

    /// Parse `DRIVER,key=value,...` (the command line's `--device`, HMP `device_add`).
    pub fn parse(s: &str) -> Result<Self, DeviceSpecError> {
        let mut driver: Option<String> = None;
        let mut props = BTreeMap::new();
        for (n, part) in split_options(s).into_iter().enumerate() {
            let (key, value) = match part.split_once('=') {
                None if n == 0 => {
                    driver = Some(part);
                    continue;
                }
                Some((DRIVER_KEY, v)) if driver.is_none() => {
                    driver = Some(v.to_string());
                    continue;
                }
                None => (part, BARE_KEY_VALUE.to_string()),
                Some((k, v)) => (k.to_string(), v.to_string()),
            };
            if props.contains_key(&key) {
                return Err(DeviceSpecError::Duplicate {
                    driver: driver.unwrap_or_default(),
                    property: key,
                });
            }
            props.insert(key, value);
        }
        let driver = driver
            .filter(|d| !d.is_empty())
            .ok_or(DeviceSpecError::MissingDriver)?;
        Ok(DeviceProps { driver, props })
    }

    /// The model name as given.
    pub fn driver(&self) -> &str {
        &self.driver
    }

    /// Take `key` out as it was written.
    pub fn take(&mut self, key: &str) -> Option<String> {
        self.props.remove(key)
    }

    /// Take `key` out as an id (a letter, then letters, digits, `-`, `.`, `_`).
    pub fn take_id(&mut self, key: &str) -> Result<Option<String>, DeviceSpecError> {
        self.take_parsed(key, |v| is_valid_id(v).then(|| v.to_string()))
    }

    /// Take `key` out as `on`/`yes`/`true` or `off`/`no`/`false`.
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, DeviceSpecError> {
        self.take_parsed(key, |v| match v {
            "on" | "yes" | "true" => Some(true),
            "off" | "no" | "false" => Some(false),
            _ => None,
        })
    }

    /// Take `key` out as a decimal or `0x` hexadecimal number that fits `T` and that `accept`
    /// takes.
    pub fn take_number<T: TryFrom<u64>>(
        &mut self,
        key: &str,
        accept: impl Fn(&T) -> bool,
    ) -> Result<Option<T>, DeviceSpecError> {
        self.take_parsed(key, |v| {
            parse_number(v)
                .and_then(|n| T::try_from(n).ok())
                .filter(|n| accept(n))
        })
    }

    fn take_parsed<T>(
        &mut self,
        key: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, DeviceSpecError> {
        match self.props.remove(key) {
            None => Ok(None),
            Some(v) => parse(&v).map(Some).ok_or_else(|| self.bad(key, &v)),
        }
    }

    /// `value` does not suit `key` (for a model's own checks).
    pub fn bad(&self, key: &str, value: &str) -> DeviceSpecError {
        DeviceSpecError::BadValue {
            driver: self.driver.clone(),
            property: key.to_string(),
            value: value.to_string(),
        }
    }

    /// `key` is required and was not given.
    pub fn missing(&self, key: &str) -> DeviceSpecError {
        DeviceSpecError::Missing {
            driver: self.driver.clone(),
            property: key.to_string(),
        }
    }

    /// The model has taken what it knows: a property left over is not one of its own.
    pub fn finish(self) -> Result<(), DeviceSpecError> {
        match self.props.into_keys().next() {
            None => Ok(()),
            Some(property) => Err(DeviceSpecError::UnknownProperty {
                driver: self.driver,
                property,
            }),
        }
    }
}

/// A decimal number, or a hexadecimal one after `0x`.
fn parse_number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// The port models: the devices `device_add` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceDriver {
    /// A virtio-serial port (`/dev/virtio-ports/NAME` in the guest).
    VirtSerialPort,
    /// A virtio console port (`/dev/hvcN` in the guest).
    VirtConsole,
}

impl DeviceDriver {
    /// The QEMU driver name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceDriver::VirtSerialPort => "virtserialport",
            DeviceDriver::VirtConsole => "virtconsole",
        }
    }

    /// Parse a driver name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "virtserialport" => Some(DeviceDriver::VirtSerialPort),
            "virtconsole" => Some(DeviceDriver::VirtConsole),
            _ => None,
        }
    }
}

/// A port: `virtserialport,id=p1,name=org.x.1,chardev=c1[,bus=vser0.0][,nr=2]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// The model.
    pub driver: DeviceDriver,
    /// Device id (`device_del` needs one).
    pub id: Option<String>,
    /// The virtio-serial bus as written (`vser0.0`, or the device id `vser0`); `None` lets
    /// the machine choose.
    pub bus: Option<String>,
    /// The port name the guest sees.
    pub name: Option<String>,
    /// The chardev the port is connected to.
    pub chardev: Option<String>,
    /// The port number on the bus; `None` lets the machine choose.
    pub nr: Option<u32>,
}

impl DeviceSpec {
    /// The port `props` describe.
    pub fn from_device_props(mut props: DeviceProps) -> Result<Self, DeviceSpecError> {
        let driver = DeviceDriver::parse(props.driver())
            .ok_or_else(|| DeviceSpecError::UnknownDriver(props.driver().to_string()))?;
        let spec = DeviceSpec {
            driver,
            id: props.take_id("id")?,
            bus: props.take_id("bus")?,
            name: props.take("name"),
            chardev: props.take_id("chardev")?,
            nr: props.take_number("nr", |_: &u32| true)?,
        };
        props.finish()?;
        Ok(spec)
    }

    /// The port a driver and its string properties describe (QMP `device_add`).
    pub fn from_props(
        driver: &str,
        props: &BTreeMap<String, String>,
    ) -> Result<Self, DeviceSpecError> {
        DeviceSpec::from_device_props(DeviceProps::new(driver, props.clone()))
    }

    /// Parse `DRIVER,key=value,...` (HMP `device_add`).
    pub fn parse(s: &str) -> Result<Self, DeviceSpecError> {
        DeviceSpec::from_device_props(DeviceProps::parse(s)?)
    }

    /// The device the bus belongs to: `vser0` for `vser0.0`.
    pub fn bus_device(&self) -> Option<&str> {
        self.bus
            .as_deref()
            .map(|b| b.split_once('.').map_or(b, |(device, _)| device))
    }

    /// The spec in QEMU's syntax, which [`DeviceSpec::parse`] reads back to the same value.
    pub fn render(&self) -> String {
        let mut out = self.driver.as_str().to_string();
        let nr = self.nr.map(|n| n.to_string());
        for (key, value) in [
            ("id", &self.id),
            ("bus", &self.bus),
            ("name", &self.name),
            ("chardev", &self.chardev),
            ("nr", &nr),
        ] {
            if let Some(value) = value {
                out.push_str(&format!(",{key}={}", value.replace(',', ",,")));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn device_spec_parses_qemu_syntax() {
        let d = DeviceSpec::parse("virtserialport,id=p1,name=org.x,,y,chardev=c1,nr=2").unwrap();
        assert_eq!(
            d,
            DeviceSpec {
                driver: DeviceDriver::VirtSerialPort,
                id: Some("p1".into()),
                bus: None,
                name: Some("org.x,y".into()),
                chardev: Some("c1".into()),
                nr: Some(2),
            }
        );
        assert_eq!(
            DeviceSpec::parse("driver=virtconsole,id=c").unwrap().driver,
            DeviceDriver::VirtConsole
        );
        let d = DeviceSpec::parse("virtconsole,bus=vser1.0,nr=0x10").unwrap();
        assert_eq!((d.bus_device(), d.nr), (Some("vser1"), Some(16)));
        let e = |s: &str| DeviceSpec::parse(s).unwrap_err().to_string();
        assert_eq!(e("e1000,id=n"), "'e1000' is not a valid device model name");
        assert_eq!(
            e("virtserialport,foo=1"),
            "Property 'virtserialport.foo' not found"
        );
        assert_eq!(
            e("virtserialport,foo"),
            "Property 'virtserialport.foo' not found"
        );
        assert_eq!(
            e("virtserialport,nr=x"),
            "Property 'virtserialport.nr' doesn't take value 'x'"
        );
        assert_eq!(
            e("virtserialport,id=a,id=b"),
            "Property 'virtserialport.id' given twice"
        );
        assert!(DeviceSpec::parse("virtserialport,id=1bad").is_err());
        assert!(DeviceSpec::parse("virtserialport,nr=4294967296").is_err());
        assert_eq!(e(""), "Parameter 'driver' is missing");
        assert_eq!(e("id=p1"), "Parameter 'driver' is missing");
    }

    #[test]
    fn json_properties_go_through_the_same_parser() {
        let props: BTreeMap<String, String> = [("id", "p1"), ("chardev", "c1"), ("nr", "3")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let d = DeviceSpec::from_props("virtconsole", &props).unwrap();
        assert_eq!(
            d,
            DeviceSpec::parse("virtconsole,id=p1,chardev=c1,nr=3").unwrap()
        );
        assert_eq!(
            DeviceSpec::from_props(
                "virtconsole",
                &[("speed".to_string(), "1".to_string())].into()
            )
            .unwrap_err()
            .to_string(),
            "Property 'virtconsole.speed' not found"
        );
    }

    #[test]
    fn typed_values_and_leftovers() {
        let mut p = DeviceProps::parse("isa-serial,pacing,irq=0x4,big=70000,x=maybe").unwrap();
        assert_eq!(p.driver(), "isa-serial");
        assert_eq!(p.take_bool("pacing"), Ok(Some(true)));
        assert_eq!(p.take_number::<u32>("irq", |n| *n < 16), Ok(Some(4)));
        assert_eq!(p.take_number::<u32>("irq", |_| true), Ok(None));
        assert!(p.take_number::<u16>("big", |_| true).is_err());
        assert!(p.take_bool("x").is_err());
        assert_eq!(p.clone().finish(), Ok(()));
        assert_eq!(
            p.missing("chardev").to_string(),
            "Parameter 'chardev' is missing"
        );
    }

    fn id() -> impl Strategy<Value = String> {
        "[a-zA-Z][a-zA-Z0-9._-]{0,15}"
    }

    fn port_spec() -> impl Strategy<Value = DeviceSpec> {
        (
            prop_oneof![
                Just(DeviceDriver::VirtSerialPort),
                Just(DeviceDriver::VirtConsole)
            ],
            proptest::option::of(id()),
            proptest::option::of(id()),
            // Anything but a NUL, commas and `=` included.
            proptest::option::of("[^\u{0}]{0,24}"),
            proptest::option::of(id()),
            proptest::option::of(any::<u32>()),
        )
            .prop_map(|(driver, id, bus, name, chardev, nr)| DeviceSpec {
                driver,
                id,
                bus,
                name,
                chardev,
                nr,
            })
    }

    proptest! {
        #[test]
        fn a_valid_spec_renders_and_parses_back(spec in port_spec()) {
            let text = spec.render();
            prop_assert_eq!(DeviceSpec::parse(&text), Ok(spec), "{}", text);
        }

        #[test]
        fn random_text_never_panics(s in ".{0,80}") {
            let _ = DeviceSpec::parse(&s);
            if let Ok(mut p) = DeviceProps::parse(&s) {
                let _ = p.take_number::<u8>("nr", |_| true);
                let _ = p.take_bool("pacing");
                let _ = p.finish();
            }
        }

        #[test]
        fn random_options_of_a_port_never_panic(
            options in proptest::collection::vec(("[a-z]{0,8}", ".{0,12}"), 0..6),
        ) {
            let mut text = "virtserialport".to_string();
            for (k, v) in &options {
                text.push_str(&format!(",{k}={}", v.replace(',', ",,")));
            }
            let _ = DeviceSpec::parse(&text);
        }
    }
}
