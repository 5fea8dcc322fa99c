//! The 16550A UART on COM1 (port 0x3f8, IRQ 4): the guest's console. Output goes to any
//! `Write` sink (stdout for `thaw run`, a buffer in tests); input is pushed in by the VMM's
//! event loop, which stops reading its input while the guest's receive FIFO is full and resumes
//! when the guest has drained it.

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::ByteRegisters;
use crate::persist::Persist;

/// COM1's first port.
pub const COM1_BASE: u64 = 0x3f8;
/// Ports a 16550 occupies.
pub const COM1_LEN: u64 = 8;
/// COM1's legacy IRQ line (and KVM GSI).
pub const COM1_IRQ: u32 = 4;

/// Where console output goes.
pub type ConsoleOutput = Box<dyn Write + Send>;

/// Raises the UART's interrupt through an eventfd registered with KVM as an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Signals the event loop that the guest emptied the receive FIFO, so input may flow again.
pub struct InputDrained(pub EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // A failed write means the counter is saturated: the loop is already woken.
        let _ = self.0.write(1);
    }
}

/// COM1.
pub struct SerialConsole {
    uart: Serial<IrqTrigger, InputDrained, ConsoleOutput>,
}

impl SerialConsole {
    /// A UART raising `irq` and writing to `output`.
    pub fn new(irq: EventFd, output: ConsoleOutput) -> std::io::Result<Self> {
        let drained = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        Ok(Self {
            uart: Serial::with_events(IrqTrigger(irq), InputDrained(drained), output),
        })
    }

    /// Free room in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues bytes the guest will read; returns how many fit.
    pub fn push_input(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "serial input dropped");
                0
            }
        }
    }

    /// The eventfd that fires when the guest has drained the receive FIFO.
    pub fn input_drained_fd(&self) -> RawFd {
        self.uart.events().0.as_raw_fd()
    }

    /// Consumes a pending "drained" notification.
    pub fn clear_input_drained(&self) {
        let _ = self.uart.events().0.read();
    }
}

/// COM1's registers and receive FIFO (vm-superio's `SerialState`, which is not serde).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialConsoleState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes in the receive FIFO the guest has not read yet.
    pub rx_fifo: Vec<u8>,
}

/// The UART could not be rebuilt from a saved state.
#[derive(Debug, thiserror::Error)]
pub enum SerialStateError {
    /// The eventfd for input flow control could not be created.
    #[error("cannot create the serial input eventfd")]
    EventFd(#[source] std::io::Error),
    /// vm-superio refused the state (a receive FIFO larger than the UART's).
    #[error("invalid serial state")]
    Invalid(#[source] vm_superio::serial::Error<std::io::Error>),
}

/// What a restored UART is built on: its irqfd and console output.
pub struct SerialArgs {
    /// The eventfd registered as COM1's irqfd.
    pub irq: EventFd,
    /// Where output goes.
    pub output: ConsoleOutput,
}

impl Persist for SerialConsole {
    type State = SerialConsoleState;
    type ConstructorArgs<'a> = SerialArgs;
    type Error = SerialStateError;

    fn save(&self) -> Result<SerialConsoleState, SerialStateError> {
        let s = self.uart.state();
        Ok(SerialConsoleState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            rx_fifo: s.in_buffer,
        })
    }

    fn restore(args: SerialArgs, state: &SerialConsoleState) -> Result<Self, SerialStateError> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.rx_fifo.clone(),
        };
        let drained = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(SerialStateError::EventFd)?;
        // vm-superio raises the interrupt again if the state says one is due. The irqchip
        // state restored afterwards overrides that edge with the one saved, which already
        // reflects this interrupt.
        let uart = Serial::from_state(&s, IrqTrigger(args.irq), InputDrained(drained), args.output)
            .map_err(SerialStateError::Invalid)?;
        Ok(Self { uart })
    }
}

impl ByteRegisters for SerialConsole {
    fn read_register(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    fn write_register(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.uart.write(offset, value) {
            tracing::warn!(error = %e, "serial console write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_to_output_and_receives_input() {
        let capture = Capture::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut com1 =
            SerialConsole::new(irq.try_clone().unwrap(), Box::new(capture.clone())).unwrap();
        for b in b"hi" {
            com1.write(0, &[*b]);
        }
        assert_eq!(&*capture.0.lock().unwrap(), b"hi");

        com1.write(1, &[0x01]); // IER: received-data interrupt on
        assert_eq!(com1.push_input(b"ok"), 2);
        assert!(irq.read().unwrap() > 0);
        let mut byte = [0u8];
        com1.read(5, &mut byte); // LSR: data ready
        assert_eq!(byte[0] & 1, 1);
        com1.read(0, &mut byte);
        assert_eq!(byte[0], b'o');
    }

    fn fresh_args() -> SerialArgs {
        SerialArgs {
            irq: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            output: Box::new(std::io::sink()),
        }
    }

    #[test]
    fn serial_console_passes_persist_conformance() {
        use crate::persist_conformance::{self, Spec};
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut com1 = SerialConsole::new(irq, Box::new(std::io::sink())).unwrap();
        com1.write(3, &[0x80]); // LCR: DLAB on
        com1.write(0, &[0x0c]); // divisor low: 9600 baud
        com1.write(3, &[0x03]); // LCR: 8N1, DLAB off
        com1.write(1, &[0x01]); // IER
        com1.write(7, &[0x5a]); // scratch
        com1.push_input(b"queued");
        let spec = Spec::of::<SerialConsole>()
            .carries("divisor latch", |s| {
                s.baud_divisor_low = 0x30;
                s.baud_divisor_high = 0x01;
            })
            .carries("line and modem control", |s| {
                s.line_control = 0x1f;
                s.modem_control = 0x0b;
            })
            .carries("line and modem status", |s| {
                s.line_status |= 0x02; // overrun
                s.modem_status ^= 0x40; // ring indicator
            })
            .carries("interrupt enable and identification", |s| {
                s.interrupt_enable = 0x0f;
                s.interrupt_identification = 0xc4;
            })
            .carries("scratch", |s| s.scratch = 0xa5)
            .carries("receive FIFO", |s| s.rx_fifo = b"carried".to_vec())
            .refuses("a receive FIFO larger than the UART's", |s| {
                s.rx_fifo = vec![0; 1000]
            });
        let saved = persist_conformance::check::<SerialConsole>(&com1, fresh_args, &spec);
        assert_eq!(saved.rx_fifo, b"queued");
        assert_eq!((saved.scratch, saved.baud_divisor_low), (0x5a, 0x0c));
    }

    #[test]
    fn restored_serial_raises_its_pending_interrupt_and_reads_back_its_fifo() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut com1 = SerialConsole::new(irq, Box::new(std::io::sink())).unwrap();
        com1.write(1, &[0x01]); // IER: received-data interrupt on
        com1.push_input(b"queued");
        let saved = com1.save().unwrap();
        let args = fresh_args();
        let irq = args.irq.try_clone().unwrap();
        let mut restored = SerialConsole::restore(args, &saved).unwrap();
        assert!(irq.read().unwrap() > 0);
        let mut byte = [0u8];
        restored.read(0, &mut byte);
        assert_eq!(byte[0], b'q');
    }

    #[test]
    fn full_fifo_accepts_no_more_input() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut com1 = SerialConsole::new(irq, Box::new(std::io::sink())).unwrap();
        let cap = com1.input_capacity();
        assert_eq!(com1.push_input(&vec![b'a'; cap + 10]), cap);
        assert_eq!(com1.input_capacity(), 0);
        assert_eq!(com1.push_input(b"b"), 0);
    }
}
