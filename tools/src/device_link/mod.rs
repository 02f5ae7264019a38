//! The host side of the serial update protocol (`docs/UPDATE_PROTOCOL.md`): talk to a board
//! over a serial port or a TCP socket, flash a model with resume and trial-boot confirmation,
//! read its state, install key records and run inferences on it.
//!
//! Layers, bottom up:
//! * [`transport`]: an [`Endpoint`] (`tcp:HOST:PORT` or `/dev/ttyX` at 8N1) opens a [`Port`], a
//!   byte pipe whose reads and writes all time out.
//! * [`link`]: a [`Link`] sends one request frame (`kiln_device::frame` + `protocol`) with a
//!   fresh sequence number and waits for the answer with that number, skipping garbage, stale
//!   answers and boot chatter, and resends after a timeout (bounded).
//! * [`ops`]: what the CLI does: [`flash`], [`device_info`], [`install_key_record`], [`infer`].
//! * [`tensors`]: input arrays to `Infer` bytes and outputs back, for `kiln infer --serial`.
//!
//! ```no_run
//! use kiln::device_link::{flash, Endpoint, Link, Timeouts, transport::DEFAULT_BAUD};
//!
//! let endpoint = Endpoint::parse("tcp:127.0.0.1:4444", DEFAULT_BAUD)?;
//! let mut link = Link::open(endpoint, Timeouts::default())?;
//! let artifact = std::fs::read("model-v2.kiln")?;
//! let report = flash(&mut link, &artifact, &mut |_event| {})?;
//! println!("v{} confirmed in slot {}", report.version, report.slot);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Errors are one line each: what happened, why, and what to do.

pub mod info;
pub mod link;
pub mod ops;
pub mod tensors;
pub mod transport;

pub use info::{ActiveModel, Info, LastEvent, Reply, Slot, SlotState};
pub use link::{Link, LinkStats, Timeouts};
pub use ops::{
    device_info, flash, infer, install_key_record, FlashEvent, FlashReport, Inference, OpError,
};
pub use transport::{Endpoint, Port};

use kiln_device::protocol::DecodeError;
use std::time::Duration;

/// Why talking to the device failed (below the level of what was asked of it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The address is not `tcp:HOST:PORT` or a device path, or does not resolve.
    #[error("`{given}` is not a device address ({why}): use tcp:HOST:PORT (QEMU, a network bridge) or a serial device such as /dev/ttyACM0")]
    BadEndpoint {
        /// What was given.
        given: String,
        /// What is wrong with it.
        why: String,
    },
    /// Connecting (or opening the serial port) failed until the deadline.
    #[error("{}", connect_message(endpoint, *waited, reason))]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// How long it was tried.
        waited: Duration,
        /// The last attempt's error.
        reason: String,
    },
    /// No answer with the request's seq arrived, even after resending.
    #[error("{}", no_answer_message(endpoint, request, *waited, *tries, *bad_frames))]
    NoAnswer {
        /// The endpoint.
        endpoint: String,
        /// The request's name.
        request: &'static str,
        /// Time spent over all tries.
        waited: Duration,
        /// Tries (the first send and the resends).
        tries: u32,
        /// Unreadable frames received meanwhile.
        bad_frames: u64,
    },
    /// The other end closed the connection (or the serial port went away).
    #[error("{endpoint} closed the connection: the board reset, or another program took its port; try again")]
    Closed {
        /// The endpoint.
        endpoint: String,
    },
    /// Another I/O error.
    #[error(
        "I/O error on {endpoint} ({error}): check the cable or the connection, then try again"
    )]
    Io {
        /// The endpoint.
        endpoint: String,
        /// The error.
        error: std::io::Error,
    },
    /// The device's answer is of another protocol version.
    #[error("{endpoint}: {error}")]
    Protocol {
        /// The endpoint.
        endpoint: String,
        /// The decode error (names the device's version).
        error: DecodeError,
    },
    /// The device refused our frame's protocol version.
    #[error("the device at {endpoint} speaks protocol version {version}, this kiln speaks {}: use a kiln release that matches the device firmware", kiln_device::protocol::PROTOCOL_VERSION)]
    DeviceProtocol {
        /// The endpoint.
        endpoint: String,
        /// The device's version.
        version: u32,
    },
}

impl LinkError {
    /// What happened and why, without the advice on what to do (for messages that give their
    /// own).
    pub fn cause(&self) -> String {
        match self {
            LinkError::Closed { endpoint } => format!(
                "{endpoint} closed the connection (the board reset, or another program took its port)"
            ),
            LinkError::NoAnswer {
                endpoint,
                request,
                waited,
                tries,
                ..
            } => format!(
                "no answer from {endpoint} to {request} within {} ({tries} tries)",
                secs(*waited)
            ),
            LinkError::Io { endpoint, error } => format!("I/O error on {endpoint} ({error})"),
            other => other.to_string(),
        }
    }
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 10.0 || s.fract() < 0.05 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

fn connect_message(endpoint: &str, waited: Duration, reason: &str) -> String {
    if endpoint.starts_with("tcp:") {
        format!(
            "cannot connect to {endpoint} within {} ({reason}): is the board (or QEMU with -serial tcp::PORT,server) running and listening there?",
            secs(waited)
        )
    } else {
        format!(
            "cannot open serial port {endpoint} within {} ({reason}): is the board plugged in, is the path right, and may you use the port (e.g. the dialout group)?",
            secs(waited)
        )
    }
}

fn no_answer_message(
    endpoint: &str,
    request: &str,
    waited: Duration,
    tries: u32,
    bad_frames: u64,
) -> String {
    if bad_frames == 0 {
        format!(
            "no answer from {endpoint} to {request} within {} ({tries} tries): is the board running Kiln firmware, and is nothing else connected to its serial port?",
            secs(waited)
        )
    } else {
        format!(
            "{endpoint} sent {bad_frames} unreadable frame(s) but no answer to {request} within {} ({tries} tries): check the baud rate (--baud) and that the board runs Kiln firmware",
            secs(waited)
        )
    }
}
