//! `kiln bench --target qemu-cortex-m4|qemu-cortex-m7|qemu-aarch64`: one inference of an
//! artifact on an emulated core, counted in guest instructions.
//!
//! `qemu-aarch64` cross-builds kiln-runtime's `bench_once` example for aarch64 Linux and runs it
//! under user-mode `qemu-aarch64` with the same plugin (instructions = infer − base run; no stack
//! figure there). The Cortex-M targets:
//!
//! Builds `firmware/bench-m4` (from the Kiln checkout this `kiln` was built in) with the artifact
//! and one sample embedded — the artifact's first SELFTEST input (zeros if it has none) and the
//! output the portable interpreter gives for it here — and runs it under `qemu-system-arm` with
//! the instruction-counting TCG plugin of `benches/qemu-insn`: instructions = (a run with one
//! inference) − (the same run without it). A third run paints the stack, runs the inference,
//! compares the output byte for byte and reports the stack high-water mark. MACs come from the
//! artifact; `code_bytes` is the image's `.text`.

use crate::artifact::AlignedBytes;
use anyhow::{bail, Context, Result};
use kiln_runtime::format::SectionKind;
use kiln_runtime::sections::{SelfTestCase, SelfTestHead};
use kiln_runtime::{Interpreter, Model};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What `kiln bench --target qemu-*` measured.
#[derive(Clone, Debug, Serialize)]
pub struct QemuBench {
    /// `qemu-cortex-m4` or `qemu-cortex-m7`.
    pub target: String,
    /// `dsp` (the Cortex-M fast paths), `neon` (the aarch64 fast paths) or `portable`.
    pub kernels: &'static str,
    /// Guest instructions of one inference.
    pub instructions: u64,
    /// Multiply-accumulates of one inference.
    pub macs: u64,
    /// `macs / instructions`.
    pub macs_per_instruction: f64,
    /// Arena the artifact plans.
    pub arena_bytes: usize,
    /// Stack used by one inference (painted high-water mark; Cortex-M only).
    pub stack_bytes: Option<u64>,
    /// `.text` of the whole image (runtime, startup, semihosting).
    pub code_bytes: u64,
    /// Clock the latency estimate assumes, MHz.
    pub mhz: f64,
    /// `instructions / mhz`: a lower bound of the latency at one instruction per cycle, µs
    /// (real cores take more cycles for loads, multiplies and branches).
    pub estimated_us: f64,
    /// The output matched the portable interpreter's byte for byte.
    pub bit_exact: bool,
}

/// The Kiln checkout this binary was built from.
fn checkout() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    if !root.join("firmware/bench-m4/Cargo.toml").is_file() {
        bail!(
            "kiln bench --target qemu-* builds firmware/bench-m4 from the Kiln checkout kiln was built in ({}), which is not there\nhint: run a kiln built from a checkout (cargo run -p kiln -- bench …)",
            root.display()
        );
    }
    Ok(root)
}

fn need(tool: &str, apt: &str) -> Result<()> {
    let found = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        bail!("{tool} is required for QEMU benchmarks\nhint: apt-get install {apt}");
    }
    Ok(())
}

