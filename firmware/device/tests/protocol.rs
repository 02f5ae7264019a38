//! The update wire protocol from the outside: every message round-trips through a frame, and
//! garbage, truncated, corrupted, overlong and mismatched frames are refused with an error
//! (never a panic, never a different message) while the decoder stays in step.

use kiln_device::frame::{
    self, decode_frame, encode_frame, max_frame_len, FrameDecoder, FrameError, CRC_LEN,
};
use kiln_device::protocol::{
    decode_request, decode_response, encode_request, encode_response, max_message_frame_len,
    DecodeError, DeviceInfo, ErrorCode, Event, ModelInfo, Request, Response, SlotInfo, SlotState,
    MAX_CHUNK, MAX_INFO_FRAME_LEN, MAX_NAME_LEN, MAX_REQUEST_FRAME_LEN, PROTOCOL_VERSION,
    SEQ_UNKNOWN,
};
use proptest::prelude::*;

/// The receive buffer a device with small model inputs uses.
type DeviceDecoder = FrameDecoder<MAX_REQUEST_FRAME_LEN>;

/// Everything a decoder yields for `bytes`, with payloads copied out.
fn events<const N: usize>(
    decoder: &mut FrameDecoder<N>,
    bytes: &[u8],
) -> Vec<Result<Vec<u8>, FrameError>> {
    let mut out = Vec::new();
    for &b in bytes {
        if let Some(r) = decoder.feed(b) {
            out.push(r.map(<[u8]>::to_vec));
        }
    }
    out
}

/// Same as [`events`], through `feed_slice` with the input cut at `cuts`.
fn events_sliced<const N: usize>(
    decoder: &mut FrameDecoder<N>,
    bytes: &[u8],
    cuts: &[usize],
) -> Vec<Result<Vec<u8>, FrameError>> {
    let mut out = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&bytes.len())) {
        let mut input = &bytes[start..end];
        while !input.is_empty() {
            let (r, rest) = decoder.feed_slice(input);
            if let Some(r) = r {
                out.push(r.map(<[u8]>::to_vec));
            }
            input = rest;
        }
        start = end;
    }
    out
}

fn request_frame(seq: u16, request: &Request<'_>) -> Vec<u8> {
    let mut buf = vec![0; max_message_frame_len(0) + 64 + request_data_len(request)];
    encode_request(seq, request, &mut buf).unwrap().to_vec()
}

fn response_frame(seq: u16, response: &Response<'_>) -> Vec<u8> {
    let mut buf = vec![0; MAX_INFO_FRAME_LEN + response_data_len(response)];
    encode_response(seq, response, &mut buf).unwrap().to_vec()
}

fn request_data_len(r: &Request<'_>) -> usize {
    match r {
        Request::Chunk { data, .. } => data.len(),
        Request::InstallKeyRecord { record } => record.len(),
        Request::Infer { input } => input.len(),
        _ => 0,
    }
}

fn response_data_len(r: &Response<'_>) -> usize {
    match r {
        Response::InferOk { output, .. } => output.len(),
        _ => 0,
    }
}

/// Decodes a complete frame the way a device does: stream decoder, then the payload.
fn receive_request(frame: &[u8], expected: &Request<'_>, seq: u16) {
    let mut decoder = FrameDecoder::<{ max_frame_len(4096) }>::new();
    let got = events(&mut decoder, frame);
    assert_eq!(got.len(), 1, "one frame, one event");
    let payload = got[0].as_ref().expect("a valid frame decodes");
    assert_eq!(decode_request(payload), Ok((seq, *expected)));
    assert!(decoder.is_idle());
}

fn receive_response(frame: &[u8], expected: &Response<'_>, seq: u16) {
    let mut decoder = FrameDecoder::<{ max_frame_len(4096) }>::new();
    let got = events(&mut decoder, frame);
    assert_eq!(got.len(), 1, "one frame, one event");
    let payload = got[0].as_ref().expect("a valid frame decodes");
    assert_eq!(decode_response(payload), Ok((seq, *expected)));
}

const KEY_RECORD: [u8; 120] = {
    let mut r = [0x5A; 120];
    r[0] = b'K';
    r[1] = b'K';
    r[2] = b'E';
    r[3] = b'Y';
    r
};

fn sample_requests(data: &[u8]) -> Vec<Request<'_>> {
    vec![
        Request::Info,
        Request::Begin {
            total_len: 123_456,
            digest: [0xA5; 32],
        },
        Request::Begin {
            total_len: u32::MAX,
            digest: [0; 32],
        },
        Request::Chunk {
            offset: 0,
            data: &[],
        },
        Request::Chunk { offset: 4096, data },
        Request::Chunk {
            offset: u32::MAX,
            data: &[0; MAX_CHUNK],
        },
        Request::Commit,
        Request::InstallKeyRecord {
            record: &KEY_RECORD,
        },
        Request::Infer { input: data },
        Request::Infer { input: &[] },
        Request::Reset,
    ]
}

