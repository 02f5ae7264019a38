//! Fuzzes the update wire protocol's receive side: `FrameDecoder` over arbitrary bytes (fed
//! byte by byte and in slices whose sizes the input picks; both must yield the same frames),
//! and `decode_request` / `decode_response` on every payload and on the raw input (as if it had
//! passed the CRC). Nothing may panic, and whatever decodes must re-encode into a frame that
//! decodes to the same message.

#![no_main]

use kiln_device::frame::{decode_frame, FrameDecoder, FrameError};
use kiln_device::protocol::{
    decode_request, decode_response, encode_request_vec, encode_response_vec, MAX_REQUEST_FRAME_LEN,
};
use libfuzzer_sys::fuzz_target;

type Events = Vec<Result<Vec<u8>, FrameError>>;

/// The payload of a frame this crate encoded itself.
fn own_payload(frame: &[u8]) -> Vec<u8> {
    assert_eq!(frame.last(), Some(&0), "a frame ends with the delimiter");
    assert!(
        !frame[..frame.len() - 1].contains(&0),
        "no 0x00 inside a frame"
    );
    let mut frame = frame.to_vec();
    decode_frame(&mut frame)
        .expect("an encoded frame decodes")
        .to_vec()
}

/// Decodes `payload` both ways; what decodes must survive a re-encoding unchanged.
fn check_payload(payload: &[u8]) {
    if let Ok((seq, request)) = decode_request(payload) {
        let again = own_payload(&encode_request_vec(seq, &request));
        assert_eq!(decode_request(&again), Ok((seq, request)));
    }
    if let Ok((seq, response)) = decode_response(payload) {
        let again = own_payload(&encode_response_vec(seq, &response));
        assert_eq!(decode_response(&again), Ok((seq, response)));
    }
}

fn by_byte<const N: usize>(data: &[u8]) -> Events {
    let mut decoder = FrameDecoder::<N>::new();
    data.iter()
        .filter_map(|&b| decoder.feed(b).map(|r| r.map(<[u8]>::to_vec)))
        .collect()
}

/// Feeds `data` in slices of `step` bytes.
fn by_slice<const N: usize>(data: &[u8], step: usize) -> Events {
    let mut decoder = FrameDecoder::<N>::new();
    let mut events = Vec::new();
    for piece in data.chunks(step) {
        let mut input = piece;
        while !input.is_empty() {
            let (result, rest) = decoder.feed_slice(input);
            assert!(rest.len() < input.len(), "feed_slice makes progress");
            if let Some(result) = result {
                events.push(result.map(<[u8]>::to_vec));
            }
            input = rest;
        }
    }
    events
}

fuzz_target!(|data: &[u8]| {
    let step = data.first().map_or(1, |&b| usize::from(b % 64) + 1);
    // The device's receive buffer, and a small one that overflows often.
    let events = by_byte::<MAX_REQUEST_FRAME_LEN>(data);
    assert_eq!(by_slice::<MAX_REQUEST_FRAME_LEN>(data, step), events);
    assert_eq!(by_slice::<24>(data, step), by_byte::<24>(data));
    for payload in events.iter().flatten() {
        check_payload(payload);
    }
    check_payload(data);
    let _ = decode_frame(&mut data.to_vec());
});
