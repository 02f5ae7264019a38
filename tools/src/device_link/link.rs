//! One request, one response, over a [`Port`]: sequence numbers, per-request timeouts, bounded
//! retries, resynchronisation after garbage (see `docs/UPDATE_PROTOCOL.md`, "Timeouts and
//! retries").

use super::info::Reply;
use super::transport::{Endpoint, Port};
use super::LinkError;
use kiln_device::frame::{FrameDecoder, DELIMITER};
use kiln_device::protocol::{decode_response, encode_request_vec, ErrorCode, Request, SEQ_UNKNOWN};
use serde::Serialize;
use std::io::{ErrorKind, Write};
use std::time::{Duration, Instant};

/// Receive buffer of the host's frame decoder: longer response frames are dropped (64 KiB
/// covers every model we ship; this is twice that).
pub const RX_CAPACITY: usize = 128 * 1024;

/// Resends of a request after a timeout (or a damaged frame) before giving up.
pub const DEFAULT_RETRIES: u32 = 3;

/// How often a `Busy` answer is waited out (1 s each) before it is returned.
const BUSY_RETRIES: u32 = 3;
const BUSY_PAUSE: Duration = Duration::from_secs(1);

/// After a seq-0 framing error (the device could not read a frame, maybe ours), how long to
/// still wait for our answer before resending.
const DAMAGED_GRACE: Duration = Duration::from_millis(300);

/// Per-request timeouts (defaults as in `docs/UPDATE_PROTOCOL.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Opening the port / connecting, retried until this has passed.
    pub connect: Duration,
    /// `Info`, `Chunk`, `InstallKeyRecord`, `Reset`.
    pub request: Duration,
    /// `Begin` (may erase a slot).
    pub begin: Duration,
    /// `Commit` (hashes and verifies the whole artifact).
    pub commit: Duration,
    /// `Infer`.
    pub infer: Duration,
    /// After `Commit`: how long the device may take to reboot, run the trial and confirm.
    pub settle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(2),
            begin: Duration::from_secs(30),
            commit: Duration::from_secs(60),
            infer: Duration::from_secs(10),
            settle: Duration::from_secs(60),
        }
    }
}

impl Timeouts {
    /// Timeouts for a `--timeout` of `t`: connecting and short requests take `t`; `Begin`,
    /// `Commit`, `Infer` and the trial boot keep their longer defaults unless `t` is longer.
    pub fn with_request(t: Duration) -> Self {
        let d = Timeouts::default();
        Timeouts {
            connect: t,
            request: t,
            begin: d.begin.max(t),
            commit: d.commit.max(t),
            infer: d.infer.max(t),
            settle: d.settle.max(t),
        }
    }

    /// The timeout for one try of `request`.
    pub fn for_request(&self, request: &Request<'_>) -> Duration {
        match request {
            Request::Begin { .. } => self.begin,
            Request::Commit => self.commit,
            Request::Infer { .. } => self.infer,
            _ => self.request,
        }
    }
}

/// Counters of what the link had to cope with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LinkStats {
    /// Requests sent (not counting resends).
    pub requests: u64,
    /// Resends after a timeout or a damaged frame.
    pub retries: u64,
    /// Received frames that did not decode (garbage, bad CRC, overlong).
    pub bad_frames: u64,
    /// Answers to earlier requests that were skipped.
    pub stale: u64,
    /// Times the port was opened again.
    pub reconnects: u64,
}

/// The outcome of waiting for one answer.
enum Wait {
    Reply(Reply),
    /// Nothing usable in time (or our frame was damaged): resend.
    Resend,
}

/// A connection to a device speaking the update protocol.
pub struct Link {
    endpoint: Endpoint,
    port: Box<dyn Port>,
    decoder: Box<FrameDecoder<RX_CAPACITY>>,
    /// Bytes read from the port and not yet fed to the decoder: `rx[rx_at..]`.
    rx: Vec<u8>,
    rx_at: usize,
    /// The last seq used (the next request takes the one after, skipping 0).
    seq: u16,
    timeouts: Timeouts,
    retries: u32,
    /// Send a lone `0x00` before the next frame (first request, after a timeout).
    flush: bool,
    stats: LinkStats,
}

impl Link {
    /// Opens `endpoint` (retrying for `timeouts.connect`).
    ///
    /// # Errors
    /// [`LinkError::Connect`], [`LinkError::BadEndpoint`].
    pub fn open(endpoint: Endpoint, timeouts: Timeouts) -> Result<Link, LinkError> {
        let port = endpoint.open(timeouts.connect, timeouts.request)?;
        Ok(Link {
            endpoint,
            port,
            decoder: Box::default(),
            rx: Vec::new(),
            rx_at: 0,
            seq: 0,
            timeouts,
            retries: DEFAULT_RETRIES,
            flush: true,
            stats: LinkStats::default(),
        })
    }

