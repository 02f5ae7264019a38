//! Byte-level framing of the update wire protocol: COBS, a CRC-32 and a `0x00` delimiter.
//!
//! A frame carries one payload (a postcard-encoded message, see [`crate::protocol`]) over any
//! byte stream (a UART, a TCP socket, a USB CDC pipe):
//!
//! ```text
//!  payload (P bytes)   CRC-32 of payload, little-endian (4 bytes)
//! ┌───────────────────┬────────────────────┐
//! │ postcard message  │ c0 c1 c2 c3        │   ── COBS ──►  ≤ P + 4 + ⌊(P+4)/254⌋ + 1 bytes,
//! └───────────────────┴────────────────────┘                none 0x00, then the delimiter 0x00
//! ```
//!
//! * **COBS** (consistent overhead byte stuffing) removes every `0x00` from the encoded bytes,
//!   so `0x00` only ever ends a frame: a reader that lost track (garbage, a dropped byte, a
//!   reset half-way through a frame) is back in step at the next `0x00`. The overhead is one
//!   byte per 254 plus one.
//! * **CRC-32/ISO-HDLC** (polynomial `0x04C11DB7`, reflected, init and xor-out `0xFFFFFFFF`: the
//!   CRC of zlib, Ethernet and PNG; Python's `zlib.crc32`) over the payload, appended
//!   little-endian before the COBS step. It detects every error burst of up to 32 bits, every
//!   error of up to 3 flipped bits in frames of up to 91 607 bits (11 KiB; Hamming distance 4)
//!   and of up to 4 bits up to 2 974 bits (371 bytes); anything else escapes with probability
//!   2⁻³². A flip that changes the COBS structure (a code byte, or a byte turned into `0x00`)
//!   moves or drops bytes and then fails the CRC or the COBS decode. CRC-32C (Castagnoli) would
//!   reach Hamming distance 6 on frames under 655 bytes, but on full chunk frames (~1 KiB)
//!   both have distance 4; ISO-HDLC won for its ubiquity on hosts (zlib, every scripting
//!   language) and in MCU CRC peripherals.
//! * An **empty frame** (two delimiters in a row) is ignored, so a sender may put a `0x00`
//!   before each frame to flush whatever half-frame the receiver holds.
//!
//! [`encode_frame`] and [`decode_frame`] work on one frame in memory; [`FrameDecoder`] reads
//! frames from a stream a byte or a slice at a time with a fixed buffer.

use core::fmt;
use crc::{Crc, CRC_32_ISO_HDLC};
use postcard::ser_flavors::{crc::CrcModifier, Cobs, Flavor, Slice};

/// The byte that ends every frame (and never appears inside one).
pub const DELIMITER: u8 = 0x00;

/// Length of the CRC appended to each payload.
pub const CRC_LEN: usize = 4;

/// The frame CRC: CRC-32/ISO-HDLC (zlib's `crc32`), appended little-endian.
pub static CRC32: Crc<u32> = Crc::<u32>::new(&CRC_32_ISO_HDLC);

/// The CRC-32/ISO-HDLC of `bytes`, as appended to a frame's payload.
pub fn crc32(bytes: &[u8]) -> u32 {
    CRC32.checksum(bytes)
}

/// Upper bound of the COBS encoding of `len` bytes: one code byte per 254 data bytes, plus one.
pub const fn cobs_max_len(len: usize) -> usize {
    len + len / 254 + 1
}

/// The longest frame (COBS bytes plus the delimiter) that a payload of `payload_len` bytes can
/// become. A [`FrameDecoder<{ max_frame_len(P) }>`](FrameDecoder) reads every frame whose payload
/// is at most `P` bytes.
pub const fn max_frame_len(payload_len: usize) -> usize {
    cobs_max_len(payload_len + CRC_LEN) + 1
}

