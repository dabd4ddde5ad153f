//! Guest power requests (power-off, reset) and the two legacy devices that carry them: the
//! ACPI hardware-reduced sleep/reset registers and the i8042's reset line; and the other
//! direction, the host pressing the power button: the ACPI Generic Event Device
//! ([`GenericEventDevice`], `ACPI0013`), whose interrupt makes the guest run the DSDT's `_EVT`
//! method, which reads the event register and notifies the power button device (`PNP0C0C`).
//!
//! The devices only report a [`PowerEvent`] through [`PowerControl`] and raise their line
//! through [`IrqLine`]; stopping vCPUs and ending or restarting the VM is the VMM's business.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::IrqLine;

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

    fn reset(&mut self) {
        // No state: the registers only report requests.
    }
}

/// The GED event bit of the power button: `_EVT` notifies `PNP0C0C` when it reads it.
pub const GED_EVENT_POWER_BUTTON: u32 = 1 << 0;
/// Bytes of the GED's register block: one 32-bit event register at offset 0.
pub const GED_REGISTER_LEN: u64 = 4;

/// The ACPI Generic Event Device of a hardware-reduced machine, as Cloud Hypervisor has it:
/// pending events accumulate in a 32-bit register; the interrupt line is high (level) while
/// any is pending; a read of the register returns the pending events and clears them, which
/// lowers the line. The `_EVT` method in the DSDT does exactly one such read per interrupt.
pub struct GenericEventDevice {
    pending: u32,
    irq: Arc<dyn IrqLine>,
}

impl GenericEventDevice {
    /// A GED with nothing pending, interrupting through `irq`.
    pub fn new(irq: Arc<dyn IrqLine>) -> Self {
        GenericEventDevice { pending: 0, irq }
    }

    /// Raise `events` (bits such as [`GED_EVENT_POWER_BUTTON`]) to the guest.
    pub fn notify(&mut self, events: u32) {
        self.pending |= events;
        if self.pending != 0 {
            self.irq.set_level(true);
        }
    }

    /// Events not yet read by the guest.
    pub fn pending(&self) -> u32 {
        self.pending
    }
}

impl BusDevice for GenericEventDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let bytes = self.pending.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            if let Some(&v) = usize::try_from(offset).ok().and_then(|o| bytes.get(o + i)) {
                *b = v;
            }
        }
        if offset == 0 {
            // Read to clear: the guest has taken the events.
            self.pending = 0;
            self.irq.set_level(false);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "ged: ignored write of {} bytes at offset {offset}",
            data.len()
        );
    }

    fn reset(&mut self) {
        // Events the old guest did not read are lost with it, and the line drops.
        if self.pending != 0 {
            self.pending = 0;
            self.irq.set_level(false);
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

    fn reset(&mut self) {
        // No state: there is no keyboard, only the reset line.
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

    #[derive(Default)]
    struct Line(Mutex<Vec<bool>>);
    impl IrqLine for Line {
        fn set_level(&self, high: bool) {
            self.0.lock().unwrap().push(high);
        }
    }

    #[test]
    fn ged_holds_its_line_until_the_guest_reads_the_events() {
        let line = Arc::new(Line::default());
        let mut ged = GenericEventDevice::new(line.clone());
        ged.notify(0);
        assert!(line.0.lock().unwrap().is_empty());
        ged.notify(GED_EVENT_POWER_BUTTON);
        assert_eq!(*line.0.lock().unwrap(), vec![true]);
        // A partial read above offset 0 does not clear.
        let mut hi = [0xffu8; 2];
        ged.read(2, &mut hi);
        assert_eq!(hi, [0, 0]);
        assert_eq!(ged.pending(), GED_EVENT_POWER_BUTTON);
        let mut d = [0u8; 4];
        ged.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), GED_EVENT_POWER_BUTTON);
        assert_eq!(ged.pending(), 0);
        assert_eq!(*line.0.lock().unwrap(), vec![true, false]);
        ged.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
        ged.write(0, &[1, 2, 3, 4]);
        assert_eq!(ged.pending(), 0);
    }

    #[test]
    fn ged_reset_forgets_unread_events_and_drops_its_line() {
        let line = Arc::new(Line::default());
        let mut ged = GenericEventDevice::new(line.clone());
        ged.reset();
        assert!(line.0.lock().unwrap().is_empty());
        ged.notify(GED_EVENT_POWER_BUTTON);
        ged.reset();
        assert_eq!(ged.pending(), 0);
        assert_eq!(*line.0.lock().unwrap(), vec![true, false]);
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