/// Input and expected output bytes of one sample.
fn sample(artifact: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    let bytes = AlignedBytes::new(artifact);
    let model = Model::load(bytes.as_slice())?;
    let selftest = model
        .container()
        .section(SectionKind::SelfTest)
        .and_then(|b| {
            let (head, rest): (SelfTestHead, &[u8]) = postcard::take_from_bytes(b).ok()?;
            (head.count > 0).then_some(())?;
            let (case, _): (SelfTestCase<'_>, &[u8]) = postcard::take_from_bytes(rest).ok()?;
            Some(case.inputs.to_vec())
        });
    let mut arena = AlignedBytes::zeroed(model.arena_bytes());
    let mut interp = Interpreter::new(model, arena.as_mut_slice())?;
    if model.inputs().len() != 1 || model.outputs().len() != 1 {
        bail!("QEMU benchmarks take models with one input and one output");
    }
    let dst = interp.input_bytes_mut(0)?;
    match &selftest {
        Some(src) if src.len() == dst.len() => dst.copy_from_slice(src),
        _ => dst.fill(0),
    }
    let input = dst.to_vec();
    interp.invoke()?;
    Ok((input, interp.output_bytes(0)?.to_vec()))
}

/// Runs the benchmark; `portable` builds the image without the Cortex-M or NEON fast paths.
///
/// # Errors
/// Missing tools (cargo, gcc, qemu-system-arm, arm-none-eabi-size), a build failure, a run that
/// does not exit cleanly, or an output that differs from the portable interpreter's.
pub fn bench_qemu(
    artifact: &[u8],
    target: &str,
    portable: bool,
    mhz: f64,
    mut progress: impl FnMut(&str),
) -> Result<QemuBench> {
    let (cpu, machine) = match target {
        "qemu-cortex-m4" => ("cortex-m4", "mps2-an386"),
        "qemu-cortex-m7" => ("cortex-m7", "mps2-an500"),
        "qemu-aarch64" => return bench_aarch64(artifact, portable, mhz, progress),
        other => {
            bail!("unknown QEMU target {other}; use qemu-cortex-m4, qemu-cortex-m7 or qemu-aarch64")
        }
    };
    if mhz <= 0.0 {
        bail!("--mhz must be positive");
    }
    let root = checkout()?;
    need("qemu-system-arm", "qemu-system-arm")?;
    need("gcc", "gcc")?;
    need("arm-none-eabi-size", "binutils-arm-none-eabi")?;
    let report = crate::inspect::inspect(artifact)?;
    let (input, output) = sample(artifact)?;
    let work = tempfile::tempdir().context("cannot make a temporary folder")?;
    let (model_path, in_path, out_path) = (
        work.path().join("model.kiln"),
        work.path().join("x.bin"),
        work.path().join("y.bin"),
    );
    std::fs::write(&model_path, artifact)?;
    std::fs::write(&in_path, &input)?;
    std::fs::write(&out_path, &output)?;

    progress("building the QEMU plugin");
    let plugin = plugin(&root)?;

    progress("building the bench image");
    let target_dir = root.join("target/bench-m4");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(root.join("firmware/bench-m4"))
        .args([
            "build",
            "-q",
            "--release",
            "--target",
            "thumbv7em-none-eabihf",
        ])
        .env("KILN_BENCH_MODEL", &model_path)
        .env("KILN_BENCH_INPUT", &in_path)
        .env("KILN_BENCH_OUTPUT", &out_path)
        .env("KILN_BENCH_SAMPLES", "1")
        .env("CARGO_TARGET_DIR", &target_dir);
    if portable {
        build.args(["--features", "portable"]);
    }
    let built = build.output().context("cannot run cargo")?;
    if !built.status.success() {
        bail!(
            "building the bench image failed:\n{}",
            String::from_utf8_lossy(&built.stderr).trim()
        );
    }
    let elf = work.path().join("bench.elf");
    std::fs::copy(
        target_dir.join("thumbv7em-none-eabihf/release/kiln-bench-m4"),
        &elf,
    )
    .context("the bench image was not built")?;

    let qemu = |mode: &str, count: bool| -> Result<String> {
        let log = work.path().join(format!("{mode}.log"));
        let mut c = Command::new("qemu-system-arm");
        c.args([
            "-cpu",
            cpu,
            "-machine",
            machine,
            "-nographic",
            "-monitor",
            "none",
        ])
        .arg("-semihosting-config")
        .arg(format!("enable=on,target=native,arg={mode}"))
        .arg("-kernel")
        .arg(&elf);
        if count {
            c.arg("-plugin")
                .arg(&plugin)
                .args(["-d", "plugin", "-D"])
                .arg(&log);
        }
        let out = c.output().context("cannot run qemu-system-arm")?;
        if !out.status.success() {
            bail!(
                "the bench image ({mode}) exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(if count {
            std::fs::read_to_string(&log).unwrap_or_default()
        } else {
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    let field = |text: &str, key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    progress("counting instructions");
    let base = field(&qemu("base", true)?, "insns: ")
        .context("the QEMU plugin printed no instruction count")?;
    let infer = field(&qemu("infer", true)?, "insns: ")
        .context("the QEMU plugin printed no instruction count")?;
    progress("measuring the stack");
    let check = qemu("check", false)?;
    let stack_bytes = field(&check, "stack_bytes: ").context("the image printed no stack size")?;
    let code_bytes = text_bytes("arm-none-eabi-size", &elf);
    let instructions = infer.saturating_sub(base);
    Ok(QemuBench {
        target: target.to_string(),
        kernels: if portable { "portable" } else { "dsp" },
        instructions,
        macs: report.macs,
        macs_per_instruction: if instructions > 0 {
            report.macs as f64 / instructions as f64
        } else {
            0.0
        },
        arena_bytes: report.arena_bytes,
        stack_bytes: Some(stack_bytes),
        code_bytes,
        mhz,
        estimated_us: instructions as f64 / mhz,
        bit_exact: true,
    })
}

/// Builds the plugin into the checkout's target folder; its path.
fn plugin(root: &Path) -> Result<PathBuf> {
    let plugin = root.join("target/qemu-insn/insn.so");
    if let Some(dir) = plugin.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let built = Command::new(root.join("benches/qemu-insn/build.sh"))
        .arg(&plugin)
        .output()
        .context("cannot run benches/qemu-insn/build.sh")?;
    if !built.status.success() {
        bail!(
            "building the instruction-counting plugin failed: {}",
            String::from_utf8_lossy(&built.stderr).trim()
        );
    }
    Ok(plugin)
}

/// `.text` bytes of an ELF as `size -A` reports them.
fn text_bytes(size_tool: &str, elf: &Path) -> u64 {
    Command::new(size_tool)
        .arg("-A")
        .arg(elf)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout).lines().find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(".text"))
                    .then(|| f.next().and_then(|v| v.parse().ok()))
                    .flatten()
            })
        })
        .unwrap_or(0)
}

