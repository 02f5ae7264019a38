//! Smoke test of the board image `kiln-board-mps2-an386` (firmware/boards/mps2-an386) under
//! QEMU: builds it with a trusted key, boots it with UART0 on a TCP port, and speaks the update
//! protocol to it directly (`kiln_device::protocol` and `kiln_device::frame`):
//!
//! 1. `Info` on a fresh board: no model; `Infer` is refused with `NoModel`.
//! 2. Garbage bytes and a frame with a bad CRC get error frames back; the next `Info` works.
//! 3. A signed 54 KB artifact goes over Begin / Chunk / Commit; the board resets itself into the
//!    trial boot (the TCP connection survives), passes the self-test, and `Info` shows it active.
//! 4. `Infer` answers what the host runtime computes; a wrong input length is `BadInputLength`.
//! 5. An artifact signed by an untrusted key is refused at `Commit`.
//! 6. An artifact whose self-test fails is committed, tried and reverted; v1 stays in service.
//!
//! Skips (passes with a message) when `qemu-system-arm` is not installed. The image is built in
//! release into `target/firmware`, with a key kept in `target/firmware/board-qemu-test` so that
//! later runs reuse the build.

use kiln::signing::{generate_key, load_signing_key, sign_artifact, write_key_pair};
use kiln_device::frame::{max_frame_len, read_frame, FrameDecoder, FrameError};
use kiln_device::protocol::{
    decode_response, encode_request_vec, DeviceInfo, ErrorCode, Event, Request, Response,
    SlotState, MAX_CHUNK, SEQ_UNKNOWN,
};
use kiln_device::testkit::{self, Spec};
use kiln_runtime::format::Container;
use kiln_runtime::interpreter::Arena;
use kiln_runtime::{Interpreter, Model};
use std::io::{BufReader, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const BOARD: &str = "mps2-an386";
const TARGET: &str = "thumbv7em-none-eabihf";
/// Responses are an `Info` or small inference outputs.
const RESPONSE_FRAME_LEN: usize = max_frame_len(16 * 1024);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tools/ has a parent")
        .to_path_buf()
}

fn have_qemu() -> bool {
    Command::new("qemu-system-arm")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The signing key the image trusts: made once with `kiln::signing` and kept next to the build,
/// so that the image is rebuilt only when its sources change.
fn board_key(dir: &Path) -> (ed25519_dalek::SigningKey, PathBuf) {
    let name = dir.join("board");
    let (secret, public) = (dir.join("board.key"), dir.join("board.pub"));
    if let (Ok(key), true) = (load_signing_key(&secret), public.exists()) {
        return (key, public);
    }
    let key = generate_key().expect("random key");
    let paths = write_key_pair(&name, &key, true).expect("write the board key pair");
    (key, paths.public)
}

/// The board image and the key it trusts, made once per test process: the tests run in
/// parallel and must not race on the key files or build the image twice.
struct Board {
    key: ed25519_dalek::SigningKey,
    public: PathBuf,
    elf: PathBuf,
}

fn board() -> &'static Board {
    static BOARD: OnceLock<Board> = OnceLock::new();
    BOARD.get_or_init(|| {
        let root = repo_root();
        let (key, public) = board_key(&root.join("target/firmware/board-qemu-test"));
        let elf = build_image(&root, &public);
        Board { key, public, elf }
    })
}

/// Builds the board image trusting `public`; returns the ELF's path.
fn build_image(root: &Path, public: &Path) -> PathBuf {
    let target_dir = root.join("target/firmware");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let started = Instant::now();
    let out = Command::new(cargo)
        .current_dir(root.join("firmware/boards/mps2-an386"))
        .args(["build", "--release", "--target", TARGET])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("KILN_TRUSTED_KEYS", public)
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "building the board image failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "board image built in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    target_dir
        .join(TARGET)
        .join("release/kiln-board-mps2-an386")
}