fn worst_case_info() -> DeviceInfo<'static> {
    const NAME: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    assert_eq!(NAME.len(), MAX_NAME_LEN);
    let slot = SlotInfo {
        state: SlotState::Receiving {
            received: u32::MAX,
            total: u32::MAX,
        },
        version: u32::MAX,
        security_counter: u32::MAX,
        len: u32::MAX,
    };
    DeviceInfo {
        protocol: u16::MAX,
        board: NAME,
        firmware: NAME,
        active: Some(ModelInfo {
            slot: u8::MAX,
            version: u32::MAX,
            security_counter: u32::MAX,
            name: NAME,
            arena_bytes: u32::MAX,
            input_len: u32::MAX,
            output_len: u32::MAX,
        }),
        slots: [slot, slot],
        security_counter: u32::MAX,
        max_artifact_len: u32::MAX,
        max_frame: u32::MAX,
        max_chunk: u16::MAX,
        trusted_keys: u8::MAX,
        last_event: Some(Event::Reverted {
            version: u32::MAX,
            reason: ErrorCode::InferenceFailed,
        }),
    }
}

fn typical_info() -> DeviceInfo<'static> {
    DeviceInfo {
        protocol: PROTOCOL_VERSION,
        board: "mps2-an386",
        firmware: "kiln-board-m4 0.1.0",
        active: Some(ModelInfo {
            slot: 1,
            version: 7,
            security_counter: 2,
            name: "kws_ref_model",
            arena_bytes: 23_456,
            input_len: 490,
            output_len: 12,
        }),
        slots: [
            SlotInfo {
                state: SlotState::Previous,
                version: 6,
                security_counter: 2,
                len: 60_000,
            },
            SlotInfo {
                state: SlotState::Active,
                version: 7,
                security_counter: 2,
                len: 61_000,
            },
        ],
        security_counter: 2,
        max_artifact_len: 512 * 1024,
        max_frame: MAX_REQUEST_FRAME_LEN as u32,
        max_chunk: MAX_CHUNK as u16,
        trusted_keys: 2,
        last_event: Some(Event::Installed { version: 7 }),
    }
}

fn sample_responses(data: &[u8]) -> Vec<Response<'_>> {
    let mut all = vec![
        Response::Info(typical_info()),
        Response::Info(worst_case_info()),
        Response::Info(DeviceInfo {
            active: None,
            last_event: None,
            board: "",
            firmware: "",
            ..typical_info()
        }),
        Response::BeginOk {
            resume_from: 0,
            max_chunk: 1024,
        },
        Response::BeginOk {
            resume_from: 77_824,
            max_chunk: 256,
        },
        Response::ChunkOk { next: 1024 },
        Response::Committed {
            version: 8,
            slot: 0,
        },
        Response::KeyRecordOk { trusted_keys: 3 },
        Response::InferOk {
            output: data,
            cycles: 1_234_567,
        },
        Response::InferOk {
            output: &[],
            cycles: 0,
        },
        Response::Ok,
    ];
    let states = [
        SlotState::Empty,
        SlotState::Receiving {
            received: 1,
            total: 2,
        },
        SlotState::Ready,
        SlotState::Trial,
        SlotState::Active,
        SlotState::Previous,
        SlotState::Invalid,
    ];
    for (i, state) in states.into_iter().enumerate() {
        let mut info = typical_info();
        info.slots[i % 2].state = state;
        all.push(Response::Info(info));
    }
    for code in ErrorCode::ALL {
        all.push(Response::Error {
            code,
            detail: u32::from(code.code()) * 1000,
        });
        let mut info = typical_info();
        info.last_event = Some(Event::Refused { reason: code });
        all.push(Response::Info(info));
        info.last_event = Some(Event::Reverted {
            version: 9,
            reason: code,
        });
        all.push(Response::Info(info));
    }
    all
}

#[test]
fn every_request_round_trips() {
    let data: Vec<u8> = (0..=255u8).cycle().take(700).collect();
    for (i, request) in sample_requests(&data).iter().enumerate() {
        for seq in [1, 2, 0x7F, 0x80, 0x3FFF, u16::MAX] {
            let frame = request_frame(seq, request);
            assert_eq!(frame.last(), Some(&0), "{i}: ends with the delimiter");
            assert!(
                !frame[..frame.len() - 1].contains(&0),
                "{i}: no zero inside"
            );
            receive_request(&frame, request, seq);
        }
    }
}

#[test]
fn every_response_round_trips() {
    let data: Vec<u8> = (0..=255u8).rev().cycle().take(300).collect();
    for response in sample_responses(&data) {
        for seq in [SEQ_UNKNOWN, 1, 300, u16::MAX] {
            receive_response(&response_frame(seq, &response), &response, seq);
        }
    }
}

