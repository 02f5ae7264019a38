//! `kiln flash` / `kiln device-info` / `kiln infer` against a simulated board, no QEMU: a thread
//! serves the update protocol on a TCP port with `kiln_device::service::Service` over a
//! `Device` on the NOR flash simulator (the power-cut lab's layout, board `sim-board`, trusted
//! key `testkit::test_key(1)`). A `Commit` resets it like a real board: the device is mounted
//! again on the same flash and boots its trial, while the TCP connection stays open (as QEMU's
//! chardev does).
//!
//! The story: v2 installs and is confirmed; a tampered v3 is refused with its reason; v1 is
//! refused as not newer; a v4 whose self-test fails is tried and reverted, v2 stays; a transfer
//! cut off mid-way resumes on the next `kiln flash`; inference answers the host runtime's bytes;
//! a key record admits a new signing key; garbage, silence and a closed port fail fast with one
//! line.

use kiln::device_link::{self, Endpoint, FlashEvent, Link, OpError, Timeouts};
use kiln::npy::{self, OutputData};
use kiln_device::frame::FrameDecoder;
use kiln_device::powercut::{layout, Flash, Lab, BOARD};
use kiln_device::protocol::{
    decode_request, encode_response_vec, max_message_frame_len, ErrorCode, Request, Response,
    MAX_REQUEST_FRAME_LEN, SEQ_UNKNOWN,
};
use kiln_device::service::{Service, MIN_RESPONSE_BUF};
use kiln_device::testkit::{self, Spec};
use kiln_device::Device;
use kiln_runtime::format::{Container, SectionKind};
use serde_json::Value;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Artifact size: 25 chunks of 1 KiB.
const SIZE: u32 = 24 * 1024;
const FIRMWARE: &str = "sim-board-fw 1.0";
/// No test command may take longer than this.
const COMMAND_LIMIT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------------
// The simulated board.

/// Test hooks, armed from the test while the board runs.
#[derive(Default)]
struct Hooks {
    /// Close the connection when this many more `Chunk`s have been handled (0: never). The
    /// last one is stored but not answered.
    drop_after_chunks: AtomicUsize,
    /// Before each answer send garbage, a seq-0 error and a stale answer.
    noisy: AtomicBool,
    /// Do not answer every n-th `Chunk` (0: answer all): the host's resend gets
    /// `OffsetMismatch`.
    lose_every_nth_chunk_reply: AtomicUsize,
    /// Do not answer `Commit` (the reset still happens).
    lose_commit_reply: AtomicBool,
    /// Close the connection when the board resets (a USB serial port that goes away).
    close_on_reset: AtomicBool,
    /// Resets so far.
    resets: AtomicUsize,
}

struct Board {
    addr: SocketAddr,
    hooks: Arc<Hooks>,
    lab: Lab,
}

impl Board {
    fn serial(&self) -> String {
        format!("tcp:{}", self.addr)
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::parse(&self.serial(), 115_200).expect("endpoint")
    }

    fn link(&self) -> Link {
        Link::open(
            self.endpoint(),
            Timeouts::with_request(Duration::from_secs(5)),
        )
        .expect("link")
    }
}

/// Starts a board with an erased flash, serving connections one after the other.
fn start_board() -> Board {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let hooks = Arc::new(Hooks::default());
    let h = Arc::clone(&hooks);
    std::thread::spawn(move || {
        let connections = listener
            .incoming()
            .filter_map(Result::ok)
            .map(|s| Box::new(s) as Box<dyn Stream>);
        serve(connections, &h)
    });
    Board {
        addr,
        hooks,
        lab: Lab::new(SIZE),
    }
}

/// A 16-byte aligned, zeroed buffer (the interpreter's arena).
fn aligned(len: usize) -> Vec<u128> {
    vec![0u128; len.div_ceil(16)]
}

