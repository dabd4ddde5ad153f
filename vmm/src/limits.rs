//! Process resource limits the VMM sets for itself at start: the number of open files.
//!
//! Every chardev holds one fd or more (a socket server its listener, its client and the
//! duplicate the event loop watches), every monitor client one, every virtio queue an
//! ioeventfd, every COM port an eventfd and a timerfd. The usual soft limit of 1024 is reached
//! long before the hard limit, which an unprivileged process may raise its soft limit to, as
//! QEMU and Firecracker do. Nothing here is fatal: the caller logs a failure and goes on.

use std::io;

/// The open-file limits before and after [`raise_open_file_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFileLimit {
    /// The soft limit found at start.
    pub old_soft: u64,
    /// The soft limit now.
    pub soft: u64,
    /// The hard limit (unchanged).
    pub hard: u64,
}

fn get_nofile() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit the call fills in; the return value is
    // checked.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit; returns the limits before and after.
/// Nothing changes when the soft limit is already the hard one.
pub fn raise_open_file_limit() -> io::Result<OpenFileLimit> {
    let mut limit = get_nofile()?;
    let old_soft = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: `limit` is a valid rlimit read just above; only its soft value changed, to
        // the hard one, which any process may do. The return value is checked.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(OpenFileLimit {
        old_soft,
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The soft limit ends at the hard one, the kernel agrees, and a second call changes
    /// nothing. (Lowering the limit first is left to the CLI test, in a process of its own.)
    #[test]
    fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
        let raised = raise_open_file_limit().unwrap();
        assert_eq!(raised.soft, raised.hard);
        assert!(raised.old_soft <= raised.soft);
        let now = get_nofile().unwrap();
        assert_eq!((now.rlim_cur, now.rlim_max), (raised.hard, raised.hard));
        let again = raise_open_file_limit().unwrap();
        assert_eq!(
            again,
            OpenFileLimit {
                old_soft: raised.hard,
                soft: raised.hard,
                hard: raised.hard
            }
        );
    }
}