#[test]
fn wire_format_is_stable() {
    // Whole frames, as in docs/UPDATE_PROTOCOL.md (CRC from Python's zlib.crc32).
    assert_eq!(
        request_frame(1, &Request::Info),
        [0x03, 0x01, 0x01, 0x05, 0x64, 0x82, 0x98, 0xE7, 0x00]
    );
    assert_eq!(
        request_frame(
            2,
            &Request::Chunk {
                offset: 1024,
                data: &[0xAA, 0xBB, 0xCC],
            }
        ),
        [
            0x0E, 0x01, 0x02, 0x02, 0x80, 0x08, 0x03, 0xAA, 0xBB, 0xCC, 0x10, 0xC7, 0xB1, 0x59,
            0x00
        ]
    );
    // The payload bytes of a few messages, pinned: a change here is a new protocol version.
    let payload = |frame: Vec<u8>| {
        let mut f = frame;
        decode_frame(&mut f).unwrap().to_vec()
    };
    assert_eq!(
        payload(request_frame(
            7,
            &Request::Chunk {
                offset: 0x1234,
                data: &[1, 0, 3],
            }
        )),
        [0x01, 0x07, 0x02, 0xB4, 0x24, 0x03, 0x01, 0x00, 0x03]
    );
    assert_eq!(
        payload(request_frame(300, &Request::Info)),
        [0x01, 0xAC, 0x02, 0x00]
    );
    let mut begin = vec![0x01, 0x01, 0x01, 0x80, 0x01];
    begin.extend([0xEE; 32]);
    assert_eq!(
        payload(request_frame(
            1,
            &Request::Begin {
                total_len: 128,
                digest: [0xEE; 32],
            }
        )),
        begin
    );
    assert_eq!(
        payload(response_frame(
            9,
            &Response::Error {
                code: ErrorCode::OffsetMismatch,
                detail: 1024,
            }
        )),
        [0x01, 0x09, 0x07, 17, 0x80, 0x08]
    );
    assert_eq!(
        payload(response_frame(9, &Response::ChunkOk { next: 5 })),
        [0x01, 0x09, 0x02, 0x05]
    );
}

#[test]
fn largest_messages_fit_the_size_constants() {
    let chunk = [0xFF; MAX_CHUNK];
    let largest_chunk = request_frame(
        u16::MAX,
        &Request::Chunk {
            offset: u32::MAX,
            data: &chunk,
        },
    );
    assert!(largest_chunk.len() <= MAX_REQUEST_FRAME_LEN);
    // The device reads it with a decoder of exactly that size.
    let mut decoder = DeviceDecoder::new();
    let got = events(&mut decoder, &largest_chunk);
    assert!(matches!(got.as_slice(), [Ok(_)]));

    for request in sample_requests(&[7; 600]) {
        let frame = request_frame(u16::MAX, &request);
        assert!(frame.len() <= MAX_REQUEST_FRAME_LEN, "{request:?}");
        assert!(frame.len() <= max_message_frame_len(request_data_len(&request).max(32)));
    }
    for response in sample_responses(&[7; 600]) {
        let frame = response_frame(u16::MAX, &response);
        let data = response_data_len(&response);
        assert!(
            frame.len() <= MAX_INFO_FRAME_LEN.max(max_message_frame_len(data)),
            "{response:?}"
        );
    }
    let worst = response_frame(u16::MAX, &Response::Info(worst_case_info()));
    assert!(worst.len() <= MAX_INFO_FRAME_LEN);
    // The bound is tight enough to be useful: within a few bytes of COBS slack.
    assert!(MAX_INFO_FRAME_LEN - worst.len() < 16, "{}", worst.len());
    let output = [0x11; 4000];
    let infer = response_frame(
        u16::MAX,
        &Response::InferOk {
            output: &output,
            cycles: u32::MAX,
        },
    );
    assert!(infer.len() <= max_message_frame_len(output.len()));
}

#[test]
fn encoding_into_a_short_buffer_is_frame_too_long() {
    let data = [3; 300];
    for request in sample_requests(&data) {
        let needed = request_frame(5, &request).len();
        for len in 0..needed {
            let mut buf = vec![0; len];
            assert_eq!(
                encode_request(5, &request, &mut buf),
                Err(ErrorCode::FrameTooLong)
            );
        }
    }
    let info = Response::Info(typical_info());
    let needed = response_frame(5, &info).len();
    for len in 0..needed {
        let mut buf = vec![0; len];
        assert_eq!(
            encode_response(5, &info, &mut buf),
            Err(ErrorCode::FrameTooLong)
        );
    }
    // An error response fits in the smallest message frame, so a device can always answer.
    let mut buf = [0; max_message_frame_len(0)];
    assert!(encode_response(
        u16::MAX,
        &Response::error(ErrorCode::FrameTooLong, u32::MAX),
        &mut buf
    )
    .is_ok());
}

/// Frames a hand-made payload (header fields and body) with a valid CRC.
fn sealed(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0; max_frame_len(payload.len())];
    let n = encode_frame(payload, &mut out).unwrap();
    out.truncate(n);
    out
}

fn payload_of(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    decode_frame(&mut f).unwrap().to_vec()
}

