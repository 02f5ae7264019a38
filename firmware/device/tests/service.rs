//! The request loop over a byte stream: every malformed input gets an error frame, never a panic
//! or a reset, and the model in service is untouched.

use kiln_device::frame::FrameDecoder;
use kiln_device::powercut::{layout, Flash, Lab};
use kiln_device::protocol::{
    decode_response, encode_request_vec, ErrorCode, Request, Response, SlotState,
    MAX_REQUEST_FRAME_LEN,
};
use kiln_device::service::{Service, MIN_RESPONSE_BUF};
use kiln_device::Device;
use kiln_runtime::format::Container;
use proptest::prelude::*;

const SIZE: u32 = 12 * 1024;

/// A board on the simulator: bytes in, response frames out.
struct Board<'l> {
    lab: &'l Lab,
    service: Option<Service<'l, Flash>>,
    decoder: FrameDecoder<{ MAX_REQUEST_FRAME_LEN }>,
    arena: Vec<u8>,
    scratch: Vec<u8>,
    resets: usize,
}

fn slot_len() -> u32 {
    (SIZE + 8192).next_multiple_of(4096)
}

impl<'l> Board<'l> {
    fn new(lab: &'l Lab) -> Self {
        let mut b = Board {
            lab,
            service: None,
            decoder: FrameDecoder::new(),
            arena: vec![0u8; 64 * 1024],
            scratch: vec![0u8; 4096],
            resets: 0,
        };
        b.power_on(lab.flash());
        b
    }

    fn power_on(&mut self, flash: Flash) {
        let dev = Device::mount(flash, layout(slot_len()), self.lab.config()).unwrap();
        let mut s = Service::new(dev, "test-firmware 1");
        s.boot(&mut self.arena).unwrap();
        self.service = Some(s);
    }

    /// Feeds bytes; returns every response frame's decoded (seq, response) as owned debug text
    /// plus the raw frames.
    fn feed(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut replies = Vec::new();
        for &b in bytes {
            let Some(frame) = self.decoder.feed(b) else {
                continue;
            };
            let mut out = vec![0u8; MIN_RESPONSE_BUF.max(8192)];
            let svc = self.service.as_mut().unwrap();
            let reply = svc.handle(frame, &mut self.arena, &mut self.scratch, &mut out);
            assert!(reply.len > 0, "every frame gets an answer");
            replies.push(out[..reply.len].to_vec());
            if reply.reset_after {
                self.resets += 1;
                let flash = self.service.take().unwrap().into_device().into_flash();
                self.power_on(flash);
            }
        }
        replies
    }

    fn request(&mut self, seq: u16, r: &Request<'_>) -> Vec<u8> {
        let mut replies = self.feed(&encode_request_vec(seq, r));
        assert_eq!(replies.len(), 1);
        replies.pop().unwrap()
    }

    fn running_version(&self) -> Option<u32> {
        self.service
            .as_ref()
            .unwrap()
            .device()
            .running()
            .map(|r| r.version)
    }

    fn flash_artifact(&mut self, a: &[u8]) -> Response<'static> {
        let digest = *Container::parse(a).unwrap().digest;
        let frame = self.request(
            1,
            &Request::Begin {
                total_len: a.len() as u32,
                digest,
            },
        );
        let mut buf = frame.clone();
        let (_, r) = decode(&mut buf);
        let Response::BeginOk { resume_from, .. } = r else {
            return leak(r);
        };
        let mut at = resume_from as usize;
        let mut seq = 2;
        while at < a.len() {
            let end = (at + 1024).min(a.len());
            let mut f = self.request(
                seq,
                &Request::Chunk {
                    offset: at as u32,
                    data: &a[at..end],
                },
            );
            seq += 1;
            match decode(&mut f).1 {
                Response::ChunkOk { next } => at = next as usize,
                other => return leak(other),
            }
        }
        let mut f = self.request(seq, &Request::Commit);
        leak(decode(&mut f).1)
    }
}

