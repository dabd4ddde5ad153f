//! Guest power requests (power-off, reset) and the two legacy devices that carry them: the
//! ACPI hardware-reduced sleep/reset registers and the i8042's reset line.
//!
//! The devices only report a [`PowerEvent`] through [`PowerControl`]; stopping vCPUs and
//! ending or restarting the VM is the VMM's business.

use std::sync::Arc;

use crate::bus::BusDevice;

/// What the guest asked the machine to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    /// ACPI S5: power off.
    PowerOff,
    /// Reset (ACPI reset register or the keyboard controller's reset line).
    Reset,
}

/// Where power requests go.
pub trait PowerControl: Send + Sync {
    /// The guest requested `event`.
    fn request(&self, event: PowerEvent);
}

/// Sleep control register offset inside the PM block.
pub const PM_SLEEP_CONTROL: u64 = 0;
/// Sleep status register offset.
pub const PM_SLEEP_STATUS: u64 = 1;
/// Reset register offset.
pub const PM_RESET: u64 = 2;
/// The value that resets through the reset register.
pub const PM_RESET_VALUE: u8 = 1;
/// SLP_EN bit of the sleep control register.
pub const SLP_EN: u8 = 1 << 5;
/// SLP_TYP field shift and mask.
pub const SLP_TYP_SHIFT: u8 = 2;
/// SLP_TYP field mask (after shifting).
pub const SLP_TYP_MASK: u8 = 0x7;
/// The S5 sleep type the DSDT's `_S5_` declares.
pub const SLP_TYP_S5: u8 = 5;
/// WAK_STS bit of the sleep status register.
pub const WAK_STS: u8 = 1 << 7;

/// The hardware-reduced ACPI sleep control/status and reset registers.
pub struct AcpiPm {
    power: Arc<dyn PowerControl>,
}

impl AcpiPm {
    /// A PM block reporting to `power`.
    pub fn new(power: Arc<dyn PowerControl>) -> Self {
        AcpiPm { power }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == PM_SLEEP_STATUS {
            // Never asleep: report "woken" so a guest polling WAK_STS moves on.
            if let Some(b) = data.first_mut() {
                *b = WAK_STS;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            PM_SLEEP_CONTROL
                if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == SLP_TYP_S5 =>
            {
                self.power.request(PowerEvent::PowerOff)
            }
            PM_RESET if value == PM_RESET_VALUE => self.power.request(PowerEvent::Reset),
            _ => log::debug!("acpi-pm: ignored write {value:#x} at offset {offset}"),
        }
    }
}

/// i8042 command port offset from the data port (0x64 - 0x60).
pub const I8042_COMMAND_OFFSET: u64 = 4;
/// i8042 command: pulse the CPU reset line.
pub const I8042_CMD_RESET_CPU: u8 = 0xfe;

/// Just enough of an i8042 to reset the machine (`reboot=k`); it has no keyboard.
pub struct I8042 {
    power: Arc<dyn PowerControl>,
}

impl I8042 {
    /// An i8042 reporting resets to `power`.
    pub fn new(power: Arc<dyn PowerControl>) -> Self {
        I8042 { power }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty; data 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == I8042_COMMAND_OFFSET && data.first() == Some(&I8042_CMD_RESET_CPU) {
            self.power.request(PowerEvent::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Log(Mutex<Vec<PowerEvent>>);
    impl PowerControl for Log {
        fn request(&self, event: PowerEvent) {
            self.0.lock().unwrap().push(event);
        }
    }

    #[test]
    fn s5_with_slp_en_powers_off_and_nothing_else_does() {
        let log = Arc::new(Log::default());
        let mut pm = AcpiPm::new(log.clone());
        pm.write(PM_SLEEP_CONTROL, &[SLP_TYP_S5 << SLP_TYP_SHIFT]); // no SLP_EN
        pm.write(PM_SLEEP_CONTROL, &[(3 << SLP_TYP_SHIFT) | SLP_EN]); // S3
        assert!(log.0.lock().unwrap().is_empty());
        pm.write(PM_SLEEP_CONTROL, &[0x34]);
        assert_eq!(*log.0.lock().unwrap(), vec![PowerEvent::PowerOff]);
        pm.write(PM_RESET, &[PM_RESET_VALUE]);
        assert_eq!(log.0.lock().unwrap().last(), Some(&PowerEvent::Reset));
        let mut d = [0u8; 1];
        pm.read(PM_SLEEP_STATUS, &mut d);
        assert_eq!(d[0], WAK_STS);
        pm.write(PM_RESET, &[]);
    }

    #[test]
    fn i8042_resets_on_0xfe_only() {
        let log = Arc::new(Log::default());
        let mut kbd = I8042::new(log.clone());
        kbd.write(0, &[I8042_CMD_RESET_CPU]);
        kbd.write(I8042_COMMAND_OFFSET, &[0xaa]);
        assert!(log.0.lock().unwrap().is_empty());
        kbd.write(I8042_COMMAND_OFFSET, &[I8042_CMD_RESET_CPU]);
        assert_eq!(*log.0.lock().unwrap(), vec![PowerEvent::Reset]);
        let mut d = [0xffu8; 1];
        kbd.read(I8042_COMMAND_OFFSET, &mut d);
        assert_eq!(d[0], 0);
    }
}