#[test]
fn protocol_version_mismatch_names_both_versions() {
    // A host of version 2 asks a version-1 device for its info (seq 5).
    let payload = [0x02, 0x05, 0x00];
    let err = decode_request(&payload).unwrap_err();
    assert_eq!(
        err,
        DecodeError {
            seq: Some(5),
            code: ErrorCode::ProtocolVersion,
            detail: 2,
        }
    );
    // The device answers with its own version, echoing the seq.
    let (seq, reply) = err.reply();
    assert_eq!(seq, 5);
    assert_eq!(
        reply,
        Response::Error {
            code: ErrorCode::ProtocolVersion,
            detail: u32::from(PROTOCOL_VERSION),
        }
    );
    // A version-1 host reading a version-3 device's answer learns the device's version from
    // the header alone, whatever the body.
    let err = decode_response(&[0x03, 0x05, 0xFF, 0xFF, 0xFF]).unwrap_err();
    assert_eq!((err.code, err.detail), (ErrorCode::ProtocolVersion, 3));
    let text = err.to_string();
    assert!(
        text.contains("version 3") && text.contains("speaks 1"),
        "{text}"
    );
}

#[test]
fn unknown_request_kind_is_refused_with_its_index() {
    for kind in [7u8, 8, 100, 127] {
        let err = decode_request(&[0x01, 0x09, kind]).unwrap_err();
        assert_eq!(
            err,
            DecodeError {
                seq: Some(9),
                code: ErrorCode::UnknownRequest,
                detail: u32::from(kind),
            }
        );
        assert_eq!(err.reply().0, 9);
    }
    // A multi-byte varint index.
    let err = decode_request(&[0x01, 0x09, 0x80, 0x01]).unwrap_err();
    assert_eq!((err.code, err.detail), (ErrorCode::UnknownRequest, 128));
    // Responses: an unknown kind is a bad frame.
    let err = decode_response(&[0x01, 0x09, 8]).unwrap_err();
    assert_eq!(err.code, ErrorCode::BadFrame);
}

#[test]
fn trailing_and_missing_bytes_are_refused() {
    let full = payload_of(&request_frame(
        3,
        &Request::Begin {
            total_len: 99,
            digest: [1; 32],
        },
    ));
    let mut longer = full.clone();
    longer.push(0);
    assert_eq!(
        decode_request(&longer).unwrap_err().code,
        ErrorCode::BadFrame
    );
    for cut in 0..full.len() {
        let err = decode_request(&full[..cut]).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadFrame, "cut at {cut}");
        // Once the header is there, the device knows whom to answer.
        assert_eq!(err.seq, (cut >= 2).then_some(3), "cut at {cut}");
    }
    // Bad field values: an Option tag of 2, an unknown slot state, an unknown error code.
    let bad_option = payload_of(&response_frame(1, &Response::Info(typical_info())));
    let info_tag_at = bad_option.len() - 3; // last_event: Some(Installed { version: 7 })
    assert_eq!(bad_option[info_tag_at..], [1, 0, 7]);
    let mut p = bad_option.clone();
    p[info_tag_at] = 2;
    assert_eq!(decode_response(&p).unwrap_err().code, ErrorCode::BadFrame);
    let mut p = bad_option;
    p[info_tag_at + 1] = 3; // Event variant 3 does not exist
    assert_eq!(decode_response(&p).unwrap_err().code, ErrorCode::BadFrame);
    assert_eq!(
        decode_response(&[0x01, 0x01, 0x07, 0x06, 0x00])
            .unwrap_err()
            .code,
        ErrorCode::BadFrame,
        "error code 6 is not assigned"
    );
    // Invalid UTF-8 in a name.
    let mut info = payload_of(&response_frame(1, &Response::Info(typical_info())));
    let at = info.windows(3).position(|w| w == b"mps").unwrap();
    info[at] = 0xFF;
    assert_eq!(
        decode_response(&info).unwrap_err().code,
        ErrorCode::BadFrame
    );
}

#[test]
fn truncated_frames_are_refused() {
    let data: Vec<u8> = (1..=200).collect();
    for request in sample_requests(&data) {
        let frame = request_frame(11, &request);
        let body = &frame[..frame.len() - 1];
        for cut in 1..body.len() {
            // A frame cut short, then the delimiter (or the next frame's leading 0x00).
            let mut d = DeviceDecoder::new();
            let mut bytes = body[..cut].to_vec();
            bytes.push(0);
            let got = events(&mut d, &bytes);
            assert_eq!(got.len(), 1);
            assert!(got[0].is_err(), "{request:?} cut at {cut}: {:?}", got[0]);
            // And the decoder is back in step: the whole frame now decodes.
            let again = events(&mut d, &frame);
            assert!(matches!(again.as_slice(), [Ok(_)]));
        }
    }
}

