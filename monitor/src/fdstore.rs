//! Named file descriptors passed to the monitor (`getfd`/`closefd`), shared by every session
//! of one monitor so that an fd passed on one connection can be used by name later.
//!
//! The store owns the fds: `closefd`, replacing a name, or dropping the store closes them.
//! Taking an fd out ([`FdStore::take`], what `chardev-add ...,fd=NAME` does) hands ownership
//! to the caller, as QEMU's `monitor_get_fd` does. This module does no other I/O.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;

/// Most named fds one monitor keeps.
pub const MAX_NAMED_FDS: usize = 256;

/// A refused `getfd`/`closefd`/lookup, worded as QEMU words it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FdStoreError {
    /// Names must not look like numbers.
    #[error("Parameter 'fdname' expects a name not starting with a digit")]
    DigitName,
    /// Empty name.
    #[error("Parameter 'fdname' expects a non-empty name")]
    EmptyName,
    /// No fd under this name.
    #[error("File descriptor named '{0}' not found")]
    NotFound(String),
    /// The store is full.
    #[error("Too many named file descriptors (at most {MAX_NAMED_FDS})")]
    Full,
}

/// A shared, cloneable store of named fds.
#[derive(Debug, Clone, Default)]
pub struct FdStore {
    inner: Arc<Mutex<BTreeMap<String, OwnedFd>>>,
}

impl FdStore {
    /// An empty store.
    pub fn new() -> Self {
        FdStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, OwnedFd>> {
        // A panic elsewhere leaves the map consistent: keep using it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Check a name as `getfd` does.
    pub fn check_name(name: &str) -> Result<(), FdStoreError> {
        match name.chars().next() {
            None => Err(FdStoreError::EmptyName),
            Some(c) if c.is_ascii_digit() => Err(FdStoreError::DigitName),
            Some(_) => Ok(()),
        }
    }

    /// `getfd`: keep `fd` under `name`, closing any fd that had that name.
    pub fn insert(&self, name: &str, fd: OwnedFd) -> Result<(), FdStoreError> {
        FdStore::check_name(name)?;
        let mut map = self.lock();
        if !map.contains_key(name) && map.len() >= MAX_NAMED_FDS {
            return Err(FdStoreError::Full);
        }
        map.insert(name.to_string(), fd);
        Ok(())
    }

    /// `closefd`.
    pub fn close(&self, name: &str) -> Result<(), FdStoreError> {
        self.lock()
            .remove(name)
            .map(drop)
            .ok_or_else(|| FdStoreError::NotFound(name.to_string()))
    }

    /// Take the fd named `name` out of the store; the caller owns it now.
    pub fn take(&self, name: &str) -> Result<OwnedFd, FdStoreError> {
        self.lock()
            .remove(name)
            .ok_or_else(|| FdStoreError::NotFound(name.to_string()))
    }

    /// Whether `name` is stored.
    pub fn contains(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// The stored names.
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    #[test]
    fn insert_replace_close_take() {
        let s = FdStore::new();
        assert_eq!(s.insert("1x", fd()), Err(FdStoreError::DigitName));
        assert_eq!(s.insert("", fd()), Err(FdStoreError::EmptyName));
        s.insert("a", fd()).unwrap();
        s.insert("a", fd()).unwrap();
        assert_eq!(s.names(), vec!["a".to_string()]);
        let shared = s.clone();
        let taken = shared.take("a").unwrap();
        assert!(taken.as_raw_fd() >= 0);
        assert!(!s.contains("a"));
        assert_eq!(
            s.close("a").unwrap_err().to_string(),
            "File descriptor named 'a' not found"
        );
        s.insert("b", fd()).unwrap();
        s.close("b").unwrap();
    }
}
