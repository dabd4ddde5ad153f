//! minivmm's emulated devices. Nothing in here knows KVM: interrupts are an [`IrqLine`], time
//! is a [`Clock`], and register accesses arrive through the [`bus::BusDevice`] trait from
//! whatever dispatches the vCPU exits.

pub mod bus;
#[cfg(test)]
pub(crate) mod fake_backend;
pub mod power;
pub mod serial;
pub mod serial_port;
pub mod virtio;

use std::sync::Arc;
use std::time::Instant;

/// An interrupt line into the guest's interrupt controller, driven at a level.
///
/// ISA devices are level-triggered from the device's point of view: the device says whether
/// its interrupt output is asserted, and the implementation (in `vmm`) turns that into the
/// hypervisor's mechanism, OR-ing devices that share a line.
pub trait IrqLine: Send + Sync {
    /// Drive the line high (asserted) or low.
    fn set_level(&self, high: bool);
}

/// A monotonic clock, injected so device timing can be unit-tested on a fake clock.
pub trait Clock: Send + Sync {
    /// Nanoseconds since an arbitrary fixed origin; never goes backwards.
    fn now_ns(&self) -> u64;
}

/// The host's monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        MonotonicClock {
            origin: Instant::now(),
        }
    }

    /// Shared, as devices take it.
    pub fn shared() -> Arc<dyn Clock> {
        Arc::new(Self::new())
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}