#[test]
fn overlong_input_recovers_at_the_next_delimiter() {
    let valid = request_frame(2, &Request::Commit);
    let mut d = DeviceDecoder::new();
    // Far more non-zero garbage than the buffer holds, then a delimiter, then a valid frame.
    let mut stream = vec![0x41; 3 * MAX_REQUEST_FRAME_LEN];
    stream.push(0);
    stream.extend_from_slice(&valid);
    let got = events(&mut d, &stream);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0], Err(FrameError::TooLong));
    assert_eq!(
        decode_request(got[1].as_ref().unwrap()),
        Ok((2, Request::Commit))
    );
    // The same through feed_slice, cut at awkward places.
    let mut d = DeviceDecoder::new();
    let got2 = events_sliced(
        &mut d,
        &stream,
        &[
            1,
            MAX_REQUEST_FRAME_LEN,
            MAX_REQUEST_FRAME_LEN + 1,
            3 * MAX_REQUEST_FRAME_LEN,
        ],
    );
    assert_eq!(got, got2);
    // A frame of exactly the capacity (delimiter not counted) is accepted, one byte more is not.
    let fits = sealed(&[9; 10]); // 10 + 4 CRC → 15 COBS bytes + delimiter
    assert_eq!(fits.len(), 16);
    let mut d = FrameDecoder::<15>::new();
    assert_eq!(events(&mut d, &fits), [Ok(vec![9; 10])]);
    let mut d = FrameDecoder::<14>::new();
    assert_eq!(events(&mut d, &fits), [Err(FrameError::TooLong)]);
    assert_eq!(events(&mut d, &sealed(&[9; 9])), [Ok(vec![9; 9])]);
}

#[test]
fn frames_split_at_every_boundary_decode_the_same() {
    let mut stream = vec![0];
    stream.extend(request_frame(1, &Request::Info));
    stream.extend(request_frame(
        2,
        &Request::Chunk {
            offset: 512,
            data: &[0, 1, 0, 2, 0, 0, 3],
        },
    ));
    stream.extend([0x13, 0x37]); // garbage
    stream.push(0);
    stream.extend(request_frame(3, &Request::Infer { input: &[0; 300] }));
    let expected = events(&mut DeviceDecoder::new(), &stream);
    assert_eq!(expected.len(), 4);
    assert!(expected[2].is_err());
    for cut in 0..=stream.len() {
        let mut d = DeviceDecoder::new();
        assert_eq!(
            events_sliced(&mut d, &stream, &[cut]),
            expected,
            "cut at {cut}"
        );
    }
    for a in (0..stream.len()).step_by(7) {
        for b in (a..stream.len()).step_by(11) {
            let mut d = DeviceDecoder::new();
            assert_eq!(events_sliced(&mut d, &stream, &[a, b]), expected);
        }
    }
}

#[test]
fn empty_frames_are_skipped() {
    let frame = request_frame(4, &Request::Reset);
    let mut stream = vec![0, 0, 0];
    stream.extend(&frame);
    stream.extend([0, 0]);
    stream.extend(&frame);
    let got = events(&mut DeviceDecoder::new(), &stream);
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(Result::is_ok));
}

#[test]
fn single_bit_flips_in_a_full_chunk_frame_are_all_detected() {
    let data: Vec<u8> = (0..MAX_CHUNK).map(|i| (i * 7 % 251) as u8).collect();
    let frame = request_frame(
        1234,
        &Request::Chunk {
            offset: 8192,
            data: &data,
        },
    );
    assert_no_flip_is_accepted(&frame);
}

/// Flips every bit of `frame` in turn: the decoder must yield no payload at all (the CRC or
/// the COBS structure catches it), and recover for the next frame.
fn assert_no_flip_is_accepted(frame: &[u8]) {
    let mut d = FrameDecoder::<{ max_frame_len(2048) }>::new();
    let next = request_frame(1, &Request::Info);
    let mut flipped = frame.to_vec();
    for i in 0..frame.len() * 8 {
        flipped[i / 8] ^= 1 << (i % 8);
        let got = events(&mut d, &flipped);
        // A flipped delimiter leaves the frame open: the next frame's leading 0x00 closes it.
        let closing = events(&mut d, &[0]);
        assert!(
            got.iter().chain(&closing).all(Result::is_err),
            "bit {i} flipped was accepted: {got:?}"
        );
        flipped[i / 8] ^= 1 << (i % 8);
        assert!(matches!(events(&mut d, &next).as_slice(), [Ok(_)]));
    }
}

#[test]
fn frame_errors_map_to_error_codes_and_answer_with_seq_unknown() {
    for (e, code) in [
        (FrameError::TooLong, ErrorCode::FrameTooLong),
        (FrameError::BadCobs, ErrorCode::BadFrame),
        (FrameError::TooShort, ErrorCode::BadFrame),
        (FrameError::BadCrc, ErrorCode::BadCrc),
    ] {
        assert_eq!(ErrorCode::from(e), code);
        let (seq, reply) = DecodeError::from(e).reply();
        assert_eq!(seq, SEQ_UNKNOWN);
        assert_eq!(reply, Response::error(code, 0));
    }
    // A well-formed COBS frame whose last four bytes are not the CRC of the rest.
    let mut raw = payload_of(&request_frame(1, &Request::Info));
    raw.extend(frame::crc32(&raw).wrapping_add(1).to_le_bytes());
    assert_eq!(
        events(&mut DeviceDecoder::new(), &cobs_encode(&raw)),
        [Err(FrameError::BadCrc)]
    );
    // With the right CRC the same hand-made frame is accepted (the helper is faithful).
    let mut raw = payload_of(&request_frame(1, &Request::Info));
    raw.extend(frame::crc32(&raw).to_le_bytes());
    assert_eq!(
        events(&mut DeviceDecoder::new(), &cobs_encode(&raw)),
        [Ok(raw[..raw.len() - CRC_LEN].to_vec())]
    );
    // Too short for a CRC, and not COBS.
    assert_eq!(
        events(&mut DeviceDecoder::new(), &[0x02, 0x01, 0x00]),
        [Err(FrameError::TooShort)]
    );
    assert_eq!(
        events(&mut DeviceDecoder::new(), &[0x09, 0x01, 0x02, 0x00]),
        [Err(FrameError::BadCobs)]
    );
}