/// Why a frame was refused at the byte level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FrameError {
    /// More bytes than the receiver's buffer arrived before a delimiter (or, when encoding, the
    /// frame does not fit the output buffer). The rest of the frame was discarded.
    TooLong,
    /// The bytes are not a valid COBS encoding (a code byte points past the end of the frame).
    BadCobs,
    /// The decoded frame is shorter than its CRC.
    TooShort,
    /// The CRC does not match the payload: bytes were changed, lost or added on the way.
    BadCrc,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrameError::TooLong => "frame longer than the receive buffer",
            FrameError::BadCobs => "frame is not valid COBS",
            FrameError::TooShort => "frame shorter than its CRC",
            FrameError::BadCrc => "frame CRC mismatch",
        })
    }
}

#[cfg(feature = "std")]
impl std::error::Error for FrameError {}

/// Frames `payload`: appends its CRC, COBS-encodes both into `out` and ends with the delimiter.
/// Returns the frame's length. At most [`max_frame_len`]`(payload.len())` bytes are written.
///
/// # Errors
/// [`FrameError::TooLong`] when `out` is too small.
pub fn encode_frame(payload: &[u8], out: &mut [u8]) -> Result<usize, FrameError> {
    let mut flavor = sealing_flavor(out)?;
    flavor
        .try_extend(payload)
        .map_err(|_| FrameError::TooLong)?;
    let frame = flavor.finalize().map_err(|_| FrameError::TooLong)?;
    Ok(frame.len())
}

/// The postcard flavor stack that writes a frame into `out`: bytes pass through the CRC digest,
/// then the COBS encoder; `finalize` appends the CRC (little-endian), closes the COBS block and
/// writes the delimiter. [`crate::protocol`] serializes messages straight through it.
pub(crate) fn sealing_flavor(
    out: &mut [u8],
) -> Result<CrcModifier<'static, Cobs<Slice<'_>>, u32>, FrameError> {
    let cobs = Cobs::try_new(Slice::new(out)).map_err(|_| FrameError::TooLong)?;
    Ok(CrcModifier::new(cobs, CRC32.digest()))
}

/// Unframes one complete frame in place: COBS-decodes `frame` (up to its first delimiter, if it
/// has one), checks and strips the CRC, and returns the payload (a prefix of `frame`).
///
/// # Errors
/// [`FrameError::BadCobs`], [`FrameError::TooShort`] (also for an empty frame) or
/// [`FrameError::BadCrc`].
pub fn decode_frame(frame: &mut [u8]) -> Result<&[u8], FrameError> {
    let end = frame
        .iter()
        .position(|&b| b == DELIMITER)
        .unwrap_or(frame.len());
    let len = unframe(frame.get_mut(..end).unwrap_or_default())?;
    Ok(frame.get(..len).unwrap_or_default())
}

/// COBS-decodes `raw` (no delimiter inside) in place and checks the CRC; returns the payload
/// length.
fn unframe(raw: &mut [u8]) -> Result<usize, FrameError> {
    if raw.is_empty() {
        return Err(FrameError::TooShort);
    }
    let decoded = cobs::decode_in_place(raw).map_err(|_| FrameError::BadCobs)?;
    let payload_len = decoded.checked_sub(CRC_LEN).ok_or(FrameError::TooShort)?;
    let (payload, crc) = raw
        .get(..decoded)
        .and_then(|d| d.split_at_checked(payload_len))
        .ok_or(FrameError::TooShort)?;
    let crc: [u8; CRC_LEN] = crc.try_into().map_err(|_| FrameError::TooShort)?;
    if crc32(payload) != u32::from_le_bytes(crc) {
        return Err(FrameError::BadCrc);
    }
    Ok(payload_len)
}

/// What one [`FrameDecoder`] step yields: a checked payload, or why a frame was dropped.
pub type FrameResult<'b> = Result<&'b [u8], FrameError>;