fn leak(r: Response<'_>) -> Response<'static> {
    // Only variants without borrowed data are compared by the tests.
    match r {
        Response::BeginOk {
            resume_from,
            max_chunk,
        } => Response::BeginOk {
            resume_from,
            max_chunk,
        },
        Response::ChunkOk { next } => Response::ChunkOk { next },
        Response::Committed { version, slot } => Response::Committed { version, slot },
        Response::Error { code, detail } => Response::Error { code, detail },
        Response::KeyRecordOk { trusted_keys } => Response::KeyRecordOk { trusted_keys },
        Response::Ok => Response::Ok,
        other => panic!("unexpected {other:?}"),
    }
}

/// Decodes one response frame (delimiter included).
fn decode(frame: &mut [u8]) -> (u16, Response<'_>) {
    let n = frame.len() - 1;
    let payload = kiln_device::frame::decode_frame(&mut frame[..n]).unwrap();
    decode_response(payload).unwrap()
}

fn error_code(frame: &[u8]) -> ErrorCode {
    let mut f = frame.to_vec();
    match decode(&mut f).1 {
        Response::Error { code, .. } => code,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

#[test]
fn flash_over_frames_then_garbage_and_out_of_order_frames_change_nothing() {
    let lab = Lab::new(SIZE);
    let mut board = Board::new(&lab);
    let v1 = lab.artifact(1, 0, 0, false);
    assert!(matches!(
        board.flash_artifact(&v1),
        Response::Committed { version: 1, .. }
    ));
    assert_eq!(board.resets, 1, "commit resets into the trial boot");
    assert_eq!(board.running_version(), Some(1));

    // Garbage without delimiters, then a delimiter: one error frame.
    let r = board.feed(&[0x13, 0x77, 0xFE, 0x01, 0x02, 0x00]);
    assert_eq!(r.len(), 1);
    assert!(matches!(
        error_code(&r[0]),
        ErrorCode::BadFrame | ErrorCode::BadCrc
    ));
    // A valid frame with one flipped byte: CRC error.
    let mut f = encode_request_vec(9, &Request::Info);
    f[2] ^= 0x10;
    let r = board.feed(&f);
    assert_eq!(r.len(), 1);
    assert!(matches!(
        error_code(&r[0]),
        ErrorCode::BadCrc | ErrorCode::BadFrame
    ));
    // A truncated frame (delimiter arrives early).
    let f = encode_request_vec(10, &Request::Info);
    let mut cut = f[..f.len() / 2].to_vec();
    cut.push(0);
    let r = board.feed(&cut);
    assert_eq!(r.len(), 1);
    // Out of order: chunk and commit without begin.
    let r = board.request(
        11,
        &Request::Chunk {
            offset: 4096,
            data: &[1, 2, 3],
        },
    );
    assert_eq!(error_code(&r), ErrorCode::NoUpdateInProgress);
    let r = board.request(12, &Request::Commit);
    assert_eq!(error_code(&r), ErrorCode::NoUpdateInProgress);
    // An oversized frame (longer than the decoder holds) is dropped with one error.
    let mut long = vec![0x55u8; MAX_REQUEST_FRAME_LEN + 100];
    long.push(0);
    let r = board.feed(&long);
    assert_eq!(r.len(), 1);
    assert_eq!(error_code(&r[0]), ErrorCode::FrameTooLong);
    // Inference with a wrong input length.
    let r = board.request(13, &Request::Infer { input: &[0u8; 3] });
    assert_eq!(error_code(&r), ErrorCode::BadInputLength);

    // Nothing reset, v1 still runs, Info still answers with the right slots.
    assert_eq!(board.resets, 1);
    assert_eq!(board.running_version(), Some(1));
    let mut f = board.request(14, &Request::Info);
    let (seq, r) = decode(&mut f);
    assert_eq!(seq, 14);
    let Response::Info(info) = r else {
        panic!("expected Info")
    };
    let active = info.active.unwrap();
    assert_eq!(active.version, 1);
    assert_eq!(active.input_len, 256);
    assert_eq!(info.slots[active.slot as usize].state, SlotState::Active);
    assert_eq!(info.board, kiln_device::powercut::BOARD);
}

#[test]
fn refusals_come_back_as_error_codes() {
    let lab = Lab::new(SIZE);
    let mut board = Board::new(&lab);
    assert!(matches!(
        board.flash_artifact(&lab.artifact(2, 0, 0, false)),
        Response::Committed { .. }
    ));
    let cases = [
        (lab.artifact(1, 0, 0, false), ErrorCode::Downgrade),
        (lab.artifact(3, 0, 1, false), ErrorCode::UntrustedKey),
    ];
    for (a, code) in cases {
        assert_eq!(
            board.flash_artifact(&a),
            Response::Error {
                code,
                detail: if code == ErrorCode::Downgrade { 2 } else { 0 }
            }
        );
        assert_eq!(board.running_version(), Some(2));
    }
    // A failing self-test: committed, then reverted at the trial boot.
    assert!(matches!(
        board.flash_artifact(&lab.artifact(4, 0, 0, true)),
        Response::Committed { version: 4, .. }
    ));
    assert_eq!(board.running_version(), Some(2));
    let mut f = board.request(50, &Request::Info);
    let Response::Info(info) = decode(&mut f).1 else {
        panic!()
    };
    assert_eq!(
        info.last_event,
        Some(kiln_device::protocol::Event::Reverted {
            version: 4,
            reason: ErrorCode::SelfTestFailed
        })
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Arbitrary bytes never panic the service, never reset it, and the model keeps running.
    #[test]
    fn arbitrary_bytes_never_disturb_the_device(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
        thread_local! {
            static LAB: Lab = Lab::new(SIZE);
        }
        LAB.with(|lab| {
            let mut board = Board::new(lab);
            board.flash_artifact(&lab.artifact(1, 0, 0, false));
            let resets = board.resets;
            let replies = board.feed(&bytes);
            for r in &replies {
                let mut f = r.clone();
                let n = f.len() - 1;
                let payload = kiln_device::frame::decode_frame(&mut f[..n]).unwrap();
                decode_response(payload).unwrap();
            }
            // Random bytes never form a valid Reset or Commit (CRC-32), so no reset happens.
            assert_eq!(board.resets, resets);
            assert_eq!(board.running_version(), Some(1));
        });
    }
}