/// Plain COBS of `bytes` plus the delimiter (no CRC added), for hand-made bad frames.
fn cobs_encode(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    let mut code_at = 0;
    for &b in bytes {
        if b == 0 || out.len() - code_at == 255 {
            out[code_at] = (out.len() - code_at) as u8;
            code_at = out.len();
            out.push(0);
            if b == 0 {
                continue;
            }
        }
        out.push(b);
    }
    out[code_at] = (out.len() - code_at) as u8;
    out.push(0);
    out
}

#[test]
fn error_messages_are_one_line_and_say_what_to_do() {
    for code in ErrorCode::ALL {
        let text = code.to_string();
        assert!(!text.contains('\n'), "{code:?}");
        assert!(text.contains(';'), "{code:?} says what to do after a ';'");
        assert!(text.len() < 200, "{code:?} is short: {}", text.len());
    }
}

#[cfg(feature = "std")]
mod host {
    use super::*;
    use kiln_device::frame::read_frame;
    use kiln_device::protocol::{encode_request_vec, encode_response_vec};
    use std::io::{self, BufReader, Read};

    #[test]
    fn vec_encoders_match_slice_encoders() {
        let data = [1; 900];
        for request in sample_requests(&data) {
            assert_eq!(
                encode_request_vec(42, &request),
                request_frame(42, &request)
            );
        }
        for response in sample_responses(&data) {
            assert_eq!(
                encode_response_vec(42, &response),
                response_frame(42, &response)
            );
        }
    }

    #[test]
    fn read_frame_reads_one_frame_at_a_time() {
        let mut stream = b"boot log line\n".to_vec();
        stream.push(0);
        stream.extend(encode_response_vec(1, &Response::Ok));
        stream.extend(encode_response_vec(2, &Response::ChunkOk { next: 3 }));
        let mut reader = BufReader::with_capacity(5, stream.as_slice());
        let mut d = FrameDecoder::<4096>::new();
        assert!(read_frame(&mut reader, &mut d).unwrap().is_err());
        let p = read_frame(&mut reader, &mut d).unwrap().unwrap().to_vec();
        assert_eq!(decode_response(&p), Ok((1, Response::Ok)));
        let p = read_frame(&mut reader, &mut d).unwrap().unwrap().to_vec();
        assert_eq!(decode_response(&p), Ok((2, Response::ChunkOk { next: 3 })));
        assert_eq!(
            read_frame(&mut reader, &mut d).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    /// Hands out its bytes in pieces, timing out between them.
    struct Stuttering {
        pieces: Vec<Vec<u8>>,
        timed_out: bool,
    }

    impl Read for Stuttering {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if !self.timed_out {
                self.timed_out = true;
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.timed_out = false;
            if self.pieces.is_empty() {
                return Ok(0);
            }
            let piece = self.pieces.remove(0);
            buf[..piece.len()].copy_from_slice(&piece);
            Ok(piece.len())
        }
    }

    #[test]
    fn read_frame_resumes_after_a_timeout() {
        let frame = encode_request_vec(8, &Request::Infer { input: &[5; 40] });
        let pieces = frame.chunks(9).map(<[u8]>::to_vec).collect();
        let mut reader = BufReader::new(Stuttering {
            pieces,
            timed_out: false,
        });
        let mut d = FrameDecoder::<256>::new();
        let mut timeouts = 0;
        let payload = loop {
            match read_frame(&mut reader, &mut d) {
                Ok(r) => break r.unwrap().to_vec(),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => timeouts += 1,
                Err(e) => panic!("{e}"),
            }
        };
        assert!(timeouts >= 5);
        assert_eq!(
            decode_request(&payload),
            Ok((8, Request::Infer { input: &[5; 40] }))
        );
        assert!(d.is_idle());
    }
}

// ---------------------------------------------------------------------------------------------
// Property tests

/// Owned messages for proptest to generate (the wire types borrow).
#[derive(Clone, Debug)]
enum OwnedRequest {
    Info,
    Begin(u32, [u8; 32]),
    Chunk(u32, Vec<u8>),
    Commit,
    Key(Vec<u8>),
    Infer(Vec<u8>),
    Reset,
}

impl OwnedRequest {
    fn view(&self) -> Request<'_> {
        match self {
            OwnedRequest::Info => Request::Info,
            OwnedRequest::Begin(total_len, digest) => Request::Begin {
                total_len: *total_len,
                digest: *digest,
            },
            OwnedRequest::Chunk(offset, data) => Request::Chunk {
                offset: *offset,
                data,
            },
            OwnedRequest::Commit => Request::Commit,
            OwnedRequest::Key(record) => Request::InstallKeyRecord { record },
            OwnedRequest::Infer(input) => Request::Infer { input },
            OwnedRequest::Reset => Request::Reset,
        }
    }
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..=max),
        prop::collection::vec(prop_oneof![Just(0u8), Just(0xFF), Just(1)], 0..=max),
    ]
}