/// A byte stream to the host: a TCP connection or a pseudo-terminal.
trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// Serves each connection in turn, with one device whose state survives across connections.
fn serve(connections: impl Iterator<Item = Box<dyn Stream>>, hooks: &Hooks) {
    // The board's own lab: the same keys and layout as the test's (both are deterministic).
    let lab = Lab::new(SIZE);
    let layout = layout((SIZE + 8192).next_multiple_of(4096));
    let mut arena_words = aligned(64 * 1024);
    let arena: &mut [u8] = bytemuck::cast_slice_mut(&mut arena_words);
    let mut scratch = vec![0u8; 64 * 1024];
    let mut out = vec![0u8; MIN_RESPONSE_BUF.max(max_message_frame_len(64 * 1024))];
    let power_on = |flash: Flash, arena: &mut [u8]| {
        let device = Device::mount(flash, layout, lab.config()).expect("mount");
        let mut service = Service::new(device, FIRMWARE);
        service.boot(arena).expect("boot");
        service
    };
    let mut service = power_on(lab.flash(), arena);
    let mut decoder = FrameDecoder::<MAX_REQUEST_FRAME_LEN>::new();
    let mut chunks = 0usize;
    for mut stream in connections {
        decoder.reset();
        let mut buf = [0u8; 2048];
        'connection: loop {
            let n = match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
                    continue
                }
                Err(_) => break,
            };
            let mut input = &buf[..n];
            while !input.is_empty() {
                let (frame, rest) = decoder.feed_slice(input);
                input = rest;
                let Some(frame) = frame else { continue };
                let request = frame.ok().and_then(|p| decode_request(p).ok());
                let is_chunk = matches!(request, Some((_, Request::Chunk { .. })));
                let is_commit = matches!(request, Some((_, Request::Commit)));
                let seq = request.map_or(SEQ_UNKNOWN, |(s, _)| s);
                let reply = service.handle(frame, arena, &mut scratch, &mut out);
                if is_chunk {
                    let left = hooks.drop_after_chunks.load(Ordering::SeqCst);
                    if left == 1 {
                        hooks.drop_after_chunks.store(0, Ordering::SeqCst);
                        break 'connection;
                    }
                    if left > 1 {
                        hooks.drop_after_chunks.store(left - 1, Ordering::SeqCst);
                    }
                }
                if hooks.noisy.load(Ordering::SeqCst) {
                    let mut noise = vec![0x17, 0x42, 0x99, 0x00, 0x05, 0x01, 0x00];
                    noise.extend(encode_response_vec(
                        SEQ_UNKNOWN,
                        &Response::error(ErrorCode::BadCrc, 0),
                    ));
                    noise.extend(encode_response_vec(seq.wrapping_add(7), &Response::Ok));
                    if stream.write_all(&noise).is_err() {
                        break 'connection;
                    }
                }
                let nth = hooks.lose_every_nth_chunk_reply.load(Ordering::SeqCst);
                chunks += usize::from(is_chunk);
                let lose = (is_chunk && nth > 0 && chunks.is_multiple_of(nth))
                    || (is_commit && hooks.lose_commit_reply.load(Ordering::SeqCst));
                if !lose && stream.write_all(&out[..reply.len]).is_err() {
                    break 'connection;
                }
                if reply.reset_after {
                    hooks.resets.fetch_add(1, Ordering::SeqCst);
                    let flash = service.into_device().into_flash();
                    service = power_on(flash, arena);
                    if hooks.close_on_reset.load(Ordering::SeqCst) {
                        break 'connection;
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Artifacts and files.

fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-device-link-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write file");
    p
}

/// A signed artifact of the lab's size: version, self-test good or bad, signed by key 0
/// (the board's built-in key) unless told otherwise.
fn artifact(lab: &Lab, version: u32, bad_selftest: bool) -> Vec<u8> {
    lab.artifact(version, 0, 0, bad_selftest)
}

/// Flips a weight byte and re-seals the digest, keeping the old signature: the file is intact
/// but its signature no longer matches.
fn tamper_keeping_digest(a: &[u8]) -> Vec<u8> {
    let c = Container::parse(a).expect("artifact parses");
    let weights = c.section(SectionKind::Weights).expect("weights");
    let at = weights.as_ptr() as usize - a.as_ptr() as usize + weights.len() / 2;
    let sigs: Vec<([u8; 8], [u8; 64])> =
        c.signatures().map(|r| (*r.key_id, *r.signature)).collect();
    let mut body = a[..c.header.body_len as usize].to_vec();
    body[at] ^= 0x01;
    kiln::artifact::append_signed_trailer(&mut body, &sigs);
    body
}

// ---------------------------------------------------------------------------------------------
// Running the binary.

/// Runs `kiln` with a time limit: a hang fails the test instead of blocking it.
fn kiln(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kiln");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait for kiln").is_some() {
            return child.wait_with_output().expect("kiln output");
        }
        if started.elapsed() > COMMAND_LIMIT {
            let _ = child.kill();
            panic!("kiln {args:?} did not finish within {COMMAND_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            stderr(o)
        )
    })
}