/// Reads frames from a byte stream with a fixed buffer of `N` bytes: feed it bytes as they
/// arrive ([`feed`](Self::feed), [`feed_slice`](Self::feed_slice)); at each delimiter it yields
/// the frame's checked payload, or the reason the frame was dropped.
///
/// It never blocks (it only looks at what it is given), never panics and holds at most `N`
/// bytes: a frame longer than that is discarded up to the next delimiter and reported once, as
/// [`FrameError::TooLong`], when that delimiter arrives. Any error leaves the decoder ready for
/// the next frame, so garbage on the line costs the frames it touches and nothing more. Empty
/// frames are skipped silently.
///
/// `N` counts encoded bytes without the delimiter; `FrameDecoder<{ max_frame_len(P) }>` reads
/// every payload of up to `P` bytes.
///
/// ```
/// use kiln_device::frame::{encode_frame, max_frame_len, FrameDecoder};
///
/// let mut wire = [0u8; max_frame_len(5)];
/// let n = encode_frame(b"hello", &mut wire).unwrap();
///
/// let mut decoder = FrameDecoder::<{ max_frame_len(16) }>::new();
/// let mut got = None;
/// for &byte in &wire[..n] {
///     if let Some(result) = decoder.feed(byte) {
///         got = Some(result.map(|payload| payload.to_vec()));
///     }
/// }
/// assert_eq!(got, Some(Ok(b"hello".to_vec())));
/// ```
#[derive(Clone, Debug)]
pub struct FrameDecoder<const N: usize> {
    buf: [u8; N],
    /// Encoded bytes of the current frame held in `buf`.
    len: usize,
    /// The current frame outgrew `buf`: drop bytes up to the next delimiter.
    overflowed: bool,
}

impl<const N: usize> Default for FrameDecoder<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> FrameDecoder<N> {
    /// The smallest useful capacity: a CRC and one COBS code byte.
    pub const MIN_CAPACITY: usize = CRC_LEN + 1;

    /// An empty decoder.
    pub const fn new() -> Self {
        const {
            assert!(
                N >= Self::MIN_CAPACITY,
                "a FrameDecoder must hold at least a CRC"
            )
        };
        Self {
            buf: [0; N],
            len: 0,
            overflowed: false,
        }
    }

    /// The capacity in encoded bytes (without the delimiter).
    pub const fn capacity(&self) -> usize {
        N
    }

    /// Whether no partial frame is held: the last byte fed was a delimiter (or nothing was fed).
    pub const fn is_idle(&self) -> bool {
        self.len == 0 && !self.overflowed
    }

    /// Forgets any partial frame, e.g. after a receive timeout in the middle of one.
    pub fn reset(&mut self) {
        self.len = 0;
        self.overflowed = false;
    }

    /// Feeds one byte. Returns `None` until a delimiter ends a non-empty frame, then the frame's
    /// payload (borrowed from the decoder until the next call) or why it was dropped.
    pub fn feed(&mut self, byte: u8) -> Option<FrameResult<'_>> {
        let done = self.step(byte)?;
        Some(self.result(done))
    }

    /// Feeds bytes up to and including the first delimiter that ends a frame. Returns that
    /// frame's result (or `None` when `input` ran out first) and the bytes of `input` not yet
    /// consumed, to feed next.
    ///
    /// ```
    /// # use kiln_device::frame::{FrameDecoder, FrameResult};
    /// # fn handle(_: FrameResult<'_>) {}
    /// # let mut decoder = FrameDecoder::<64>::new();
    /// # let received: &[u8] = &[0x00, 0x17, 0x00];
    /// let mut input = received;
    /// while !input.is_empty() {
    ///     let (result, rest) = decoder.feed_slice(input);
    ///     if let Some(result) = result {
    ///         handle(result);
    ///     }
    ///     input = rest;
    /// }
    /// ```
    pub fn feed_slice<'d>(&mut self, input: &'d [u8]) -> (Option<FrameResult<'_>>, &'d [u8]) {
        let (done, rest) = self.step_slice(input);
        (done.map(|d| self.result(d)), rest)
    }

    /// Consumes bytes until a frame ends; returns its outcome as lengths (so that the caller can
    /// borrow the buffer afterwards) and the unconsumed rest.
    fn step_slice<'d>(
        &mut self,
        mut input: &'d [u8],
    ) -> (Option<Result<usize, FrameError>>, &'d [u8]) {
        loop {
            let Some(at) = input.iter().position(|&b| b == DELIMITER) else {
                self.absorb(input);
                return (None, &[]);
            };
            let (body, rest) = input.split_at(at);
            self.absorb(body);
            let rest = rest.get(1..).unwrap_or_default();
            if let Some(done) = self.end_frame() {
                return (Some(done), rest);
            }
            input = rest;
        }
    }

    /// One byte; `Some` when it ended a non-empty frame.
    fn step(&mut self, byte: u8) -> Option<Result<usize, FrameError>> {
        if byte == DELIMITER {
            self.end_frame()
        } else {
            self.absorb(&[byte]);
            None
        }
    }

    /// Appends non-delimiter bytes to the current frame, or notes the overflow.
    fn absorb(&mut self, bytes: &[u8]) {
        if self.overflowed || bytes.is_empty() {
            return;
        }
        let end = self.len.saturating_add(bytes.len());
        match self.buf.get_mut(self.len..end) {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                self.len = end;
            }
            None => {
                self.overflowed = true;
                self.len = 0;
            }
        }
    }

    /// A delimiter arrived: decode what is held (in place) and start over.
    fn end_frame(&mut self) -> Option<Result<usize, FrameError>> {
        let (len, overflowed) = (self.len, self.overflowed);
        self.reset();
        if overflowed {
            return Some(Err(FrameError::TooLong));
        }
        if len == 0 {
            return None;
        }
        Some(unframe(self.buf.get_mut(..len).unwrap_or_default()))
    }

    fn result(&self, done: Result<usize, FrameError>) -> FrameResult<'_> {
        done.map(|len| self.buf.get(..len).unwrap_or_default())
    }
}