fn requests(max_data: usize) -> impl Strategy<Value = OwnedRequest> {
    prop_oneof![
        Just(OwnedRequest::Info),
        (any::<u32>(), any::<[u8; 32]>()).prop_map(|(l, d)| OwnedRequest::Begin(l, d)),
        (any::<u32>(), bytes(max_data)).prop_map(|(o, d)| OwnedRequest::Chunk(o, d)),
        Just(OwnedRequest::Commit),
        bytes(max_data).prop_map(OwnedRequest::Key),
        bytes(max_data).prop_map(OwnedRequest::Infer),
        Just(OwnedRequest::Reset),
    ]
}

#[derive(Clone, Debug)]
struct OwnedInfo {
    board: String,
    firmware: String,
    name: String,
    info: DeviceInfo<'static>,
    has_model: bool,
}

#[derive(Clone, Debug)]
enum OwnedResponse {
    Info(OwnedInfo),
    Borrowless(Response<'static>),
    InferOk(Vec<u8>, u32),
}

impl OwnedResponse {
    fn view(&self) -> Response<'_> {
        match self {
            OwnedResponse::Info(o) => {
                let mut info = DeviceInfo {
                    board: &o.board,
                    firmware: &o.firmware,
                    ..o.info
                };
                info.active = o
                    .info
                    .active
                    .filter(|_| o.has_model)
                    .map(|m| ModelInfo { name: &o.name, ..m });
                Response::Info(info)
            }
            OwnedResponse::Borrowless(r) => *r,
            OwnedResponse::InferOk(output, cycles) => Response::InferOk {
                output,
                cycles: *cycles,
            },
        }
    }
}

fn error_codes() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(ErrorCode::ALL.to_vec())
}

fn slot_states() -> impl Strategy<Value = SlotState> {
    prop_oneof![
        Just(SlotState::Empty),
        (any::<u32>(), any::<u32>())
            .prop_map(|(received, total)| SlotState::Receiving { received, total }),
        Just(SlotState::Ready),
        Just(SlotState::Trial),
        Just(SlotState::Active),
        Just(SlotState::Previous),
        Just(SlotState::Invalid),
    ]
}

