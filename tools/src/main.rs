//! `kiln`: the host tool's command line.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kiln::npy::{self, OutputData};
use kiln::runner::{self, Outputs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Kiln puts quantized neural networks on small devices and keeps them healthy there.
///
/// Typical flow: `kiln convert model.tflite -o model.kiln`, then `kiln inspect model.kiln` to see
/// the exact arena and flash it needs, and `kiln run model.kiln --input x.npz` to check outputs on
/// the host with the same runtime the device uses.
#[derive(Parser, Debug)]
#[command(name = "kiln", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Convert a TFLite model into a .kiln artifact.
    ///
    /// Full-int8 models convert as they are (bit-exact with TFLM's reference kernels), float32
    /// models become f32 artifacts, and hybrid models (int8 weights, float activations) become f32
    /// artifacts with dequantized weights. The memory plan is computed here, so the artifact
    /// states the exact arena a device must provide. An unsupported op is reported with its name
    /// and its index in the model.
    Convert {
        /// The source model (.tflite).
        model: PathBuf,
        /// Where to write the artifact.
        #[arg(short, long, value_name = "OUT.kiln")]
        output: PathBuf,
        /// Name recorded in the manifest (default: the file stem).
        #[arg(long)]
        name: Option<String>,
        /// Sample inputs (.npy, or .npz with `x` / `input`, batch first) from which SELFTEST
        /// vectors are made: each sample's exact outputs are recorded, and a device re-runs them
        /// bit for bit after an update before it confirms the model.
        #[arg(long, value_name = "X.npz|X.npy")]
        selftest: Option<PathBuf>,
        /// Store float weights and activations as f16 (halves flash and arena; arithmetic stays
        /// f32). int8 models are unaffected.
        #[arg(long)]
        fp16: bool,
        /// How many samples of --selftest to embed.
        #[arg(long, default_value_t = 4, value_name = "N")]
        selftest_count: usize,
        /// Print the conversion summary as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Run an artifact on a batch of inputs with the device runtime, on this machine.
    ///
    /// The input is an .npy, or an .npz holding an array named `x` (or `input`), batch first.
    /// int8 arrays are fed as raw quantized values; float arrays are real values, quantized at
    /// the model's input with its own scale and zero point. The output .npy has the batch first
    /// and the model's output type.
    Run {
        /// The artifact.
        model: PathBuf,
        /// Input samples (.npy or .npz), batch first.
        #[arg(short, long, value_name = "X.npz|X.npy")]
        input: PathBuf,
        /// Where to write the outputs (.npy).
        #[arg(short, long, value_name = "Y.npy")]
        output: Option<PathBuf>,
        /// Print a JSON summary on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Show what an artifact holds: arena, weights, MACs, the per-op table and the manifest.
    ///
    /// The artifact is validated exactly as a device would validate it before anything is shown.
    Inspect {
        /// The artifact.
        model: PathBuf,
        /// Print the report as JSON on stdout instead of the table on stderr.
        #[arg(long)]
        json: bool,
    },
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

struct ConvertArgs<'a> {
    model: &'a Path,
    output: &'a Path,
    name: Option<String>,
    selftest: Option<&'a Path>,
    selftest_count: usize,
    fp16: bool,
    json: bool,
}

fn convert(a: ConvertArgs<'_>) -> Result<()> {
    let ConvertArgs {
        model,
        output,
        name,
        selftest,
        selftest_count,
        fp16,
        json,
    } = a;
    let precision = if fp16 {
        kiln::convert::Precision::Fp16
    } else {
        kiln::convert::Precision::AsSource
    };
    let source = read(model)?;
    let name = name.unwrap_or_else(|| {
        model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let samples = selftest.map(npy::read_input).transpose()?;
    let converted = kiln::convert::convert_tflite_with(
        &source,
        &name,
        samples.as_ref().map(|x| (x, selftest_count)),
        precision,
    )
    .with_context(|| format!("cannot convert {}", model.display()))?;
    std::fs::write(output, &converted.artifact)
        .with_context(|| format!("cannot write {}", output.display()))?;
    let report = kiln::inspect::inspect(&converted.artifact)?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "output": output,
                "artifact_bytes": report.artifact_bytes,
                "arena_bytes": report.arena_bytes,
                "liveness_lower_bound_bytes": converted.lowered.liveness_lower_bound,
                "weights_bytes": report.weights_bytes,
                "macs": report.macs,
                "ops": report.ops.len(),
                "self_tests": converted.self_tests,
            })
        );
    } else {
        eprintln!(
            "wrote {} ({} bytes): {} ops, {} MACs, arena {} bytes (liveness lower bound {}), weights {} bytes, {} self-test(s)",
            output.display(),
            report.artifact_bytes,
            report.ops.len(),
            report.macs,
            report.arena_bytes,
            converted.lowered.liveness_lower_bound,
            report.weights_bytes,
            converted.self_tests
        );
    }
    Ok(())
}

fn run(model: &Path, input: &Path, output: Option<&Path>, json: bool) -> Result<()> {
    let artifact = read(model)?;
    let x = npy::read_input(input)?;
    let bar = progress(0, "running");
    let mut started = false;
    let result = runner::run_batch(&artifact, &x, |done| {
        if !started {
            started = true;
            bar.set_length(x.shape().first().copied().unwrap_or(1) as u64);
        }
        bar.set_position(done as u64);
    })
    .with_context(|| format!("cannot run {} on {}", model.display(), input.display()))?;
    bar.finish_and_clear();
    if let Some(out) = output {
        let data = match &result.outputs {
            Outputs::I8(v) => OutputData::I8(v),
            Outputs::F32(v) => OutputData::F32(v),
            Outputs::F16(v) => OutputData::F16(v),
        };
        npy::write_npy(out, &result.shape, data)?;
    }
    let batch = result.shape.first().copied().unwrap_or(0);
    if json {
        println!(
            "{}",
            serde_json::json!({ "samples": batch, "output_shape": result.shape, "output": output })
        );
    } else {
        eprintln!(
            "ran {batch} sample(s); output shape {:?}{}",
            result.shape,
            output
                .map(|o| format!(", written to {}", o.display()))
                .unwrap_or_default()
        );
    }
    Ok(())
}

fn inspect(model: &Path, json: bool) -> Result<()> {
    let artifact = read(model)?;
    let report = kiln::inspect::inspect(&artifact)
        .with_context(|| format!("{} is not a valid artifact", model.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        eprint!("{}", kiln::inspect::render(&report));
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Convert {
            model,
            output,
            name,
            selftest,
            selftest_count,
            fp16,
            json,
        } => convert(ConvertArgs {
            model: &model,
            output: &output,
            name,
            selftest: selftest.as_deref(),
            selftest_count,
            fp16,
            json,
        }),
        Command::Run {
            model,
            input,
            output,
            json,
        } => run(&model, &input, output.as_deref(), json),
        Command::Inspect { model, json } => inspect(&model, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line of what, then the causes; hints are carried in the messages themselves.
            let mut msg = format!("error: {e}");
            for cause in e.chain().skip(1) {
                msg.push_str(&format!("\n  caused by: {cause}"));
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}