/// Reads bytes from `reader` until `decoder` completes a frame and returns that frame's result.
/// Consumes nothing past the frame's delimiter, so the next call continues with the next frame.
///
/// Timeouts are the reader's: a read error (`TimedOut`, `WouldBlock`, `Interrupted`, …) is
/// returned as is and the partial frame stays in `decoder`, so calling again resumes it; call
/// [`FrameDecoder::reset`] to give it up instead. End of stream is `UnexpectedEof`.
///
/// # Errors
/// The reader's I/O errors, and `UnexpectedEof`.
#[cfg(feature = "std")]
pub fn read_frame<'d, R: std::io::BufRead + ?Sized, const N: usize>(
    reader: &mut R,
    decoder: &'d mut FrameDecoder<N>,
) -> std::io::Result<FrameResult<'d>> {
    let done = loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let (done, rest) = decoder.step_slice(available);
        let consumed = available.len() - rest.len();
        reader.consume(consumed);
        if let Some(done) = done {
            break done;
        }
    };
    Ok(decoder.result(done))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn crc_is_iso_hdlc() {
        // The standard check value of CRC-32/ISO-HDLC (zlib.crc32(b"123456789")).
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn frame_layout() {
        let mut out = [0xAA; 16];
        let n = encode_frame(&[0x11, 0x00, 0x22], &mut out).unwrap();
        let crc = crc32(&[0x11, 0x00, 0x22]).to_le_bytes();
        // COBS of 11 00 22 c0 c1 c2 c3 (no zero in this CRC), then the delimiter.
        assert!(!crc.contains(&0));
        assert_eq!(
            out[..n],
            [0x02, 0x11, 0x06, 0x22, crc[0], crc[1], crc[2], crc[3], 0x00]
        );
    }

    #[test]
    fn max_frame_len_is_an_upper_bound() {
        for len in [0, 1, 249, 250, 251, 253, 254, 255, 508, 1000, 1100] {
            let payload: std::vec::Vec<u8> = (0..len).map(|i| (i % 255 + 1) as u8).collect();
            let mut out = std::vec![0; max_frame_len(len)];
            let n = encode_frame(&payload, &mut out).unwrap();
            assert!(n <= max_frame_len(len), "{len}: {n}");
            let mut small = std::vec![0; n - 1];
            assert_eq!(encode_frame(&payload, &mut small), Err(FrameError::TooLong));
        }
    }

    #[test]
    fn decoder_with_minimum_capacity() {
        let mut d = FrameDecoder::<{ FrameDecoder::<0>::MIN_CAPACITY }>::new();
        let mut out = [0; 8];
        let n = encode_frame(&[], &mut out).unwrap();
        let (r, rest) = d.feed_slice(&out[..n]);
        assert_eq!(r, Some(Ok(&[][..])));
        assert!(rest.is_empty());
    }
}
