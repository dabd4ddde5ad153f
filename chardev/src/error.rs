//! Error types of the chardev crate.
//!
//! [`SpecError`] is what the option parser returns: one short line naming the chardev and the
//! offending option, fit to print after `minivmm: `. [`enum@Error`] is what creating, registering or
//! waiting on a backend returns; it wraps the OS error as its `source` and does not repeat it in
//! its own message. This module must not format anything over several lines.

use std::io;

use thiserror::Error;

/// The longest option value quoted back in an error message.
const MAX_QUOTED_VALUE: usize = 64;

/// Quote a user-supplied value for a one-line message: control characters escaped, long
/// values shortened.
pub fn quote(value: &str) -> String {
    let mut out: String = value.chars().flat_map(char::escape_debug).collect();
    if out.chars().count() > MAX_QUOTED_VALUE {
        out = out.chars().take(MAX_QUOTED_VALUE).collect();
        out.push_str("...");
    }
    out
}

/// A bad `--chardev` or `--serial` option string.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SpecError {
    /// Nothing was given.
    #[error("empty chardev option string")]
    Empty,
    /// The backend name is not one we know.
    #[error("unknown chardev backend '{0}'")]
    UnknownBackend(String),
    /// A `--serial` (or `--chardev` compat) short form we do not know.
    #[error("unknown serial option '{0}'")]
    UnknownSerial(String),
    /// `--chardev` without `id=`.
    #[error("chardev '{backend}': missing option 'id'")]
    MissingId {
        /// The backend name given.
        backend: String,
    },
    /// An id with characters QEMU would not accept either.
    #[error("bad chardev id '{0}' (a letter, then letters, digits, '-', '.', '_')")]
    BadId(String),
    /// Two commas in a row where an option was expected, or a trailing comma.
    #[error("chardev '{id}': empty option")]
    EmptyOption {
        /// The chardev id.
        id: String,
    },
    /// An option this backend does not have.
    #[error("chardev '{id}': unknown option '{option}'")]
    UnknownOption {
        /// The chardev id.
        id: String,
        /// The option name.
        option: String,
    },
    /// The same option twice.
    #[error("chardev '{id}': option '{option}' given twice")]
    DuplicateOption {
        /// The chardev id.
        id: String,
        /// The option name.
        option: String,
    },
    /// `key` without `=value` for an option that is not a boolean.
    #[error("chardev '{id}': option '{option}' needs a value")]
    MissingValue {
        /// The chardev id.
        id: String,
        /// The option name.
        option: String,
    },
    /// A value that does not parse or is out of range.
    #[error("chardev '{id}': bad value '{value}' for option '{option}' (expected {expected})")]
    BadValue {
        /// The chardev id.
        id: String,
        /// The option name.
        option: String,
        /// The value, quoted for one line.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
    /// A required option is missing.
    #[error("chardev '{id}': missing option '{option}'")]
    MissingOption {
        /// The chardev id.
        id: String,
        /// The option name.
        option: &'static str,
    },
    /// Options that do not go together.
    #[error("chardev '{id}': option '{option}' {reason}")]
    Conflict {
        /// The chardev id.
        id: String,
        /// The option at fault.
        option: &'static str,
        /// Why, e.g. "needs server=on".
        reason: &'static str,
    },
    /// A bad vproxy forward (`oforward=`, `iforward=`, or `minivmm-vp --oforward`).
    #[error("{}bad {option} '{value}': {reason}", chardev_prefix(.id))]
    BadForward {
        /// The chardev id, when the forward came from a `--chardev`.
        id: Option<String>,
        /// `oforward` or `iforward`.
        option: &'static str,
        /// The forward, quoted for one line.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// `chardev 'ID': ` for an error about chardev `id`, nothing without one.
fn chardev_prefix(id: &Option<String>) -> String {
    id.as_ref()
        .map_or_else(String::new, |id| format!("chardev '{id}': "))
}

impl SpecError {
    /// The same error, said of chardev `id` (for errors of parsers that know no chardev).
    pub fn in_chardev(self, id: &str) -> SpecError {
        match self {
            SpecError::BadForward {
                option,
                value,
                reason,
                ..
            } => SpecError::BadForward {
                id: Some(id.to_string()),
                option,
                value,
                reason,
            },
            other => other,
        }
    }
}

/// Creating, registering, looking up or waiting on a chardev failed.
#[derive(Debug, Error)]
pub enum Error {
    /// The option string was bad.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// An OS call failed while setting up a backend.
    #[error("chardev '{id}': cannot {op} '{target}'")]
    Io {
        /// The chardev id.
        id: String,
        /// What we tried ("open", "bind", "connect", ...).
        op: &'static str,
        /// The path, address or fd.
        target: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A valid spec that cannot be set up here (bad fd kind, unix path too long, ...).
    #[error("chardev '{id}': {reason}")]
    Unsupported {
        /// The chardev id.
        id: String,
        /// Why.
        reason: &'static str,
    },
    /// The registry already has this id.
    #[error("chardev with id '{0}' already exists")]
    Duplicate(String),
    /// The registry has no such id.
    #[error("chardev '{0}' not found")]
    NotFound(String),
    /// The chardev has a frontend (or a mux) attached.
    #[error("chardev '{0}' is busy")]
    Busy(String),
    /// A single-frontend chardev asked for a second frontend.
    #[error("chardev '{0}' is already in use")]
    InUse(String),
    /// Only one stdio chardev can exist.
    #[error("chardev '{0}': stdio is already in use")]
    StdioInUse(String),
    /// A mux already has its maximum number of frontends.
    #[error("chardev '{0}': too many mux frontends")]
    MuxFull(String),
    /// A spec of a backend kind no crate registered in this process.
    #[error("chardev backend '{0}' is not available here")]
    UnknownKind(String),
    /// The operation needs a registry (a mux names its base chardev).
    #[error("chardev '{0}': a mux needs the chardev registry")]
    NeedsRegistry(String),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Io`] for chardev `id`.
    pub fn io(id: &str, op: &'static str, target: impl Into<String>, e: io::Error) -> Self {
        Error::Io {
            id: id.to_string(),
            op,
            target: target.into(),
            source: e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_escapes_and_shortens() {
        assert_eq!(quote("a\nb"), "a\\nb");
        let long = "x".repeat(200);
        let q = quote(&long);
        assert!(q.ends_with("...") && q.len() == MAX_QUOTED_VALUE + 3);
    }

    #[test]
    fn messages_are_one_line() {
        let e = SpecError::BadValue {
            id: "c0".into(),
            option: "port".into(),
            value: quote("1\n2"),
            expected: "a port number",
        };
        assert!(!e.to_string().contains('\n'));
        assert_eq!(
            SpecError::UnknownOption {
                id: "c0".into(),
                option: "foo".into()
            }
            .to_string(),
            "chardev 'c0': unknown option 'foo'"
        );
    }
}