/// `portable` builds `bench_once` with kiln-runtime's `portable-kernels` feature (no NEON fast
/// paths), for A/B comparisons.
fn bench_aarch64(
    artifact: &[u8],
    portable: bool,
    mhz: f64,
    mut progress: impl FnMut(&str),
) -> Result<QemuBench> {
    if mhz <= 0.0 {
        bail!("--mhz must be positive");
    }
    let root = checkout()?;
    need("qemu-aarch64", "qemu-user")?;
    need("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu")?;
    need("gcc", "gcc")?;
    let report = crate::inspect::inspect(artifact)?;
    let (_, expected) = sample(artifact)?;
    let work = tempfile::tempdir().context("cannot make a temporary folder")?;
    let model_path = work.path().join("model.kiln");
    std::fs::write(&model_path, artifact)?;
    progress("building the QEMU plugin");
    let plugin = plugin(&root)?;
    progress("building bench_once for aarch64");
    let target_dir = root.join("target/bench-aarch64");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let features = if portable {
        "std,portable-kernels"
    } else {
        "std"
    };
    let built = Command::new(cargo)
        .current_dir(&root)
        .args([
            "build",
            "-q",
            "--release",
            "-p",
            "kiln-runtime",
            "--features",
            features,
            "--example",
            "bench_once",
            "--target",
            "aarch64-unknown-linux-gnu",
        ])
        .env("CARGO_TARGET_DIR", &target_dir)
        .output()
        .context("cannot run cargo")?;
    if !built.status.success() {
        bail!(
            "building bench_once for aarch64 failed:\n{}",
            String::from_utf8_lossy(&built.stderr).trim()
        );
    }
    let exe = target_dir.join("aarch64-unknown-linux-gnu/release/examples/bench_once");
    let run = |mode: &str| -> Result<(u64, String)> {
        let log = work.path().join(format!("{mode}.log"));
        let out = Command::new("qemu-aarch64")
            .args(["-L", "/usr/aarch64-linux-gnu", "-plugin"])
            .arg(&plugin)
            .args(["-d", "plugin", "-D"])
            .arg(&log)
            .arg(&exe)
            .arg(&model_path)
            .arg(mode)
            .output()
            .context("cannot run qemu-aarch64")?;
        if !out.status.success() {
            bail!(
                "bench_once ({mode}) failed under qemu-aarch64: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let insns = text
            .lines()
            .find_map(|l| l.strip_prefix("insns: "))
            .and_then(|v| v.trim().parse().ok())
            .context("the QEMU plugin printed no instruction count")?;
        Ok((insns, String::from_utf8_lossy(&out.stdout).into_owned()))
    };
    progress("counting instructions");
    let (base, _) = run("base")?;
    let (infer, stdout) = run("infer")?;
    let want: String = expected.iter().map(|b| format!("{b:02x}")).collect();
    let got = stdout
        .lines()
        .find_map(|l| l.strip_prefix("output: "))
        .unwrap_or("");
    if got != want {
        bail!("the aarch64 output differs from the portable interpreter's on this machine");
    }
    let instructions = infer.saturating_sub(base);
    Ok(QemuBench {
        target: "qemu-aarch64".into(),
        kernels: if portable { "portable" } else { "neon" },
        instructions,
        macs: report.macs,
        macs_per_instruction: if instructions > 0 {
            report.macs as f64 / instructions as f64
        } else {
            0.0
        },
        arena_bytes: report.arena_bytes,
        stack_bytes: None,
        code_bytes: text_bytes("aarch64-linux-gnu-size", &exe),
        mhz,
        estimated_us: instructions as f64 / mhz,
        bit_exact: true,
    })
}
