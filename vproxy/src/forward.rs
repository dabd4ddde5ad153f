//! Forward specifications of vproxy: which host (or guest) sockets are carried over the
//! channel, and to which service names.
//!
//! - An **oforward** (`NAME:[BIND:]PORT` or `NAME:unix:PATH`) listens locally; every accepted
//!   connection becomes a stream that asks the peer for service `NAME`. `BIND` defaults to
//!   [`DEFAULT_BIND`] so nothing is exposed beyond this machine unless asked for.
//! - An **iforward** (`NAME:HOST:PORT` or `NAME:unix:PATH`) lets the peer open service `NAME`,
//!   which is connected to `HOST:PORT` (or the unix socket `PATH`). Only configured names are
//!   reachable: the peer names a service, never an address.
//!
//! Service names are 1 to [`MAX_SERVICE_NAME`] bytes of `[A-Za-z0-9._-]`. An IPv6 address is
//! written in brackets (`web:[::1]:8080`). This module only parses and prints; it opens
//! nothing.

use std::fmt;
use std::path::PathBuf;

use chardev::error::{quote, SpecError};

/// The longest service name, in bytes.
pub const MAX_SERVICE_NAME: usize = 64;
/// Where an oforward listens when its spec names no address.
pub const DEFAULT_BIND: &str = "127.0.0.1";
/// The prefix that makes the rest of a forward a unix socket path.
const UNIX_PREFIX: &str = "unix:";
/// The option name of an oforward, in messages.
pub const OFORWARD: &str = "oforward";
/// The option name of an iforward, in messages.
pub const IFORWARD: &str = "iforward";

/// A socket address a forward listens on or connects to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A TCP address: a host name or IP address (IPv6 without brackets) and a port.
    Tcp {
        /// Host name or address.
        host: String,
        /// The port; 0 in an oforward lets the kernel pick one.
        port: u16,
    },
    /// A unix stream socket path.
    Unix(PathBuf),
}

/// One forward: a service name and the local socket that goes with it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Forward {
    /// The service name the streams carry.
    pub name: String,
    /// Where an oforward listens, or where an iforward connects.
    pub endpoint: Endpoint,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Endpoint::Tcp { host, port } => write!(f, "{host}:{port}"),
            Endpoint::Unix(path) => write!(f, "{UNIX_PREFIX}{}", path.display()),
        }
    }
}

/// Prints the canonical spec (`NAME:HOST:PORT` or `NAME:unix:PATH`), which both parsers take
/// back.
impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.endpoint)
    }
}

