//! UART0 of the MPS2 boards: an Arm CMSDK APB UART at `0x4000_4000`, polled.
//!
//! ```text
//! offset  register   bits used here
//! 0x00    DATA       [7:0] byte received / to send
//! 0x04    STATE      0 TX buffer full, 1 RX buffer full, 2 TX overrun, 3 RX overrun (write 1 to clear)
//! 0x08    CTRL       0 TX enable, 1 RX enable
//! 0x0C    INTSTATUS  (interrupts are not used)
//! 0x10    BAUDDIV    baud divider, at least 16
//! ```
//!
//! Both directions hold one byte. Under QEMU the port is wired to the first `-serial` and
//! applies back-pressure (a byte waits in the host until `DATA` was read), so nothing is lost;
//! on hardware a byte arriving before the last one was read sets the RX overrun flag, which
//! [`Read::read`] reports as [`UartError::Overrun`].

use core::sync::atomic::{AtomicBool, Ordering};
use embedded_io::{ErrorKind, ErrorType, Read, ReadReady, Write, WriteReady};
use vcell::VolatileCell;

/// Base address of UART0.
pub const UART0_BASE: usize = 0x4000_4000;

const STATE_TX_FULL: u32 = 1 << 0;
const STATE_RX_FULL: u32 = 1 << 1;
const STATE_RX_OVERRUN: u32 = 1 << 3;
const CTRL_TX_EN: u32 = 1 << 0;
const CTRL_RX_EN: u32 = 1 << 1;

/// The UART's registers, as laid out in memory.
#[repr(C)]
struct Registers {
    data: VolatileCell<u32>,
    state: VolatileCell<u32>,
    ctrl: VolatileCell<u32>,
    intstatus: VolatileCell<u32>,
    bauddiv: VolatileCell<u32>,
}

/// Set once UART0 has been handed out.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// A receive error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UartError {
    /// A byte arrived before the previous one was read and was lost.
    Overrun,
}

impl embedded_io::Error for UartError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Other
    }
}

/// UART0, enabled for both directions.
pub struct Uart {
    regs: &'static Registers,
}

impl Uart {
    /// Takes UART0 (the first time; `None` afterwards), sets the baud divider to `bauddiv`
    /// (clamped to the minimum of 16) and enables transmit and receive.
    pub fn take(bauddiv: u32) -> Option<Self> {
        if TAKEN.swap(true, Ordering::AcqRel) {
            return None;
        }
        // SAFETY: UART0_BASE is the CMSDK UART's register block on the MPS2 boards (AN385/386/
        // 500): five 32-bit registers, 4-byte aligned, valid for the whole program and only
        // accessed through the volatile cells. `TAKEN` makes this the only reference handed out.
        let regs = unsafe { &*(UART0_BASE as *const Registers) };
        let uart = Uart { regs };
        uart.regs.ctrl.set(0);
        uart.regs.bauddiv.set(bauddiv.max(16));
        uart.regs.intstatus.set(0xF);
        uart.regs.state.set(0xC);
        uart.regs.ctrl.set(CTRL_TX_EN | CTRL_RX_EN);
        Some(uart)
    }

    fn state(&self) -> u32 {
        self.regs.state.get()
    }

    /// The next received byte, if one is waiting.
    pub fn try_read_byte(&mut self) -> Option<u8> {
        (self.state() & STATE_RX_FULL != 0).then(|| self.regs.data.get() as u8)
    }

    /// Sends one byte, waiting for room.
    pub fn write_byte(&mut self, byte: u8) {
        while self.state() & STATE_TX_FULL != 0 {}
        self.regs.data.set(u32::from(byte));
    }

    /// Clears and reports a receive overrun.
    fn take_overrun(&mut self) -> Result<(), UartError> {
        if self.state() & STATE_RX_OVERRUN != 0 {
            self.regs.state.set(STATE_RX_OVERRUN);
            return Err(UartError::Overrun);
        }
        Ok(())
    }
}

impl ErrorType for Uart {
    type Error = UartError;
}

impl Read for Uart {
    /// Waits for at least one byte, then takes what is waiting, up to `buf.len()`.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, UartError> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut n = 0;
        while n == 0 {
            self.take_overrun()?;
            for slot in buf.iter_mut() {
                let Some(byte) = self.try_read_byte() else {
                    break;
                };
                *slot = byte;
                n += 1;
            }
        }
        Ok(n)
    }
}

impl ReadReady for Uart {
    fn read_ready(&mut self) -> Result<bool, UartError> {
        self.take_overrun()?;
        Ok(self.state() & STATE_RX_FULL != 0)
    }
}

impl Write for Uart {
    /// Waits for room for one byte, then sends as many as fit without waiting.
    fn write(&mut self, buf: &[u8]) -> Result<usize, UartError> {
        let Some((&first, rest)) = buf.split_first() else {
            return Ok(0);
        };
        self.write_byte(first);
        let mut n = 1;
        for &byte in rest {
            if self.state() & STATE_TX_FULL != 0 {
                break;
            }
            self.regs.data.set(u32::from(byte));
            n += 1;
        }
        Ok(n)
    }

    /// Waits until the transmit buffer has taken the last byte. (The CMSDK UART has no "shift
    /// register empty" flag: on hardware, the last byte is still on the wire for one character
    /// time. Under QEMU it has reached the host side.)
    fn flush(&mut self) -> Result<(), UartError> {
        while self.state() & STATE_TX_FULL != 0 {}
        Ok(())
    }
}

impl WriteReady for Uart {
    fn write_ready(&mut self) -> Result<bool, UartError> {
        Ok(self.state() & STATE_TX_FULL == 0)
    }
}