    /// Sets how many times a request is resent after a timeout before it fails.
    pub fn set_retries(&mut self, retries: u32) {
        self.retries = retries;
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The timeouts.
    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// What the link coped with so far.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Opens the port again (after the device reset and the transport dropped), retrying until
    /// `wait` has passed. Bytes held from the old connection are dropped.
    ///
    /// # Errors
    /// [`LinkError::Connect`].
    pub fn reconnect(&mut self, wait: Duration) -> Result<(), LinkError> {
        let port = self.endpoint.open(wait, self.timeouts.request)?;
        self.port = port;
        self.decoder.reset();
        self.rx.clear();
        self.rx_at = 0;
        self.flush = true;
        self.stats.reconnects += 1;
        Ok(())
    }

    fn next_seq(&mut self) -> u16 {
        self.seq = match self.seq.wrapping_add(1) {
            SEQ_UNKNOWN => 1,
            s => s,
        };
        self.seq
    }

    /// Sends `request` and returns the device's answer, with the request's default timeout
    /// and retries. An `Error` answer is returned as [`Reply::Error`], except that `Busy` is
    /// waited out a few times first.
    ///
    /// # Errors
    /// [`LinkError::NoAnswer`] after the retries, [`LinkError::Closed`], [`LinkError::Io`],
    /// [`LinkError::Protocol`].
    pub fn request(&mut self, request: &Request<'_>) -> Result<Reply, LinkError> {
        let timeout = self.timeouts.for_request(request);
        self.request_with(request, timeout, self.retries)
    }

    /// [`Link::request`] with an explicit timeout per try and number of resends.
    ///
    /// # Errors
    /// As [`Link::request`].
    pub fn request_with(
        &mut self,
        request: &Request<'_>,
        timeout: Duration,
        retries: u32,
    ) -> Result<Reply, LinkError> {
        let seq = self.next_seq();
        let frame = encode_request_vec(seq, request);
        self.stats.requests += 1;
        let started = Instant::now();
        let (mut tries, mut busy, mut bad_frames) = (0u32, 0u32, 0u64);
        loop {
            tries += 1;
            self.send(&frame)?;
            match self.wait(seq, timeout, &mut bad_frames)? {
                Wait::Reply(Reply::Error {
                    code: ErrorCode::Busy,
                    ..
                }) if busy < BUSY_RETRIES => {
                    busy += 1;
                    std::thread::sleep(BUSY_PAUSE);
                }
                Wait::Reply(reply) => return Ok(reply),
                Wait::Resend => {
                    self.flush = true;
                    if tries > retries {
                        return Err(LinkError::NoAnswer {
                            endpoint: self.endpoint.to_string(),
                            request: request.name(),
                            waited: started.elapsed(),
                            tries,
                            bad_frames,
                        });
                    }
                    self.stats.retries += 1;
                }
            }
        }
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), LinkError> {
        let mut out = Vec::with_capacity(frame.len() + 1);
        if self.flush {
            out.push(DELIMITER);
        }
        out.extend_from_slice(frame);
        let written = self.port.write_all(&out).and_then(|()| self.port.flush());
        match written {
            Ok(()) => {
                self.flush = false;
                Ok(())
            }
            Err(e) => Err(self.io_error(e)),
        }
    }

    fn io_error(&self, e: std::io::Error) -> LinkError {
        match e.kind() {
            ErrorKind::UnexpectedEof
            | ErrorKind::BrokenPipe
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::NotConnected => LinkError::Closed {
                endpoint: self.endpoint.to_string(),
            },
            _ => LinkError::Io {
                endpoint: self.endpoint.to_string(),
                error: e,
            },
        }
    }

    /// Reads until the answer with `seq` arrives or `timeout` passes. Skips garbage, stale
    /// answers and boot chatter; never blocks past the deadline.
    fn wait(&mut self, seq: u16, timeout: Duration, bad: &mut u64) -> Result<Wait, LinkError> {
        let mut deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            while self.rx_at < self.rx.len() {
                let (result, rest) = self.decoder.feed_slice(&self.rx[self.rx_at..]);
                let consumed = self.rx.len() - self.rx_at - rest.len();
                let Some(result) = result else {
                    self.rx_at += consumed;
                    break;
                };
                let seen = match result {
                    Err(_) => None,
                    Ok(payload) => match decode_response(payload) {
                        Ok((s, response)) => Some((s, Reply::from(response))),
                        Err(e) if e.code == ErrorCode::ProtocolVersion => {
                            return Err(LinkError::Protocol {
                                endpoint: self.endpoint.to_string(),
                                error: e,
                            });
                        }
                        Err(_) => None,
                    },
                };
                self.rx_at += consumed;
                match seen {
                    None => {
                        *bad += 1;
                        self.stats.bad_frames += 1;
                    }
                    Some((
                        s,
                        Reply::Error {
                            code: ErrorCode::ProtocolVersion,
                            detail,
                        },
                    )) if s == seq => {
                        return Err(LinkError::DeviceProtocol {
                            endpoint: self.endpoint.to_string(),
                            version: detail,
                        });
                    }
                    Some((s, reply)) if s == seq => return Ok(Wait::Reply(reply)),
                    Some((
                        SEQ_UNKNOWN,
                        Reply::Error {
                            code: ErrorCode::BadCrc | ErrorCode::BadFrame | ErrorCode::FrameTooLong,
                            ..
                        },
                    )) => {
                        // The device dropped a frame: ours, or a half-frame our flush ended.
                        // Give our answer a moment, then resend.
                        deadline = deadline.min(Instant::now() + DAMAGED_GRACE);
                    }
                    Some(_) => self.stats.stale += 1,
                }
            }
            self.rx.clear();
            self.rx_at = 0;
            let now = Instant::now();
            if now >= deadline {
                // Whatever half-frame is held will not be completed by our answer.
                self.decoder.reset();
                return Ok(Wait::Resend);
            }
            if let Err(e) = self.port.set_read_timeout(deadline - now) {
                return Err(self.io_error(e));
            }
            match self.port.read(&mut buf) {
                Ok(0) => return Err(self.io_error(ErrorKind::UnexpectedEof.into())),
                Ok(n) => self.rx.extend_from_slice(buf.get(..n).unwrap_or_default()),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(self.io_error(e)),
            }
        }
    }
}