/// QEMU running the image; killed when dropped. Its stdout (the semihosting log) is collected.
struct Qemu {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Qemu {
    fn start(elf: &Path, port: u16) -> Qemu {
        let mut child = Command::new("qemu-system-arm")
            .args([
                "-M",
                "mps2-an386",
                "-cpu",
                "cortex-m4",
                "-nographic",
                "-monitor",
            ])
            .args(["none", "-semihosting-config", "enable=on,target=native"])
            .arg("-serial")
            .arg(format!(
                "tcp:127.0.0.1:{port},server=on,wait=off,nodelay=on"
            ))
            .arg("-kernel")
            .arg(elf)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qemu-system-arm");
        let log = Arc::new(Mutex::new(String::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || collect(pipe, &log));
        }
        Qemu { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits until the log contains `needle` `count` times.
    fn wait_for_log(&mut self, needle: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.log().matches(needle).count() < count {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("QEMU exited ({status}) before the board logged {needle:?}");
            }
            assert!(
                Instant::now() < deadline,
                "the board did not log {needle:?} within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn collect(mut pipe: Box<dyn Read + Send>, log: &Mutex<String>) {
    let mut buf = [0u8; 512];
    while let Ok(n) = pipe.read(&mut buf) {
        if n == 0 {
            break;
        }
        if let Ok(mut l) = log.lock() {
            l.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- board log (QEMU stdout) ---\n{}", self.log());
        }
    }
}

/// A free TCP port on the loopback interface (bound, then released for QEMU).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    listener.local_addr().expect("local address").port()
}

/// The host end of the serial line.
struct Link {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    decoder: Box<FrameDecoder<RESPONSE_FRAME_LEN>>,
    seq: u16,
}

impl Link {
    fn connect(port: u16, timeout: Duration) -> Link {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "QEMU's serial port {port} did not accept a connection: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        stream.set_nodelay(true).expect("nodelay");
        let reader = BufReader::new(stream.try_clone().expect("clone the stream"));
        Link {
            writer: stream,
            reader,
            decoder: Box::new(FrameDecoder::new()),
            seq: 0,
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write to QEMU");
    }

    /// The next frame from the board (its payload, or why it was refused); `None` on timeout.
    fn next_frame(&mut self, timeout: Duration) -> Option<Result<Vec<u8>, FrameError>> {
        let timeout = timeout.max(Duration::from_millis(1));
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .expect("set a read timeout");
        match read_frame(&mut self.reader, &mut *self.decoder) {
            Ok(frame) => Some(frame.map(<[u8]>::to_vec)),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
            Err(e) => panic!("the serial connection failed ({e}): the board stopped?"),
        }
    }

    /// Sends `request` and returns the payload of its response. Follows the protocol's host
    /// rules: a `0x00` before the request, responses with another seq ignored, and on a timeout
    /// or a seq-0 error (our frame was damaged, e.g. by a reset) the same request again.
    fn call(&mut self, request: &Request<'_>, timeout: Duration) -> Vec<u8> {
        self.seq = self.seq.wrapping_add(1).max(1);
        let seq = self.seq;
        let frame = encode_request_vec(seq, request);
        for _attempt in 0..4 {
            self.send_raw(&[0]);
            self.send_raw(&frame);
            let deadline = Instant::now() + timeout;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                let Some(Ok(payload)) = self.next_frame(left) else {
                    if Instant::now() >= deadline {
                        break;
                    }
                    continue;
                };
                match decode_response(&payload) {
                    Ok((s, _)) if s == seq => return payload,
                    Ok((SEQ_UNKNOWN, Response::Error { .. })) => break,
                    _ => {}
                }
            }
        }
        panic!("the board did not answer {} (seq {seq})", request.name());
    }
}

const SHORT: Duration = Duration::from_secs(5);
const LONG: Duration = Duration::from_secs(60);

fn response(payload: &[u8]) -> Response<'_> {
    decode_response(payload).expect("a response decodes").1
}

fn info(link: &mut Link) -> Vec<u8> {
    link.call(&Request::Info, SHORT)
}

fn as_info(payload: &[u8]) -> DeviceInfo<'_> {
    match response(payload) {
        Response::Info(i) => i,
        other => panic!("expected Info, got {other:?}"),
    }
}

fn expect_error(payload: &[u8], code: ErrorCode) -> u32 {
    match response(payload) {
        Response::Error { code: c, detail } if c == code => detail,
        other => panic!("expected Error {{ {} }}, got {other:?}", code.name()),
    }
}

/// What [`send_update`] saw.
struct Update {
    /// The Commit response's payload.
    commit: Vec<u8>,
    /// Begin to the last ChunkOk.
    transfer: Duration,
    /// Commit to its response (hashing, signature check, state write).
    verify: Duration,
}

/// Sends `artifact` with Begin / Chunk / Commit.
fn send_update(link: &mut Link, artifact: &[u8]) -> Update {
    let digest = *Container::parse(artifact).expect("artifact parses").digest;
    let started = Instant::now();
    let total_len = artifact.len() as u32;
    let begin = link.call(&Request::Begin { total_len, digest }, LONG);
    let (mut offset, max_chunk) = match response(&begin) {
        Response::BeginOk {
            resume_from,
            max_chunk,
        } => (resume_from as usize, max_chunk as usize),
        other => panic!("expected BeginOk, got {other:?}"),
    };
    assert!(
        (1..=MAX_CHUNK).contains(&max_chunk),
        "max_chunk {max_chunk}"
    );
    while offset < artifact.len() {
        let end = (offset + max_chunk).min(artifact.len());
        let request = Request::Chunk {
            offset: offset as u32,
            data: &artifact[offset..end],
        };
        let reply = link.call(&request, SHORT);
        offset = match response(&reply) {
            Response::ChunkOk { next } => next as usize,
            // A repeated chunk: continue where the board is.
            Response::Error {
                code: ErrorCode::OffsetMismatch,
                detail,
            } if (detail as usize) <= artifact.len() => detail as usize,
            other => panic!("chunk at {offset}: expected ChunkOk, got {other:?}"),
        };
    }
    let transfer = started.elapsed();
    let started = Instant::now();
    let commit = link.call(&Request::Commit, LONG);
    Update {
        commit,
        transfer,
        verify: started.elapsed(),
    }
}

/// Output of `artifact`'s model on `input`, computed on the host.
fn host_infer(artifact: &[u8], input: &[u8]) -> Vec<u8> {
    let aligned = testkit::aligned(artifact);
    let model = Model::load(aligned.as_slice()).expect("model loads");
    let mut arena = Box::new(Arena::<{ 64 * 1024 }>::new());
    let arena = arena
        .as_mut_slice()
        .get_mut(..model.arena_bytes())
        .expect("arena fits");
    let mut interp = Interpreter::new(model, arena).expect("interpreter");
    interp
        .input_bytes_mut(0)
        .expect("input")
        .copy_from_slice(input);
    interp.invoke().expect("invoke");
    interp.output_bytes(0).expect("output").to_vec()
}

#[test]
fn board_takes_an_update_over_uart_and_runs_it() {
    if !have_qemu() {
        eprintln!(
            "skipped: qemu-system-arm is not installed (apt-get install qemu-system-arm); \
             the mps2-an386 board image was not tested"
        );
        return;
    }
    let Board { key, elf, .. } = board();

    let port = free_port();
    let mut qemu = Qemu::start(elf, port);
    let mut link = Link::connect(port, Duration::from_secs(20));
    let test_started = Instant::now();

    // 1. A fresh board: no model.
    let payload = info(&mut link);
    let fresh = as_info(&payload);
    assert_eq!(fresh.board, BOARD);
    assert!(
        fresh.firmware.starts_with("kiln-board-mps2-an386"),
        "{fresh:?}"
    );
    assert_eq!(fresh.active, None);
    assert_eq!(fresh.trusted_keys, 1);
    assert_eq!(fresh.max_artifact_len, 512 * 1024);
    qemu.wait_for_log("no model yet", 1, SHORT);
    let reply = link.call(&Request::Infer { input: &[0; 16] }, SHORT);
    expect_error(&reply, ErrorCode::NoModel);

    // 2. Garbage and a corrupted frame: error frames with seq 0, then business as usual.
    link.send_raw(b"\x00this is not a frame \xff\x13\x00");
    let mut bad_crc = encode_request_vec(77, &Request::Info);
    bad_crc[1] ^= 0x5A; // a data byte (byte 0 is a COBS code byte): only the CRC can tell
    link.send_raw(&bad_crc);
    let mut codes = Vec::new();
    while codes.len() < 2 {
        let frame = link
            .next_frame(SHORT)
            .expect("an error frame for each bad frame");
        let payload = frame.expect("the board's frames are intact");
        match decode_response(&payload).expect("a response") {
            (SEQ_UNKNOWN, Response::Error { code, .. }) => codes.push(code),
            other => panic!("expected a seq-0 error, got {other:?}"),
        }
    }
    assert!(
        matches!(codes[0], ErrorCode::BadFrame | ErrorCode::BadCrc),
        "{codes:?}"
    );
    assert_eq!(codes[1], ErrorCode::BadCrc);
    assert_eq!(as_info(&info(&mut link)).active, None);

    // 3. A signed 54 KB model: transfer, commit, reset into the trial, self-test, confirmed.
    let v1 = Spec {
        target: BOARD.into(),
        ..Spec::sized(1, 54_000)
    };
    let v1 = sign_artifact(&testkit::build(&v1), key, 1, 0, Some(BOARD)).expect("sign v1");
    let update = send_update(&mut link, &v1);
    let committed_at = Instant::now();
    let slot = match response(&update.commit) {
        Response::Committed { version: 1, slot } => slot,
        other => panic!("expected Committed v1, got {other:?}"),
    };
    qemu.wait_for_log("installed v1", 1, LONG);
    let trial = committed_at.elapsed();
    let payload = info(&mut link);
    let installed = as_info(&payload);
    let active = installed.active.expect("v1 is active");
    assert_eq!((active.version, active.slot), (1, slot));
    assert_eq!(installed.slots[slot as usize].state, SlotState::Active);
    assert_eq!(installed.last_event, Some(Event::Installed { version: 1 }));
    let secs = update.transfer.as_secs_f64();
    eprintln!(
        "flashed {} bytes over the emulated UART in {secs:.2} s ({:.1} KB/s); commit (SHA-256 + \
         Ed25519) {:.3} s; reset, trial boot and self-test {:.3} s",
        v1.len(),
        v1.len() as f64 / 1000.0 / secs,
        update.verify.as_secs_f64(),
        trial.as_secs_f64()
    );

    // 4. Inference: the board's output is the host runtime's, bit for bit.
    let input: Vec<u8> = (0..active.input_len / 4)
        .flat_map(|i| ((i as f32 * 0.37).sin()).to_le_bytes())
        .collect();
    let reply = link.call(&Request::Infer { input: &input }, LONG);
    match response(&reply) {
        Response::InferOk { output, .. } => assert_eq!(output, host_infer(&v1, &input)),
        other => panic!("expected InferOk, got {other:?}"),
    }
    let reply = link.call(
        &Request::Infer {
            input: &input[..10],
        },
        SHORT,
    );
    assert_eq!(
        expect_error(&reply, ErrorCode::BadInputLength),
        active.input_len
    );

    // 5. Signed by a key the board does not trust: refused at commit, v1 stays.
    let stranger = testkit::test_key(0x5E);
    let v2 = Spec {
        target: BOARD.into(),
        ..Spec::sized(2, 4096)
    };
    let v2 = sign_artifact(&testkit::build(&v2), &stranger, 2, 0, Some(BOARD)).expect("sign v2");
    expect_error(&send_update(&mut link, &v2).commit, ErrorCode::UntrustedKey);
    let payload = info(&mut link);
    let after = as_info(&payload);
    assert_eq!(after.active.map(|m| m.version), Some(1));
    qemu.wait_for_log("update refused (UntrustedKey)", 1, SHORT);

    // 6. A model whose self-test fails on the board: committed, tried, reverted.
    let v3 = Spec {
        target: BOARD.into(),
        bad_selftest: true,
        ..Spec::sized(3, 4096)
    };
    let v3 = sign_artifact(&testkit::build(&v3), key, 3, 0, Some(BOARD)).expect("sign v3");
    let committed = send_update(&mut link, &v3).commit;
    assert!(
        matches!(response(&committed), Response::Committed { version: 3, .. }),
        "{:?}",
        response(&committed)
    );
    qemu.wait_for_log("reverted v3 (SelfTestFailed)", 1, LONG);
    let payload = info(&mut link);
    let reverted = as_info(&payload);
    assert_eq!(reverted.active.map(|m| m.version), Some(1));
    assert_eq!(
        reverted.last_event,
        Some(Event::Reverted {
            version: 3,
            reason: ErrorCode::SelfTestFailed
        })
    );
    let reply = link.call(&Request::Infer { input: &input }, LONG);
    assert!(matches!(response(&reply), Response::InferOk { .. }));
    // Two boots after the two commits, three in all, and never a panic.
    qemu.wait_for_log("trusts key", 3, SHORT);
    assert!(!qemu.log().contains("panic"), "{}", qemu.log());
    eprintln!(
        "board protocol session took {:.1} s",
        test_started.elapsed().as_secs_f64()
    );
}

/// Runs the `kiln` binary; returns (success, stdout, stderr).
fn kiln(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("run kiln");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

/// `kiln device-info --json`: the active version.
fn active_version(serial: &str) -> Option<u64> {
    let (ok, stdout, stderr) = kiln(&[os("device-info"), os("--serial"), os(serial), os("--json")]);
    assert!(ok, "device-info failed: {stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("device-info --json");
    v["active"]["version"].as_u64()
}

/// The end-to-end scenario with the real `kiln` binary, the KWS int8 model and its TFLM
/// golden outputs: a signed v2 is flashed and confirmed; a tampered v3 is refused and v2 stays;
/// v1 is refused (downgrade); a v4 whose self-test fails is reverted to v2; `kiln infer` on the
/// golden inputs matches TFLM bit for bit.
#[test]
fn kws_v2_confirmed_tampered_v3_and_downgrade_refused_failing_v4_reverted_infer_bit_exact() {
    if !have_qemu() {
        eprintln!("skipped: qemu-system-arm is not installed; the KWS board scenario was not run");
        return;
    }
    let testdata = std::env::var_os("KILN_TESTDATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/testdata"));
    let model = testdata.join("models/mlperf-tiny/kws_ref_model.tflite");
    let golden = testdata.join("golden/kws_ref_model.npz");
    if !model.exists() || !golden.exists() {
        eprintln!(
            "skipped: KWS test data not found under {} (set KILN_TESTDATA)",
            testdata.display()
        );
        return;
    }
    let Board { public, elf, .. } = board();
    let secret = public.with_extension("key");
    let dir = std::env::temp_dir().join(format!("kiln-board-kws-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let p = |name: &str| dir.join(name);

    // Convert with SELFTEST vectors from the golden set, then sign the versions.
    let (ok, _, err) = kiln(&[
        os("convert"),
        model.as_os_str(),
        os("-o"),
        p("kws.kiln").as_os_str(),
        os("--selftest"),
        golden.as_os_str(),
        os("--selftest-count"),
        os("4"),
    ]);
    assert!(ok, "convert: {err}");
    let sign = |input: &Path, version: &str, out: &Path| {
        let (ok, _, err) = kiln(&[
            os("sign"),
            input.as_os_str(),
            os("--key"),
            secret.as_os_str(),
            os("--version"),
            os(version),
            os("--target"),
            os(BOARD),
            os("-o"),
            out.as_os_str(),
        ]);
        assert!(ok, "sign v{version}: {err}");
    };
    for v in ["1", "2", "3"] {
        sign(&p("kws.kiln"), v, &p(&format!("v{v}.kiln")));
    }
    // v3 tampered after signing: one weight byte.
    let mut v3 = std::fs::read(p("v3.kiln")).expect("v3");
    let mid = v3.len() / 2;
    v3[mid] ^= 0x01;
    std::fs::write(p("v3-tampered.kiln"), &v3).expect("write v3");
    // v4: a wrong expected output in SELFTEST (digest recomputed), then properly signed.
    let plain = std::fs::read(p("kws.kiln")).expect("kws.kiln");
    let c = Container::parse(&plain).expect("kws.kiln parses");
    let st = c
        .section(kiln_runtime::format::SectionKind::SelfTest)
        .expect("SELFTEST");
    let st_end = st.as_ptr() as usize - plain.as_ptr() as usize + st.len();
    let mut body = c.body().to_vec();
    body[st_end - 1] ^= 0x01; // last expected output byte of the last case
    kiln::artifact::append_trailer(&mut body);
    std::fs::write(p("bad-selftest.kiln"), &body).expect("write");
    sign(&p("bad-selftest.kiln"), "4", &p("v4.kiln"));

    let port = free_port();
    let _qemu = Qemu::start(elf, port);
    let serial = format!("tcp:127.0.0.1:{port}");
    let flash = |file: &str| {
        kiln(&[
            os("flash"),
            os("--serial"),
            os(&serial),
            p(file).as_os_str(),
        ])
    };

    let (ok, _, err) = flash("v2.kiln");
    assert!(ok, "flashing v2 failed: {err}");
    assert_eq!(active_version(&serial), Some(2));

    let (ok, _, err) = flash("v3-tampered.kiln");
    assert!(!ok, "a tampered v3 must be refused");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert_eq!(active_version(&serial), Some(2));

    let (ok, _, err) = flash("v1.kiln");
    assert!(!ok, "v1 is a downgrade");
    assert!(
        err.to_lowercase().contains("version") || err.contains("Downgrade"),
        "{err}"
    );
    assert_eq!(active_version(&serial), Some(2));

    let (ok, _, err) = flash("v4.kiln");
    assert!(!ok, "v4's self-test fails on the board");
    assert!(
        err.to_lowercase().contains("revert") || err.contains("SelfTest"),
        "{err}"
    );
    assert_eq!(active_version(&serial), Some(2));

    // Inference on golden inputs: bit-exact with TFLM.
    let n = 40;
    let (shape, x) = kiln::npy::read_npz_i8(&golden, "input").expect("golden input");
    let (_, y) = kiln::npy::read_npz_i8(&golden, "output").expect("golden output");
    let per_in: usize = shape[1..].iter().product();
    let per_out = y.len() / shape[0];
    let mut sub_shape = shape.clone();
    sub_shape[0] = n;
    kiln::npy::write_npy(
        &p("x.npy"),
        &sub_shape,
        kiln::npy::OutputData::I8(&x[..n * per_in]),
    )
    .expect("write x.npy");
    let (ok, _, err) = kiln(&[
        os("infer"),
        os("--serial"),
        os(&serial),
        os("--input"),
        p("x.npy").as_os_str(),
        os("--all"),
        os("--output"),
        p("y.npy").as_os_str(),
    ]);
    assert!(ok, "infer: {err}");
    let got = kiln::npy::read_input(&p("y.npy")).expect("y.npy");
    let kiln::npy::Array::I8 { data, .. } = got else {
        panic!("int8 outputs expected")
    };
    assert_eq!(data.len(), n * per_out);
    assert_eq!(
        data,
        y[..n * per_out],
        "board outputs differ from TFLM's golden outputs"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