/// Whether `name` is a valid service name: 1 to [`MAX_SERVICE_NAME`] bytes of
/// `[A-Za-z0-9._-]`.
pub fn is_valid_service_name(name: &str) -> bool {
    (1..=MAX_SERVICE_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A [`SpecError::BadForward`] for `value` of option `option`.
fn bad(option: &'static str, value: &str, reason: String) -> SpecError {
    SpecError::BadForward {
        id: None,
        option,
        value: quote(value),
        reason,
    }
}

/// Split off and check the service name; returns it and the rest after its colon.
fn split_name<'a>(
    option: &'static str,
    value: &'a str,
    form: &str,
) -> Result<(&'a str, &'a str), SpecError> {
    let Some((name, rest)) = value.split_once(':') else {
        return Err(bad(option, value, format!("expected {form}")));
    };
    if !is_valid_service_name(name) {
        return Err(bad(
            option,
            value,
            format!(
                "bad service name '{}' (1 to {MAX_SERVICE_NAME} of A-Z a-z 0-9 . _ -)",
                quote(name)
            ),
        ));
    }
    Ok((name, rest))
}

/// `unix:PATH` as an endpoint, if `rest` has that form.
fn unix_endpoint(
    option: &'static str,
    value: &str,
    rest: &str,
) -> Option<Result<Endpoint, SpecError>> {
    let path = rest.strip_prefix(UNIX_PREFIX)?;
    Some(if path.is_empty() || path.contains('\0') {
        Err(bad(
            option,
            value,
            "expected a unix socket path after 'unix:'".into(),
        ))
    } else {
        Ok(Endpoint::Unix(PathBuf::from(path)))
    })
}

/// Parse a port; `allow_zero` for listeners, where 0 lets the kernel pick.
fn parse_port(
    option: &'static str,
    value: &str,
    port: &str,
    allow_zero: bool,
) -> Result<u16, SpecError> {
    let ok = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    match port.parse::<u16>() {
        Ok(p) if ok && (p != 0 || allow_zero) => Ok(p),
        _ => {
            let range = if allow_zero {
                "0 to 65535"
            } else {
                "1 to 65535"
            };
            Err(bad(
                option,
                value,
                format!("bad port '{}' ({range})", quote(port)),
            ))
        }
    }
}

/// Check a host or bind address and drop the brackets of `[v6]`.
fn parse_host(option: &'static str, value: &str, host: &str) -> Result<String, SpecError> {
    let inner = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ok = !inner.is_empty()
        && inner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_' | b'%'));
    if ok {
        Ok(inner.to_string())
    } else {
        Err(bad(option, value, format!("bad address '{}'", quote(host))))
    }
}

/// Parse an oforward: `NAME:[BIND:]PORT` or `NAME:unix:PATH`. `BIND` defaults to
/// [`DEFAULT_BIND`]; `PORT` 0 lets the kernel pick one.
pub fn parse_oforward(s: &str) -> Result<Forward, SpecError> {
    const FORM: &str = "NAME:[BIND:]PORT or NAME:unix:PATH";
    let (name, rest) = split_name(OFORWARD, s, FORM)?;
    if let Some(endpoint) = unix_endpoint(OFORWARD, s, rest) {
        return Ok(Forward {
            name: name.to_string(),
            endpoint: endpoint?,
        });
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((bind, port)) => (parse_host(OFORWARD, s, bind)?, port),
        None => (DEFAULT_BIND.to_string(), rest),
    };
    Ok(Forward {
        name: name.to_string(),
        endpoint: Endpoint::Tcp {
            host,
            port: parse_port(OFORWARD, s, port, true)?,
        },
    })
}

/// Parse an iforward: `NAME:HOST:PORT` or `NAME:unix:PATH`.
pub fn parse_iforward(s: &str) -> Result<Forward, SpecError> {
    const FORM: &str = "NAME:HOST:PORT or NAME:unix:PATH";
    let (name, rest) = split_name(IFORWARD, s, FORM)?;
    if let Some(endpoint) = unix_endpoint(IFORWARD, s, rest) {
        return Ok(Forward {
            name: name.to_string(),
            endpoint: endpoint?,
        });
    }
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(bad(IFORWARD, s, format!("expected {FORM}")));
    };
    Ok(Forward {
        name: name.to_string(),
        endpoint: Endpoint::Tcp {
            host: parse_host(IFORWARD, s, host)?,
            port: parse_port(IFORWARD, s, port, false)?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tcp(name: &str, host: &str, port: u16) -> Forward {
        Forward {
            name: name.into(),
            endpoint: Endpoint::Tcp {
                host: host.into(),
                port,
            },
        }
    }

    fn unix(name: &str, path: &str) -> Forward {
        Forward {
            name: name.into(),
            endpoint: Endpoint::Unix(path.into()),
        }
    }

    #[test]
    fn oforward_forms() {
        assert_eq!(
            parse_oforward("web:8080"),
            Ok(tcp("web", "127.0.0.1", 8080))
        );
        assert_eq!(
            parse_oforward("web:0.0.0.0:80"),
            Ok(tcp("web", "0.0.0.0", 80))
        );
        assert_eq!(parse_oforward("web:[::1]:80"), Ok(tcp("web", "::1", 80)));
        assert_eq!(
            parse_oforward("a.b_c-1:0"),
            Ok(tcp("a.b_c-1", "127.0.0.1", 0))
        );
        assert_eq!(
            parse_oforward("ctl:unix:/run/a:b.sock"),
            Ok(unix("ctl", "/run/a:b.sock"))
        );
    }

    #[test]
    fn iforward_forms() {
        assert_eq!(
            parse_iforward("ssh:127.0.0.1:22"),
            Ok(tcp("ssh", "127.0.0.1", 22))
        );
        assert_eq!(
            parse_iforward("ssh:localhost:22"),
            Ok(tcp("ssh", "localhost", 22))
        );
        assert_eq!(
            parse_iforward("ssh:[fe80::1%eth0]:22"),
            Ok(tcp("ssh", "fe80::1%eth0", 22))
        );
        assert_eq!(
            parse_iforward("db:unix:/tmp/db.sock"),
            Ok(unix("db", "/tmp/db.sock"))
        );
    }

    #[test]
    fn errors_name_the_bad_value() {
        type Parser = fn(&str) -> Result<Forward, SpecError>;
        let (o, i): (Parser, Parser) = (parse_oforward, parse_iforward);
        let cases: &[(Parser, &str, &str)] = &[
            (
                o,
                "web",
                "bad oforward 'web': expected NAME:[BIND:]PORT or NAME:unix:PATH",
            ),
            (
                o,
                "we b:80",
                "bad oforward 'we b:80': bad service name 'we b' (1 to 64 of A-Z a-z 0-9 . _ -)",
            ),
            (
                o,
                ":80",
                "bad oforward ':80': bad service name '' (1 to 64 of A-Z a-z 0-9 . _ -)",
            ),
            (
                o,
                "web:99999",
                "bad oforward 'web:99999': bad port '99999' (0 to 65535)",
            ),
            (o, "web::80", "bad oforward 'web::80': bad address ''"),
            (
                o,
                "web:unix:",
                "bad oforward 'web:unix:': expected a unix socket path after 'unix:'",
            ),
            (
                i,
                "ssh:22",
                "bad iforward 'ssh:22': expected NAME:HOST:PORT or NAME:unix:PATH",
            ),
            (
                i,
                "ssh:host:0",
                "bad iforward 'ssh:host:0': bad port '0' (1 to 65535)",
            ),
            (
                i,
                "ssh:ho st:22",
                "bad iforward 'ssh:ho st:22': bad address 'ho st'",
            ),
            (
                i,
                "ssh:host:+22",
                "bad iforward 'ssh:host:+22': bad port '+22' (1 to 65535)",
            ),
        ];
        for (parse, input, want) in cases {
            assert_eq!(parse(input).unwrap_err().to_string(), *want, "{input}");
        }
        assert!(parse_oforward(&format!("{}:80", "n".repeat(MAX_SERVICE_NAME))).is_ok());
        assert!(parse_oforward(&format!("{}:80", "n".repeat(MAX_SERVICE_NAME + 1))).is_err());
        assert!(!parse_iforward("s\nh:x:1")
            .unwrap_err()
            .to_string()
            .contains('\n'));
    }

    #[test]
    fn display_is_canonical() {
        assert_eq!(tcp("web", "::1", 80).to_string(), "web:[::1]:80");
        assert_eq!(tcp("web", "127.0.0.1", 80).to_string(), "web:127.0.0.1:80");
        assert_eq!(unix("db", "/x").to_string(), "db:unix:/x");
    }

    fn arb_forward(allow_zero: bool) -> impl Strategy<Value = Forward> {
        let min_port = u16::from(!allow_zero);
        let endpoint = prop_oneof![
            ("[a-z][a-z0-9.-]{0,10}", min_port..=u16::MAX)
                .prop_filter("'unix' starts a path", |(host, _)| host != "unix")
                .prop_map(|(host, port)| Endpoint::Tcp { host, port }),
            ("[0-9a-f]{0,4}:[0-9a-f:]{0,10}", min_port..=u16::MAX)
                .prop_map(|(host, port)| Endpoint::Tcp { host, port }),
            "/[^\u{0}]{1,20}".prop_map(|p| Endpoint::Unix(PathBuf::from(p))),
        ];
        ("[A-Za-z0-9._-]{1,64}", endpoint).prop_map(|(name, endpoint)| Forward { name, endpoint })
    }

    proptest! {
        #[test]
        fn oforward_round_trip(f in arb_forward(true)) {
            prop_assert_eq!(parse_oforward(&f.to_string()), Ok(f.clone()), "{}", f);
        }

        #[test]
        fn iforward_round_trip(f in arb_forward(false)) {
            prop_assert_eq!(parse_iforward(&f.to_string()), Ok(f.clone()), "{}", f);
        }

        #[test]
        fn parsers_never_panic_and_errors_are_one_line(s in "\\PC{0,80}") {
            for r in [parse_oforward(&s), parse_iforward(&s)] {
                match r {
                    Ok(f) => prop_assert!(is_valid_service_name(&f.name)),
                    Err(e) => prop_assert!(!e.to_string().contains('\n')),
                }
            }
        }
    }
}