fn slots() -> impl Strategy<Value = SlotInfo> {
    (slot_states(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
        |(state, version, security_counter, len)| SlotInfo {
            state,
            version,
            security_counter,
            len,
        },
    )
}

fn events_opt() -> impl Strategy<Value = Option<Event>> {
    prop::option::of(prop_oneof![
        any::<u32>().prop_map(|version| Event::Installed { version }),
        (any::<u32>(), error_codes())
            .prop_map(|(version, reason)| Event::Reverted { version, reason }),
        error_codes().prop_map(|reason| Event::Refused { reason }),
    ])
}

fn infos() -> impl Strategy<Value = OwnedInfo> {
    let model = (any::<u8>(), any::<u32>(), any::<u32>(), any::<[u32; 3]>()).prop_map(
        |(slot, version, security_counter, [arena_bytes, input_len, output_len])| ModelInfo {
            slot,
            version,
            security_counter,
            name: "",
            arena_bytes,
            input_len,
            output_len,
        },
    );
    (
        ("\\PC{0,20}", "\\PC{0,20}", "\\PC{0,20}"),
        (any::<u16>(), any::<bool>(), model, [slots(), slots()]),
        (any::<[u32; 3]>(), any::<u16>(), any::<u8>(), events_opt()),
    )
        .prop_map(
            |(
                (board, firmware, name),
                (protocol, has_model, model, slots),
                (
                    [security_counter, max_artifact_len, max_frame],
                    max_chunk,
                    trusted_keys,
                    last_event,
                ),
            )| OwnedInfo {
                board,
                firmware,
                name,
                has_model,
                info: DeviceInfo {
                    protocol,
                    board: "",
                    firmware: "",
                    active: Some(model),
                    slots,
                    security_counter,
                    max_artifact_len,
                    max_frame,
                    max_chunk,
                    trusted_keys,
                    last_event,
                },
            },
        )
}

fn responses(max_data: usize) -> impl Strategy<Value = OwnedResponse> {
    prop_oneof![
        infos().prop_map(OwnedResponse::Info),
        (any::<u32>(), any::<u16>()).prop_map(|(resume_from, max_chunk)| {
            OwnedResponse::Borrowless(Response::BeginOk {
                resume_from,
                max_chunk,
            })
        }),
        any::<u32>().prop_map(|next| OwnedResponse::Borrowless(Response::ChunkOk { next })),
        (any::<u32>(), any::<u8>()).prop_map(|(version, slot)| {
            OwnedResponse::Borrowless(Response::Committed { version, slot })
        }),
        any::<u8>().prop_map(|trusted_keys| {
            OwnedResponse::Borrowless(Response::KeyRecordOk { trusted_keys })
        }),
        (bytes(max_data), any::<u32>()).prop_map(|(o, c)| OwnedResponse::InferOk(o, c)),
        Just(OwnedResponse::Borrowless(Response::Ok)),
        (error_codes(), any::<u32>())
            .prop_map(|(code, detail)| OwnedResponse::Borrowless(Response::Error { code, detail })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_requests_round_trip(request in requests(MAX_CHUNK), seq in any::<u16>()) {
        let request = request.view();
        let frame = request_frame(seq, &request);
        prop_assert!(!frame[..frame.len() - 1].contains(&0));
        receive_request(&frame, &request, seq);
    }

    #[test]
    fn random_responses_round_trip(response in responses(600), seq in any::<u16>()) {
        let response = response.view();
        receive_response(&response_frame(seq, &response), &response, seq);
    }

    #[test]
    fn random_bytes_never_panic_and_the_decoder_stays_in_step(
        garbage in prop::collection::vec(any::<u8>(), 0..3000),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut d = FrameDecoder::<256>::new();
        let got = events_sliced(&mut d, &garbage, &[cut.index(garbage.len() + 1)]);
        // Random bytes almost never carry a valid CRC; when they do, the payload decoders
        // still only return Ok or Err.
        for payload in got.iter().flatten() {
            let _ = decode_request(payload);
            let _ = decode_response(payload);
        }
        // Payload decoders on the raw bytes: an error, never a panic.
        let _ = decode_request(&garbage);
        let _ = decode_response(&garbage);
        let _ = decode_frame(&mut garbage.clone());
        // After a delimiter, a valid frame decodes.
        let frame = request_frame(6, &Request::Commit);
        let mut tail = vec![0];
        tail.extend(&frame);
        let after = events(&mut d, &tail);
        prop_assert_eq!(after.last().map(|e| e.as_ref().map(|p| decode_request(p))), Some(Ok(Ok((6, Request::Commit)))));
    }

    #[test]
    fn random_payloads_behind_a_valid_crc_decode_or_fail_cleanly(
        payload in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..80),
            // Valid header, random body: reaches the message decoders.
            prop::collection::vec(any::<u8>(), 0..80).prop_map(|mut b| { b.splice(0..0, [1, 1]); b }),
            prop::collection::vec(0u8..9, 0..80).prop_map(|mut b| { b.splice(0..0, [1, 1]); b }),
        ],
    ) {
        let frame = sealed(&payload);
        let got = events(&mut FrameDecoder::<{ max_frame_len(80) + 8 }>::new(), &frame);
        prop_assert_eq!(&got, &[Ok(payload.clone())]);
        // Whatever decodes re-encodes to a frame that decodes to the same message.
        if let Ok((seq, request)) = decode_request(&payload) {
            let again = payload_of(&request_frame(seq, &request));
            prop_assert_eq!(decode_request(&again), Ok((seq, request)));
        }
        if let Ok((seq, response)) = decode_response(&payload) {
            let again = payload_of(&response_frame(seq, &response));
            prop_assert_eq!(decode_response(&again), Ok((seq, response)));
        }
    }

    #[test]
    fn truncated_payloads_are_refused(request in requests(64), seq in any::<u16>(), cut in any::<prop::sample::Index>()) {
        let payload = payload_of(&request_frame(seq, &request.view()));
        let cut = cut.index(payload.len());
        prop_assert!(decode_request(&payload[..cut]).is_err());
    }
}

proptest! {
    // Each case flips every bit of a frame: fewer, smaller cases.
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn any_single_bit_flip_is_detected(request in requests(48), response in responses(48), seq in any::<u16>()) {
        assert_no_flip_is_accepted(&request_frame(seq, &request.view()));
        assert_no_flip_is_accepted(&response_frame(seq, &response.view()));
    }
}

/// Writes fuzz seeds (a few frames, a stream of them and their payloads) into the folder named
/// by `KILN_FUZZ_SEEDS`; does nothing without it. See `fuzz/README.md`.
#[test]
fn dump_fuzz_seeds() {
    let Some(dir) = std::env::var_os("KILN_FUZZ_SEEDS") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data: Vec<u8> = (0..=255u8).cycle().take(300).collect();
    let mut stream = Vec::new();
    let write = |name: String, bytes: &[u8]| std::fs::write(dir.join(name), bytes).unwrap();
    for (i, request) in sample_requests(&data).iter().enumerate() {
        let frame = request_frame(i as u16 + 1, request);
        write(format!("request-{i}.frame"), &frame);
        write(format!("request-{i}.payload"), &payload_of(&frame));
        stream.extend(frame);
    }
    for (i, response) in sample_responses(&data).iter().enumerate().step_by(3) {
        let frame = response_frame(i as u16 + 1, response);
        write(format!("response-{i}.frame"), &frame);
        write(format!("response-{i}.payload"), &payload_of(&frame));
    }
    write("stream".into(), &stream);
}