/// Asserts a failure with one `error:` line that contains every one of `words`.
fn assert_fails_with(o: &Output, words: &[&str]) -> String {
    let err = stderr(o);
    assert!(!o.status.success(), "expected a failure; stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    assert_eq!(
        err.lines().filter(|l| l.contains("caused by")).count(),
        0,
        "{err}"
    );
    for w in words {
        assert!(lines[0].contains(w), "`{w}` missing from: {}", lines[0]);
    }
    // Shown with --nocapture, to read the messages as a person gets them.
    eprintln!("{}", lines[0]);
    lines[0].to_string()
}

/// Asserts a failure whose message (an `error:` line and its causes) contains every word.
fn assert_fails_mentioning(o: &Output, words: &[&str]) {
    let err = stderr(o);
    assert!(
        !o.status.success() && err.starts_with("error:"),
        "expected a failure: {err}"
    );
    for w in words {
        assert!(err.contains(w), "`{w}` missing from: {err}");
    }
}

fn flash(board: &Board, model: &Path) -> Output {
    kiln(&[
        "flash",
        "--serial",
        &board.serial(),
        "--json",
        path_str(model),
    ])
}

fn info(board: &Board) -> Value {
    let o = kiln(&["device-info", "--serial", &board.serial(), "--json"]);
    assert!(o.status.success(), "device-info failed: {}", stderr(&o));
    json(&o)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn flash_story_install_refuse_revert() {
    let board = start_board();
    let dir = temp_dir("story");
    let lab = &board.lab;

    // v2 on an empty board.
    let v2 = write(&dir, "v2.kiln", &artifact(lab, 2, false));
    let o = flash(&board, &v2);
    assert!(o.status.success(), "flash v2: {}", stderr(&o));
    let r = json(&o);
    assert_eq!(r["installed"], true);
    assert_eq!(r["version"], 2);
    assert_eq!(r["previous_version"], Value::Null);
    assert_eq!(r["resume_from"], 0);
    let i = info(&board);
    assert_eq!(i["active"]["version"], 2);
    assert_eq!(i["board"], BOARD);
    assert_eq!(i["firmware"], FIRMWARE);
    assert_eq!(i["last_event"]["kind"], "installed");
    assert_eq!(i["slots"].as_array().map(Vec::len), Some(2));
    assert_eq!(board.hooks.resets.load(Ordering::SeqCst), 1);

    // The table for people names the board and the active model.
    let o = kiln(&["device-info", "--serial", &board.serial()]);
    assert!(o.status.success());
    let table = stderr(&o);
    assert!(
        table.contains("sim-board") && table.contains("v2"),
        "{table}"
    );

    // A tampered v3 (digest re-sealed, signature stale): the device refuses it at commit.
    let v3 = write(
        &dir,
        "v3-tampered.kiln",
        &tamper_keeping_digest(&artifact(lab, 3, false)),
    );
    let o = flash(&board, &v3);
    assert_fails_with(&o, &["refused v3", "Commit", "BadSignature"]);
    let r = json(&o);
    assert_eq!(r["installed"], false);
    assert_eq!(r["error"], "refused");
    assert_eq!(r["device_error"], "BadSignature");
    assert_eq!(info(&board)["active"]["version"], 2);

    // A damaged file (digest no longer matches) is refused before the board is touched.
    let mut damaged = artifact(lab, 3, false);
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x80;
    let damaged = write(&dir, "v3-damaged.kiln", &damaged);
    let o = flash(&board, &damaged);
    assert_fails_with(&o, &["v3-damaged.kiln", "not a valid Kiln artifact"]);
    assert_eq!(json(&o)["error"], "artifact");

    // v1 is not newer than v2.
    let v1 = write(&dir, "v1.kiln", &artifact(lab, 1, false));
    let o = flash(&board, &v1);
    assert_fails_with(
        &o,
        &["already runs", "v2", "v1 is not newer", "--version 3"],
    );
    assert_eq!(json(&o)["error"], "not_newer");

    // Built for another board.
    let mut spec = Spec::sized(5, SIZE);
    spec.target = "other-board".into();
    let other = write(&dir, "other.kiln", &testkit::signed(&spec, &lab.keys[0]));
    let o = flash(&board, &other);
    assert_fails_with(&o, &["other-board", "sim-board", "--target sim-board"]);

    // v4 passes every check but fails its self-test on the board: tried, then reverted.
    let v4 = write(&dir, "v4-bad-selftest.kiln", &artifact(lab, 4, true));
    let o = flash(&board, &v4);
    let line = assert_fails_with(&o, &["reverted v4", "SelfTestFailed", "active now: v2"]);
    assert!(line.len() < 400, "{line}");
    let r = json(&o);
    assert_eq!(r["error"], "reverted");
    assert_eq!(r["device_error"], "SelfTestFailed");
    let i = info(&board);
    assert_eq!(i["active"]["version"], 2);
    assert_eq!(i["last_event"]["kind"], "reverted");
    assert_eq!(i["last_event"]["version"], 4);
    assert_eq!(i["last_event"]["reason"], "SelfTestFailed");

    // And the board still takes a good update afterwards.
    let v5 = write(&dir, "v5.kiln", &artifact(lab, 5, false));
    let o = flash(&board, &v5);
    assert!(o.status.success(), "flash v5: {}", stderr(&o));
    assert_eq!(json(&o)["previous_version"], 2);
    let i = info(&board);
    assert_eq!(i["active"]["version"], 5);
    let states: Vec<&str> = i["slots"]
        .as_array()
        .expect("slots")
        .iter()
        .filter_map(|s| s["state"].as_str())
        .collect();
    assert!(
        states.contains(&"active") && states.contains(&"previous"),
        "{states:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn interrupted_transfer_resumes_on_the_next_flash() {
    let board = start_board();
    let dir = temp_dir("resume");
    let v2 = write(&dir, "v2.kiln", &artifact(&board.lab, 2, false));

    board.hooks.drop_after_chunks.store(10, Ordering::SeqCst);
    let o = flash(&board, &v2);
    assert_fails_with(
        &o,
        &[
            "transfer stopped at byte 9216",
            "closed the connection",
            "resume",
        ],
    );
    assert_eq!(json(&o)["error"], "interrupted");
    let i = info(&board);
    assert_eq!(i["active"], Value::Null);
    let receiving = i["slots"]
        .as_array()
        .expect("slots")
        .iter()
        .find(|s| s["state"] == "receiving")
        .cloned()
        .expect("a slot is receiving");
    assert_eq!(receiving["received"], 10 * 1024);

    let o = flash(&board, &v2);
    assert!(o.status.success(), "second flash: {}", stderr(&o));
    let r = json(&o);
    assert_eq!(r["resume_from"], 10 * 1024);
    let total = r["total_bytes"].as_u64().expect("total");
    assert_eq!(r["bytes_sent"].as_u64(), Some(total - 10 * 1024));
    assert_eq!(info(&board)["active"]["version"], 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn infer_answers_what_the_host_runtime_computes() {
    let board = start_board();
    let dir = temp_dir("infer");
    let v2 = artifact(&board.lab, 2, false);
    let model = write(&dir, "v2.kiln", &v2);

    // Flash through the library, watching the events.
    let mut link = board.link();
    let mut events = Vec::new();
    let report = device_link::flash(&mut link, &v2, &mut |e| events.push(e)).expect("flash v2");
    // The board serves one connection at a time: the CLI runs below need it free.
    assert_eq!(report.version, 2);
    assert_eq!(report.chunks as usize, v2.len().div_ceil(1024));
    assert!(matches!(
        events.first(),
        Some(FlashEvent::Begin { resume_from: 0, .. })
    ));
    assert!(matches!(
        events.last(),
        Some(FlashEvent::Committed { version: 2 })
    ));
    let info = device_link::device_info(&mut link).expect("info");
    let active = info.active.clone().expect("active model");
    assert_eq!((active.version, active.input_len), (2, 64 * 4));
    drop(link);

    // Three samples of the model's [1, 64] f32 input.
    let x: Vec<f32> = (0..3 * 64)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    let input = dir.join("x.npy");
    npy::write_npy(&input, &[3, 64], OutputData::F32(&x)).expect("write x");
    let expected = kiln::runner::run_batch(
        &v2,
        &npy::Array::F32 {
            shape: vec![3, 64],
            data: x.clone(),
        },
        |_| {},
    )
    .expect("host run");
    let kiln::runner::Outputs::F32(want) = &expected.outputs else {
        panic!("the test model has f32 outputs")
    };

    // Typed: --model gives the output its type and shape.
    let typed = dir.join("y.npy");
    let o = kiln(&[
        "infer",
        "--serial",
        &board.serial(),
        "--input",
        path_str(&input),
        "--all",
        "--model",
        path_str(&model),
        "--output",
        path_str(&typed),
        "--json",
    ]);
    assert!(o.status.success(), "infer: {}", stderr(&o));
    assert_eq!(json(&o)["dtype"], "float32");
    let y = npy::read_real(&typed, None, None).expect("read y");
    assert_eq!(y.shape(), expected.shape.as_slice());
    let npy::Array::F32 { data: got, .. } = y else {
        panic!("f32 outputs")
    };
    assert_eq!(
        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );

    // Raw: sample 1's output bytes as int8 [1, output_len].
    let raw = dir.join("y1.npy");
    let o = kiln(&[
        "infer",
        "--serial",
        &board.serial(),
        "--input",
        path_str(&input),
        "--index",
        "1",
        "--output",
        path_str(&raw),
    ]);
    assert!(o.status.success(), "raw infer: {}", stderr(&o));
    let (shape, bytes) = read_i8(&raw);
    assert_eq!(shape, vec![1, active.output_len as usize]);
    let per = want.len() / 3;
    let want_bytes: Vec<u8> = want[per..2 * per]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(
        bytemuck::cast_slice::<i8, u8>(&bytes),
        want_bytes.as_slice()
    );

    // Several samples without --index / --all, and samples of the wrong size.
    let o = kiln(&[
        "infer",
        "--serial",
        &board.serial(),
        "--input",
        path_str(&input),
        "--output",
        path_str(&raw),
    ]);
    assert_fails_mentioning(&o, &["x.npy", "3 samples", "--index", "--all"]);
    let short = dir.join("short.npy");
    npy::write_npy(&short, &[2, 48], OutputData::F32(&x[..96])).expect("write");
    let o = kiln(&[
        "infer",
        "--serial",
        &board.serial(),
        "--input",
        path_str(&short),
        "--all",
        "--output",
        path_str(&raw),
    ]);
    assert_fails_mentioning(&o, &["short.npy", "256-byte input"]);

    // The library refuses a wrong length before sending.
    let mut link = board.link();
    let e = device_link::infer(&mut link, &info, &[0u8; 10]).unwrap_err();
    assert!(
        matches!(
            e,
            OpError::InputLength {
                got: 10,
                expected: 256
            }
        ),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn read_i8(p: &Path) -> (Vec<usize>, Vec<i8>) {
    match npy::read_input(p).expect("read npy") {
        npy::Array::I8 { shape, data } => (shape, data),
        npy::Array::F32 { .. } => panic!("{} is not int8", p.display()),
    }
}

#[test]
fn a_noisy_line_costs_nothing_but_skipped_frames() {
    let board = start_board();
    board.hooks.noisy.store(true, Ordering::SeqCst);
    let mut link = board.link();
    let v2 = artifact(&board.lab, 2, false);
    let report = device_link::flash(&mut link, &v2, &mut |_| {}).expect("flash over noise");
    assert_eq!(report.device.active.as_ref().map(|a| a.version), Some(2));
    let stats = link.stats();
    assert!(stats.bad_frames >= report.chunks as u64, "{stats:?}");
    assert!(stats.stale >= report.chunks as u64, "{stats:?}");
    assert_eq!(stats.retries, 0, "{stats:?}");
}

#[test]
fn lost_answers_and_a_dropped_link_after_the_reset_are_recovered() {
    let board = start_board();
    board
        .hooks
        .lose_every_nth_chunk_reply
        .store(7, Ordering::SeqCst);
    board.hooks.lose_commit_reply.store(true, Ordering::SeqCst);
    board.hooks.close_on_reset.store(true, Ordering::SeqCst);
    let endpoint = board.endpoint();
    let mut link =
        Link::open(endpoint, Timeouts::with_request(Duration::from_millis(200))).expect("link");
    let v2 = artifact(&board.lab, 2, false);
    let report = device_link::flash(&mut link, &v2, &mut |_| {}).expect("flash with losses");
    assert_eq!(report.version, 2);
    // Each lost ChunkOk costs one resend, answered by OffsetMismatch: a resync. (25 chunks
    // and 4 resends: every 7th of the 29 requests lost its answer.)
    let stats = link.stats();
    assert_eq!(report.resyncs, 4, "{report:?}");
    assert_eq!(stats.retries, 4, "{stats:?}");
    assert_eq!(report.bytes_sent, v2.len() as u64);
    assert_eq!(stats.reconnects, 1, "{stats:?}");
    assert_eq!(board.hooks.resets.load(Ordering::SeqCst), 1);
    assert_eq!(
        device_link::device_info(&mut link)
            .expect("info")
            .active
            .map(|a| a.version),
        Some(2)
    );
}

#[test]
fn key_record_admits_a_new_signing_key() {
    let board = start_board();
    let dir = temp_dir("keys");
    let lab = &board.lab;
    // Signed by key 1, which the board does not trust yet.
    let by_new_key = write(&dir, "v2-new-key.kiln", &lab.artifact(2, 0, 1, false));
    let o = flash(&board, &by_new_key);
    assert_fails_with(&o, &["UntrustedKey"]);

    let record = write(&dir, "admit.kkey", &lab.admit(1, 0));
    let o = kiln(&[
        "flash",
        "--serial",
        &board.serial(),
        "--key-record",
        path_str(&record),
        "--json",
    ]);
    assert!(o.status.success(), "key record: {}", stderr(&o));
    assert_eq!(json(&o)["key_record"]["trusted_keys"], 2);
    assert_eq!(info(&board)["trusted_keys"], 2);

    let o = flash(&board, &by_new_key);
    assert!(
        o.status.success(),
        "flash after the key record: {}",
        stderr(&o)
    );

    let junk = write(&dir, "junk.kkey", b"not a key record");
    let o = kiln(&[
        "flash",
        "--serial",
        &board.serial(),
        "--key-record",
        path_str(&junk),
    ]);
    assert_fails_with(&o, &["junk.kkey", "malformed key record", "kiln admit-key"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A server that accepts and then only sends what `answer` makes of the bytes it gets.
fn fake_board(answer: fn(&[u8]) -> Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_millis(20)));
            let started = Instant::now();
            let mut buf = [0u8; 4096];
            // Bounded: the client gives up long before.
            while started.elapsed() < Duration::from_secs(60) {
                let got = match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => &buf[..n],
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        &[]
                    }
                    Err(_) => break,
                };
                if stream.write_all(&answer(got)).is_err() {
                    break;
                }
            }
        }
    });
    addr
}

#[test]
fn garbage_answers_fail_fast_with_a_clear_error() {
    // Random-looking bytes with a delimiter now and then: never a valid frame.
    let addr = fake_board(|_| {
        (1u8..=200)
            .map(|i| i.wrapping_mul(37) | 1)
            .chain([0])
            .collect()
    });
    let serial = format!("tcp:{addr}");
    let started = Instant::now();
    let o = kiln(&["device-info", "--serial", &serial, "--timeout", "0.5"]);
    assert_fails_with(
        &o,
        &[
            &serial,
            "unreadable frame",
            "Info",
            "--baud",
            "Kiln firmware",
        ],
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );

    // The library says the same, as a typed error.
    let endpoint = Endpoint::parse(&serial, 115_200).expect("endpoint");
    let mut link =
        Link::open(endpoint, Timeouts::with_request(Duration::from_millis(300))).expect("connect");
    link.set_retries(1);
    match device_link::device_info(&mut link) {
        Err(OpError::Link(device_link::LinkError::NoAnswer {
            tries: 2,
            bad_frames,
            ..
        })) => {
            assert!(bad_frames > 0)
        }
        other => panic!("expected NoAnswer, got {other:?}"),
    }
}

#[test]
fn a_silent_board_times_out() {
    let addr = fake_board(|_| Vec::new());
    let serial = format!("tcp:{addr}");
    let started = Instant::now();
    let o = kiln(&[
        "flash",
        "--serial",
        &serial,
        "--timeout",
        "0.3",
        "missing.kiln",
    ]);
    // The file is read first: a missing file fails before the board is touched.
    assert!(!o.status.success() && stderr(&o).contains("cannot read missing.kiln"));
    let o = kiln(&["device-info", "--serial", &serial, "--timeout", "0.3"]);
    assert_fails_with(&o, &["no answer from", &serial, "Info", "4 tries"]);
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn an_unreachable_port_is_a_clear_error() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("address").port()
    };
    let serial = format!("tcp:127.0.0.1:{port}");
    let started = Instant::now();
    let o = kiln(&["device-info", "--serial", &serial, "--timeout", "0.5"]);
    assert_fails_with(&o, &["cannot connect to", &serial, "0.5 s", "running"]);
    assert!(started.elapsed() < Duration::from_secs(20));

    let o = kiln(&["device-info", "--serial", "ttyUSB0"]);
    assert_fails_with(&o, &["`ttyUSB0` is not a device address", "tcp:HOST:PORT"]);
    let o = kiln(&[
        "device-info",
        "--serial",
        "/dev/kiln-no-such-port",
        "--timeout",
        "0.2",
    ]);
    assert_fails_with(&o, &["cannot open serial port /dev/kiln-no-such-port"]);
    // A connection that is refused at once is not a hang either.
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[cfg(unix)]
#[test]
fn a_serial_port_by_path_works_like_a_socket() {
    // A pseudo-terminal pair stands in for a USB serial adapter: the board serves the master
    // side, kiln opens the slave by its path, at 115200 8N1, like /dev/ttyACM0.
    let (master, slave) = serialport::TTYPort::pair().expect("pseudo-terminal");
    let path = serialport::SerialPort::name(&slave).expect("slave path");
    let hooks = Arc::new(Hooks::default());
    let h = Arc::clone(&hooks);
    std::thread::spawn(move || serve(std::iter::once(Box::new(master) as Box<dyn Stream>), &h));
    let lab = Lab::new(SIZE);
    let dir = temp_dir("pty");
    let v2 = write(&dir, "v2.kiln", &artifact(&lab, 2, false));
    let o = kiln(&[
        "flash",
        "--serial",
        &path,
        "--baud",
        "115200",
        "--json",
        path_str(&v2),
    ]);
    assert!(o.status.success(), "flash over a tty: {}", stderr(&o));
    assert_eq!(json(&o)["device"]["active"]["version"], 2);
    assert_eq!(hooks.resets.load(Ordering::SeqCst), 1);
    drop(slave);
    let _ = std::fs::remove_dir_all(&dir);
}
