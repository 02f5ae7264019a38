//! `kiln`: the host tool's command line.

use anyhow::{bail, Context, Result};
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
    /// Run Kiln end to end on a synthetic data set: train, export, quantize, roll out, report.
    ///
    /// Needs nothing outside the repository. Generates 16x16 images of four shapes (seeded),
    /// trains a small CNN with candle on the CPU, exports it as a float .kiln, quantizes it to int8
    /// and fp16 (calibration on training images, accuracy on the test images, 1 pt accuracy gate,
    /// self-test vectors), and prints one row per artifact and the int8 per-layer table. Writes
    /// demo-float.kiln, demo-int8.kiln, demo-fp16.kiln, test.npz and calib.npz into --out.
    ///
    /// Then the fleet (about 30 s; --no-fleet skips it): the int8 artifact is signed with a new
    /// key (demo-signing.key/.pub), pushed to an embedded `kiln serve` (--out/fleet/server), and
    /// rolled out to 24 simulated devices running the real agent and runtime, with faults
    /// injected: v1 to all, v2 in waves 25,100, and a v3 whose self-test fails on the devices,
    /// which the first wave's gate stops and rolls back.
    Demo {
        /// Output folder.
        #[arg(long, value_name = "DIR", default_value = "demo-out")]
        out: PathBuf,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Skip the fleet part (signing, an embedded `kiln serve`, simulated devices, rollouts).
        #[arg(long)]
        no_fleet: bool,
    },
    /// Convert a TFLite or ONNX model into a .kiln artifact, as it is (no calibration).
    ///
    /// Full-int8 models convert as they are (bit-exact with TFLM's reference kernels), float32
    /// models become f32 artifacts, and hybrid models (int8 weights, float activations) become f32
    /// artifacts with dequantized weights. The memory plan is computed here, so the artifact
    /// states the exact arena a device must provide. An unsupported op is reported with its name
    /// and its index in the model.
    Convert {
        /// The source model (.tflite, or .onnx: 4-D inputs become NHWC).
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
        /// Where to run it: `portable` (kiln-runtime's kernels, what devices run; bit-exact with
        /// TFLM for int8) or `candle` (kiln-runtime's candle backend: f32 / f16 compute on a
        /// candle device; int8 models within a quantization step or two of `portable`).
        #[arg(long, value_enum, default_value = "portable")]
        backend: RunBackend,
    },
    /// Measure how fast an artifact runs: median and p99 latency of one inference on this
    /// machine, single thread.
    ///
    /// The input is the artifact's first self-test case (zeros if it has none). Warm-up runs
    /// come first; then each of --runs inferences is timed on its own. `--backend candle` times
    /// kiln-runtime's candle backend on the CPU instead of the portable kernels.
    ///
    /// Examples: kiln bench kws.kiln --runs 500 --json; kiln bench vww.kiln --per-op (where the
    /// time goes, op by op)
    Bench {
        /// The artifact.
        model: PathBuf,
        /// Where to run: `host` (this machine, wall-clock time), `qemu-cortex-m4` /
        /// `qemu-cortex-m7` (guest instructions of one inference under qemu-system-arm, with
        /// stack and code size; needs a Kiln checkout, qemu-system-arm, gcc and
        /// binutils-arm-none-eabi) or `qemu-aarch64` (the same under user-mode qemu-aarch64;
        /// needs qemu-user and gcc-aarch64-linux-gnu).
        #[arg(long, value_enum, default_value = "host")]
        target: BenchTarget,
        /// Timed inferences (host).
        #[arg(long, default_value_t = 200)]
        runs: usize,
        /// Clock for the latency estimate of QEMU targets, MHz.
        #[arg(long, default_value_t = 120.0)]
        mhz: f64,
        /// QEMU targets: build the image with the portable kernels instead of the Cortex-M DSP or
        /// aarch64 NEON fast paths.
        #[arg(long)]
        portable_kernels: bool,
        /// `portable` (the kernels devices run) or `candle`.
        #[arg(long, value_enum, default_value = "portable")]
        backend: RunBackend,
        /// Host: also time every op on its own (a second set of --runs inferences) and print
        /// where the time goes, op by op.
        #[arg(long)]
        per_op: bool,
        /// Print the figures as JSON on stdout.
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
    /// Quantize a float model (int8, fp16, or auto mixed precision) with calibration data.
    ///
    /// Calibration runs the float graph on the samples and records every activation's range
    /// (--estimator minmax, percentile[:P] or entropy). Weights become per-channel symmetric int8,
    /// activations asymmetric int8, biases int32 (corrected for the mean shift that weight
    /// quantization causes unless --no-bias-correction). The artifact carries its lineage (SHA-256
    /// of the source and of the calibration data, every option, the float and quantized metrics),
    /// SELFTEST vectors from the first calibration samples and a BASELINE of input and output
    /// histograms for drift detection. With --max-accuracy-drop and --eval, a result that loses
    /// more than the budget is refused and nothing is written.
    Quantize {
        /// The float model (.tflite).
        model: PathBuf,
        /// Where to write the artifact.
        #[arg(short, long, value_name = "OUT.kiln")]
        output: PathBuf,
        /// int8, fp16, or auto (int8 with the fewest, most sensitive layers kept in fp16 that stay
        /// within --max-accuracy-drop; needs --eval).
        #[arg(long, default_value = "int8")]
        precision: kiln::quantize::pipeline::Precision,
        /// Replace the model's float weights by name from this safetensors file first (a
        /// retrained model becomes a new version of the same graph; its SHA-256 goes into the
        /// lineage).
        #[arg(long, value_name = "W.safetensors")]
        weights: Option<PathBuf>,
        /// Calibration samples (.npy, or .npz with `x`), real values as the float model takes
        /// them, batch first. uint8 images are read as values 0..255 (see --input-scale).
        #[arg(long, value_name = "DATA.npz")]
        calib: PathBuf,
        /// Multiply uint8 sample values by this (e.g. 0.00392156862745098 for 1/255).
        #[arg(long, value_name = "S")]
        input_scale: Option<f32>,
        /// Activation range estimator: minmax, percentile[:P] (default P 99.99) or entropy.
        #[arg(long, default_value = "minmax")]
        estimator: kiln::quantize::ranges::Estimator,
        /// Do not correct biases for the weight quantization error.
        #[arg(long)]
        no_bias_correction: bool,
        /// Labelled evaluation set (`x`, `y`) for the report, the gate and --precision auto.
        #[arg(long, value_name = "DATA.npz")]
        eval: Option<PathBuf>,
        /// Metric of --eval: top1 (classification) or auc (autoencoder clips [n, frames, mels]).
        #[arg(long, default_value = "top1")]
        metric: kiln::quantize::pipeline::Metric,
        /// Refuse the result if it scores more than P percentage points below the float model.
        #[arg(long, value_name = "P")]
        max_accuracy_drop: Option<f64>,
        /// Self-test vectors to embed.
        #[arg(long, default_value_t = 4, value_name = "N")]
        selftest_count: usize,
        /// Name recorded in the manifest (default: the file stem).
        #[arg(long)]
        name: Option<String>,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Prune a float model: zero the smallest weights, or remove whole channels.
    ///
    /// Without --structured, each conv / depthwise / fully-connected weight tensor loses the
    /// --sparsity fraction of its smallest-magnitude weights (shapes stay; the report gives the
    /// sparsity and the bitmap-sparse size). With --structured, --sparsity is the fraction of MACs
    /// to remove: output channels of convs that feed exactly one other conv are removed (the
    /// least energetic first, allocated across layers by measured damage), the next conv is
    /// refitted by least squares on --calib, and MACs and activations really shrink. The output
    /// is a float .kiln that `kiln quantize` takes as its input.
    Prune {
        /// The float model (.tflite, .onnx or float .kiln).
        model: PathBuf,
        /// Where to write the pruned float artifact.
        #[arg(short, long, value_name = "OUT.kiln")]
        output: PathBuf,
        /// Fraction of weights to zero (unstructured) or of MACs to remove (structured), in [0, 1).
        #[arg(long, value_name = "S")]
        sparsity: f64,
        /// Remove whole channels instead of single weights (needs --calib).
        #[arg(long)]
        structured: bool,
        /// Calibration samples for the structured refit.
        #[arg(long, value_name = "DATA.npz")]
        calib: Option<PathBuf>,
        /// Multiply uint8 sample values by this.
        #[arg(long, value_name = "S")]
        input_scale: Option<f32>,
        /// After a structured prune, train the pruned model for N steps to match the unpruned
        /// model's logits on --calib (knowledge distillation with candle; 0 = off).
        #[arg(long, default_value_t = 0, value_name = "N")]
        distill_steps: usize,
        /// Labelled evaluation set (`x`, `y`): the unpruned and the pruned model are scored on it.
        #[arg(long, value_name = "DATA.npz")]
        eval: Option<PathBuf>,
        /// Metric of --eval: top1 or auc.
        #[arg(long, default_value = "top1")]
        metric: kiln::quantize::pipeline::Metric,
        /// Refuse the result if it scores more than P percentage points below the unpruned model.
        #[arg(long, value_name = "P")]
        max_accuracy_drop: Option<f64>,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Measure an artifact's accuracy on labelled data, and its agreement with a reference model.
    ///
    /// Float samples are quantized at the model's input edge with its own parameters. With
    /// --reference (a float .tflite or .kiln), also reports how often both pick the same class
    /// and the SQNR of the outputs.
    Eval {
        /// The artifact.
        model: PathBuf,
        /// Labelled data: `x` (samples, batch first) and `y` (class indices or 0/1 anomaly labels).
        #[arg(long, value_name = "DATA.npz")]
        data: PathBuf,
        /// top1 or auc (for autoencoders: `x` holds clips [n, frames, mels]).
        #[arg(long, default_value = "top1")]
        metric: kiln::quantize::pipeline::Metric,
        /// Multiply uint8 sample values by this.
        #[arg(long, value_name = "S")]
        input_scale: Option<f32>,
        /// A float reference model (.tflite or .kiln) to compare with.
        #[arg(long, value_name = "FLOAT_MODEL")]
        reference: Option<PathBuf>,
        /// Print the figures as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Write every constant tensor of an artifact to a safetensors file.
    ///
    /// Use it to inspect the weights a device really runs with, in numpy
    /// (`safetensors.numpy.load_file`) or torch (`safetensors.torch.load_file`). Tensors are named
    /// `t{index}_{op}_{role}` after the artifact tensor index and the first op that reads them
    /// (e.g. `t12_CONV_2D_weights`, `t13_CONV_2D_bias`) and keep their type (int8, int32, f32,
    /// f16); the int8 scales and zero points are in the file's `quantization` metadata entry.
    /// With --dequantize, int8 tensors become f32 `scale * (q - zero_point)` (per channel),
    /// int32 biases f32 `q * input_scale * weight_scale`, and f16 tensors f32.
    ExportWeights {
        /// The artifact.
        model: PathBuf,
        /// Where to write the safetensors file.
        #[arg(short, long, value_name = "W.safetensors")]
        output: PathBuf,
        /// Write int8, int32 and f16 tensors as real f32 values.
        #[arg(long)]
        dequantize: bool,
    },

    /// Create an Ed25519 key pair for signing: NAME.key (secret, mode 0600) and NAME.pub.
    ///
    /// The secret key signs artifacts (`kiln sign`) and key records (`kiln admit-key`); keep it on
    /// the build machine, never on a device and never in version control. The public key goes
    /// into device firmware, into key records, and into `kiln verify --pubkey`. The key id printed
    /// (the first 8 bytes of the SHA-256 of the public key, in hex) is how artifacts and devices
    /// name the key. Existing files are never overwritten unless --force is given.
    ///
    /// Example: `kiln keygen -o keys/release` writes keys/release.key and keys/release.pub.
    Keygen {
        /// Path and base name of the pair; `.key` and `.pub` are appended.
        #[arg(short, long, value_name = "NAME")]
        output: PathBuf,
        /// Replace an existing NAME.key / NAME.pub (the old secret key is lost for good).
        #[arg(long)]
        force: bool,
        /// Print the paths and the key id as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Stamp version, security counter and target board into an artifact, and sign it.
    ///
    /// The signature (Ed25519) covers the SHA-256 of everything before the trailer, header
    /// included, so the stamped fields cannot be changed afterwards. A device installs only models
    /// signed by a key it trusts, refuses a security counter below the one it has confirmed, and
    /// refuses an artifact for another board. Signing an already signed artifact with the same
    /// fields adds a signature (co-signing, up to 8 keys); with different fields the body changes,
    /// so the earlier signatures no longer apply and are dropped (you are told which).
    ///
    /// Example: `kiln sign model.kiln --key keys/release.key --version 7 --security-counter 2
    /// --target mps2-an386 -o model-v7.kiln`
    Sign {
        /// The artifact to sign.
        model: PathBuf,
        /// The secret key file written by `kiln keygen`.
        #[arg(long, value_name = "NAME.key")]
        key: PathBuf,
        /// Model version to stamp into the header.
        #[arg(long, value_name = "N")]
        version: u32,
        /// Security counter: devices refuse any model whose counter is below the one they have
        /// confirmed. Raise it when older models must never be installed again.
        #[arg(long, value_name = "C", default_value_t = 0)]
        security_counter: u32,
        /// Board the model is for: 1 to 16 characters of a-z, 0-9, `.`, `_`, `-` (default: any
        /// board).
        #[arg(long, value_name = "BOARD")]
        target: Option<String>,
        /// Where to write the signed artifact (may be the input).
        #[arg(short, long, value_name = "OUT.kiln")]
        output: PathBuf,
        /// Print the result as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Check an artifact's signatures against trusted public keys, as a device does.
    ///
    /// Checks the container, the SHA-256 of the body, and the signatures: every signature by one
    /// of the given keys must verify, and at least one must be there (signatures by other keys
    /// are ignored). Exit status 0 when valid; otherwise 1 and one line saying why (unsigned,
    /// untrusted key, bad signature, digest mismatch, truncated or malformed file).
    ///
    /// Example: `kiln verify model-v7.kiln --pubkey keys/release.pub --pubkey keys/backup.pub`
    Verify {
        /// The artifact.
        model: PathBuf,
        /// A trusted public key file (NAME.pub); repeat for several.
        #[arg(long = "pubkey", value_name = "NAME.pub", required = true)]
        pubkeys: Vec<PathBuf>,
        /// Print the result as JSON on stdout (also when it does not verify).
        #[arg(long)]
        json: bool,
    },
    /// Write a key record that makes devices trust a new key (key rotation without reflashing).
    ///
    /// The record (120 bytes) says "admit public key NEW", signed by a key the devices already
    /// trust. A device that trusts the signer adds NEW to its key ring; from then on models signed
    /// by NEW install there. Rotate by admitting the successor first, moving signing over, then
    /// revoking the old key with `kiln revoke-key`.
    ///
    /// Example: `kiln admit-key keys/2026.pub --key keys/release.key -o keys/2026-admit.kkey`
    AdmitKey {
        /// The public key to admit (NAME.pub).
        subject: PathBuf,
        /// A secret key the devices already trust, to sign the record.
        #[arg(long, value_name = "TRUSTED.key")]
        key: PathBuf,
        /// Where to write the record.
        #[arg(short, long, value_name = "OUT.kkey")]
        output: PathBuf,
        /// Print the result as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Write a key record that makes devices stop trusting a key.
    ///
    /// The record (120 bytes) says "revoke public key OLD", signed by a key the devices trust.
    /// Devices refuse to revoke keys compiled into their firmware and their last trusted key, so
    /// admit a successor first (`kiln admit-key`).
    ///
    /// Example: `kiln revoke-key keys/2025.pub --key keys/2026.key -o keys/2025-revoke.kkey`
    RevokeKey {
        /// The public key to revoke (NAME.pub).
        subject: PathBuf,
        /// A secret key the devices trust, to sign the record.
        #[arg(long, value_name = "TRUSTED.key")]
        key: PathBuf,
        /// Where to write the record.
        #[arg(short, long, value_name = "OUT.kkey")]
        output: PathBuf,
        /// Print the result as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Install a signed model on a board over its serial line, and wait until the board confirms it.
    ///
    /// Asks the board what it is first (board name, slot size, version and security counter in
    /// service) and refuses at once what it would refuse. Then sends the artifact in chunks with a
    /// progress bar; a transfer that broke off (cable, reset, Ctrl-C) resumes where it stopped
    /// when you run the same command again. After the commit the board reboots into a trial of
    /// the new model and runs its SELFTEST vectors; kiln polls it until the trial is over. Exit
    /// status 0 only once the new version is the board's active, confirmed model; 1 when it was
    /// refused or reverted (the old model stays in service), with one line saying why.
    /// --key-record installs a key record (from `kiln admit-key` / `kiln revoke-key`) first, or
    /// alone when no model is given.
    ///
    /// Example: `kiln flash --serial /dev/ttyACM0 model-v7.kiln` or, with QEMU's serial port on
    /// a socket, `kiln flash --serial tcp:127.0.0.1:4444 model-v7.kiln`
    Flash {
        /// The signed artifact (`kiln sign --target BOARD`).
        #[arg(value_name = "MODEL.kiln", required_unless_present = "key_record")]
        model: Option<PathBuf>,
        #[command(flatten)]
        link: SerialArgs,
        /// Install this key record before flashing (or without flashing, when no model is given).
        #[arg(long, value_name = "R.kkey")]
        key_record: Option<PathBuf>,
        /// Print the outcome as JSON on stdout (also when it fails).
        #[arg(long)]
        json: bool,
    },
    /// Show what a board runs: board, firmware, active model, slots, keys, last update event.
    ///
    /// Example: `kiln device-info --serial tcp:127.0.0.1:4444 --json`
    DeviceInfo {
        #[command(flatten)]
        link: SerialArgs,
        /// Print the state as JSON on stdout (`active.version`, `slots[i].state`, …).
        #[arg(long)]
        json: bool,
    },
    /// Run the board's active model on samples and save its outputs.
    ///
    /// The board reports only its model's input and output sizes in bytes. Without --model, an
    /// int8 array is sent as its bytes and a float array as float32 bytes (each sample must be
    /// exactly the model's input size), and the outputs are saved as int8 [n, output bytes]: the
    /// exact bytes (use numpy's `.view(np.float32)` for a float model). With --model (the
    /// artifact the board runs), float samples are quantized at the model's input as `kiln run`
    /// does, and the outputs are saved in the model's output type and shape.
    ///
    /// Example: `kiln infer --serial /dev/ttyACM0 --input x.npz --all --output y.npy`
    Infer {
        #[command(flatten)]
        link: SerialArgs,
        /// Input samples (.npy, or .npz with `x` / `input`), batch first.
        #[arg(short, long, value_name = "X.npz|X.npy")]
        input: PathBuf,
        /// The array of an .npz to read (default: `x`, else `input`).
        #[arg(long, value_name = "NAME", visible_alias = "key")]
        array: Option<String>,
        /// Run only sample I (from 0).
        #[arg(long, value_name = "I", conflicts_with = "all")]
        index: Option<usize>,
        /// Run every sample (one request each) and stack the outputs.
        #[arg(long)]
        all: bool,
        /// The artifact the board runs, to convert inputs and save outputs in its types.
        #[arg(long, value_name = "MODEL.kiln")]
        model: Option<PathBuf>,
        /// Where to write the outputs (.npy, batch first).
        #[arg(short, long, value_name = "Y.npy")]
        output: PathBuf,
        /// Print a summary as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Run N simulated devices (the real agent and runtime) against a fleet server.
    ///
    /// Each device enrolls, checks in, downloads with Range resume, verifies, installs into
    /// its own A/B state directory, self-tests, confirms or reverts, runs inference traffic and
    /// reports telemetry. Faults: drop=P (requests fail, downloads drop midway), corrupt=P
    /// (a flipped byte: the SHA-256 check catches it), crash=P (an install aborts midway and
    /// the device restarts from its persisted state). Prints devices per version over time,
    /// the check-ins answered per second and their round-trip percentiles (p50, p90, p99,
    /// p99.9), and fails when a device was ever left without a verified model.
    ///
    /// Example: `kiln simulate --server http://127.0.0.1:8080 --enroll-token E --devices 100
    /// --trusted-key release.pub --faults drop=0.05,corrupt=0.01,crash=0.01 --duration 60`
    Simulate {
        /// Fleet server URL.
        #[arg(long, value_name = "URL")]
        server: String,
        /// The server's enroll token.
        #[arg(long, value_name = "E")]
        enroll_token: String,
        /// Number of devices.
        #[arg(long, value_name = "N")]
        devices: usize,
        /// Public key(s) the devices trust (from `kiln keygen`).
        #[arg(long = "trusted-key", value_name = "K.pub", required = true)]
        trusted_keys: Vec<PathBuf>,
        /// Board name the devices report.
        #[arg(long, value_name = "B", default_value = "sim")]
        board: String,
        /// Cohort the devices enroll in.
        #[arg(long, value_name = "NAME")]
        cohort: Option<String>,
        /// Self-test fails for this version on every device.
        #[arg(long, value_name = "V")]
        fail_version: Option<u32>,
        /// Inputs drift (outside the BASELINE range) on this version.
        #[arg(long, value_name = "V")]
        drift_version: Option<u32>,
        /// Faults: drop=P,corrupt=P,crash=P (probabilities in 0..1).
        #[arg(long, value_name = "drop=P,corrupt=P,crash=P")]
        faults: Option<String>,
        /// Seconds to run.
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        duration: u64,
        /// Longest pause between a device's check-ins, seconds.
        #[arg(long, value_name = "SECS", default_value_t = 2.0)]
        max_poll: f64,
        /// Devices start at random moments over this many seconds (default: --max-poll), so a
        /// large fleet does not enroll in one burst.
        #[arg(long, value_name = "SECS")]
        ramp: Option<f64>,
        /// Also trust this CA certificate (PEM) for an https:// server.
        #[arg(long, env = "KILN_CA_CERT", value_name = "PEM")]
        ca_cert: Option<PathBuf>,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Fleet verbs: serve, push, rollout, rollback, models, devices.
    #[command(flatten)]
    Fleet(kiln::fleet::cli::FleetCommand),
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
    let (graph, format, source) = kiln::import::import_file(model)?;
    let name = name.unwrap_or_else(|| {
        model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let samples = selftest.map(npy::read_input).transpose()?;
    let converted = kiln::convert::convert_graph_with(
        graph,
        format,
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

/// Where `kiln bench` measures.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum BenchTarget {
    /// This machine, one thread.
    Host,
    /// A Cortex-M4 (mps2-an386) under qemu-system-arm.
    QemuCortexM4,
    /// A Cortex-M7 (mps2-an500) under qemu-system-arm.
    QemuCortexM7,
    /// A 64-bit ARM Linux core under user-mode qemu-aarch64.
    QemuAarch64,
}

fn bench(
    model: &Path,
    target: BenchTarget,
    runs: usize,
    (mhz, portable_kernels): (f64, bool),
    (backend, per_op): (RunBackend, bool),
    json: bool,
) -> Result<()> {
    let artifact = read(model)?;
    let qemu_target = match target {
        BenchTarget::Host => None,
        BenchTarget::QemuCortexM4 => Some("qemu-cortex-m4"),
        BenchTarget::QemuCortexM7 => Some("qemu-cortex-m7"),
        BenchTarget::QemuAarch64 => Some("qemu-aarch64"),
    };
    if let Some(t) = qemu_target {
        if backend != RunBackend::Portable {
            bail!("--backend candle runs on the host only; drop it for --target {t}");
        }
        if per_op {
            bail!("--per-op times ops on the host only; drop it for --target {t}");
        }
        let spinner = progress(0, "benchmarking");
        spinner.enable_steady_tick(std::time::Duration::from_millis(200));
        let r = kiln::bench_qemu::bench_qemu(&artifact, t, portable_kernels, mhz, |what| {
            spinner.set_message(what.to_string())
        })?;
        spinner.finish_and_clear();
        if json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            eprintln!(
                "{}: one inference on {} ({} kernels): {} instructions, {} MACs ({:.3} MACs/instruction), arena {} B, stack {} B, code {} B; ≥ {:.0} us at {} MHz; output bit-exact with the portable interpreter",
                model.display(),
                r.target,
                r.kernels,
                r.instructions,
                r.macs,
                r.macs_per_instruction,
                r.arena_bytes,
                r.stack_bytes
                    .map_or_else(|| "-".to_string(), |b| b.to_string()),
                r.code_bytes,
                r.estimated_us,
                r.mhz
            );
        }
        return Ok(());
    }
    let bar = progress(0, "benchmarking");
    let backend = match backend {
        RunBackend::Portable => kiln::bench::Backend::Portable,
        RunBackend::Candle => kiln::bench::Backend::Candle,
    };
    let r = kiln::bench::bench_host(&artifact, runs, backend, per_op, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        eprintln!(
            "{}: {} runs on the host ({:?} backend, {} kernels{}): median {:.1} us, p99 {:.1} us, min {:.1} us; {} MACs ({:.0} MACs/us at the median), arena {} bytes",
            model.display(),
            r.runs,
            r.backend,
            r.kernels,
            if r.selftest_input { ", self-test input" } else { ", zero input" },
            r.median_us,
            r.p99_us,
            r.min_us,
            r.macs,
            r.macs_per_us,
            r.arena_bytes
        );
        if let Some(ops) = &r.ops {
            eprintln!(
                "{:>4}  {:<20} {:<16} {:>11} {:>10} {:>6} {:>9}",
                "#", "op", "output", "MACs", "median us", "share", "MACs/us"
            );
            for o in ops {
                let shape = o
                    .output_shape
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join("x");
                let rate = if o.median_us > 0.0 && o.macs > 0 {
                    format!("{:.0}", o.macs as f64 / o.median_us)
                } else {
                    "-".into()
                };
                eprintln!(
                    "{:>4}  {:<20} {:<16} {:>11} {:>10.2} {:>5.1}% {:>9}",
                    o.index,
                    o.op,
                    shape,
                    o.macs,
                    o.median_us,
                    o.share * 100.0,
                    rate
                );
            }
        }
    }
    Ok(())
}

/// Where `kiln run` executes a model.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum RunBackend {
    /// kiln-runtime's portable kernels.
    Portable,
    /// kiln-runtime's candle backend.
    Candle,
}

fn run(
    model: &Path,
    input: &Path,
    output: Option<&Path>,
    json: bool,
    backend: RunBackend,
) -> Result<()> {
    let artifact = read(model)?;
    let x = npy::read_input(input)?;
    let bar = progress(0, "running");
    let mut started = false;
    let step = |done: usize| {
        if !started {
            started = true;
            bar.set_length(x.shape().first().copied().unwrap_or(1) as u64);
        }
        bar.set_position(done as u64);
    };
    let result = match backend {
        RunBackend::Portable => runner::run_batch(&artifact, &x, step),
        RunBackend::Candle => runner::run_batch_candle(&artifact, &x, step),
    }
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

#[allow(clippy::too_many_arguments)]
fn quantize(
    model: &Path,
    output: &Path,
    precision: kiln::quantize::pipeline::Precision,
    calib: &Path,
    weights: Option<&Path>,
    input_scale: Option<f32>,
    estimator: kiln::quantize::ranges::Estimator,
    bias_correction: bool,
    eval: Option<&Path>,
    metric: kiln::quantize::pipeline::Metric,
    max_accuracy_drop: Option<f64>,
    selftest_count: usize,
    name: Option<String>,
    json: bool,
) -> Result<()> {
    use kiln::convert::sha256_hex;
    use kiln::quantize::pipeline::{self, EvalSet, Request};
    let (mut graph, format, source) = kiln::import::import_file(model)?;
    let weights_report = match weights {
        Some(w) => Some(
            kiln::weights::apply_weights(&mut graph, &read(w)?, false)
                .with_context(|| format!("cannot apply the weights of {}", w.display()))?,
        ),
        None => None,
    };
    let x = npy::read_real(calib, None, input_scale)?;
    let calib_sha256 = sha256_hex(&read(calib)?);
    let eval_data = match eval {
        Some(p) => Some((
            npy::read_real(p, None, input_scale)?,
            npy::read_labels(p)?,
            sha256_hex(&read(p)?),
        )),
        None => None,
    };
    let name = name.unwrap_or_else(|| {
        model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let bar = progress(0, "quantizing");
    let req = Request {
        name,
        graph,
        source: serde_json::json!({ "format": format, "sha256": sha256_hex(&source), "bytes": source.len() }),
        calib: &x,
        calib_sha256,
        precision,
        options: pipeline::options(estimator, bias_correction),
        eval: eval_data.as_ref().map(|(x, y, sha256)| EvalSet {
            x,
            y,
            metric,
            sha256: sha256.clone(),
        }),
        max_accuracy_drop,
        selftest_count,
        extra: serde_json::json!({ "input_scale": input_scale, "weights": weights_report }),
    };
    let q = pipeline::quantize(req, |what, done, total| {
        bar.set_message(what.to_string());
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("cannot quantize {}", model.display()))?;
    bar.finish_and_clear();
    std::fs::write(output, &q.artifact)
        .with_context(|| format!("cannot write {}", output.display()))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "output": output, "report": q.report })
            )?
        );
    } else {
        let r = &q.report;
        eprintln!(
            "{:>4}  {:<18} {:<6} {:>12} {:>10} {:>10} {:>9}",
            "#", "op", "type", "MACs", "params", "output B", "SQNR dB"
        );
        for l in &r.layers {
            eprintln!(
                "{:>4}  {:<18} {:<6} {:>12} {:>10} {:>10} {:>9.1}",
                l.index, l.op, l.precision, l.macs, l.params, l.output_bytes, l.sqnr_db
            );
        }
        if let (Some(f), Some(qm), Some(m)) = (r.float_metric, r.quantized_metric, r.metric) {
            eprintln!(
                "{m:?}: float {:.2} %, quantized {:.2} % ({:+.2} pt)",
                f * 100.0,
                qm * 100.0,
                (qm - f) * 100.0
            );
        }
        eprintln!(
            "wrote {} ({} bytes): arena {} bytes, weights {} bytes, {:.0} % of MACs in int8, {} self-test(s)",
            output.display(),
            r.artifact_bytes,
            r.arena_bytes,
            r.weights_bytes,
            r.int8_mac_fraction * 100.0,
            r.self_tests
        );
    }
    Ok(())
}

fn eval(
    model: &Path,
    data: &Path,
    metric: kiln::quantize::pipeline::Metric,
    input_scale: Option<f32>,
    reference: Option<&Path>,
    json: bool,
) -> Result<()> {
    use kiln::quantize::pipeline::{measure, EvalSet, Metric};
    let artifact = read(model)?;
    let x = npy::read_real(data, None, input_scale)?;
    let y = npy::read_labels(data)?;
    let set = EvalSet {
        x: &x,
        y: &y,
        metric,
        sha256: kiln::convert::sha256_hex(&read(data)?),
    };
    let reference = match reference {
        Some(r) if r.extension().and_then(|e| e.to_str()) == Some("kiln") => Some(read(r)?),
        Some(r) => {
            let (g, _, _) = kiln::import::import_file(r)?;
            Some(kiln::convert::assemble_graph(&g, "reference")?)
        }
        None => None,
    };
    // Classification: run each model once (with a progress bar) and derive every figure from
    // those outputs. Anomaly scores: `measure`.
    let run = |art: &[u8], what: &str| -> Result<(Vec<f32>, usize)> {
        let bar = progress(0, what);
        let r = kiln::eval::run_real(art, &x, |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        });
        bar.finish_and_clear();
        r
    };
    let out = match metric {
        Metric::Top1 => {
            let (a, per) = run(&artifact, "evaluating")
                .with_context(|| format!("cannot evaluate {}", model.display()))?;
            let mut out =
                serde_json::json!({ "top1": kiln::eval::top1(&a, per, &y), "samples": y.len() });
            if let Some(r) = &reference {
                let (b, _) = run(r, "reference")?;
                out["reference"] = serde_json::json!({ "top1": kiln::eval::top1(&b, per, &y) });
                out["agreement"] = serde_json::json!(kiln::eval::agreement(&a, &b, per));
                out["sqnr_db"] = serde_json::json!(kiln::eval::sqnr_db(&b, &a));
            }
            out
        }
        Metric::Auc => {
            let score = measure(&artifact, &set)
                .with_context(|| format!("cannot evaluate {}", model.display()))?;
            let mut out = serde_json::json!({ "auc": score, "samples": y.len() });
            if let Some(r) = &reference {
                out["reference"] = serde_json::json!({ "auc": measure(r, &set)? });
            }
            out
        }
    };
    if json {
        println!("{out}");
    } else {
        eprintln!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

fn export_weights(model: &Path, output: &Path, dequantize: bool) -> Result<()> {
    let artifact = read(model)?;
    let bytes = kiln::weights::export_weights(&artifact, dequantize)
        .with_context(|| format!("cannot export the weights of {}", model.display()))?;
    std::fs::write(output, &bytes).with_context(|| format!("cannot write {}", output.display()))?;
    eprintln!("wrote {} ({} bytes)", output.display(), bytes.len());
    Ok(())
}

struct PruneArgs<'a> {
    model: &'a Path,
    output: &'a Path,
    sparsity: f64,
    structured: bool,
    calib: Option<&'a Path>,
    input_scale: Option<f32>,
    distill_steps: usize,
    eval: Option<&'a Path>,
    metric: kiln::quantize::pipeline::Metric,
    max_accuracy_drop: Option<f64>,
    json: bool,
}

fn prune(a: PruneArgs<'_>) -> Result<()> {
    let PruneArgs {
        model,
        output,
        sparsity,
        structured,
        calib,
        input_scale,
        distill_steps,
        eval,
        metric,
        max_accuracy_drop,
        json,
    } = a;
    if max_accuracy_drop.is_some() && eval.is_none() {
        anyhow::bail!("--max-accuracy-drop needs --eval DATA.npz to measure the drop");
    }
    let (graph, format, source) = kiln::import::import_file(model)?;
    let (pruned, report) = if structured {
        let calib =
            calib.context("--structured needs --calib DATA.npz for the least-squares refit")?;
        let x = npy::read_real(calib, None, input_scale)?;
        let bar = progress(0, "pruning");
        let r = kiln::prune::prune_structured_distilled(
            &graph,
            sparsity,
            &x,
            distill_steps,
            |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            },
        )?;
        bar.finish_and_clear();
        r
    } else {
        kiln::prune::prune_unstructured(&graph, sparsity)?
    };
    let name = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let lineage = serde_json::json!({
        "source": { "format": format, "sha256": kiln::convert::sha256_hex(&source), "bytes": source.len() },
        "calibration": calib.map(|c| read(c).map(|b| kiln::convert::sha256_hex(&b))).transpose()?,
        "options": { "command": "prune", "sparsity": sparsity, "structured": structured, "input_scale": input_scale, "distill_steps": distill_steps },
        "prune": report,
    });
    let mut lineage = lineage;
    let artifact = kiln::convert::assemble_graph_with_lineage(&pruned, &name, lineage.clone())?;
    // The gate: unpruned and pruned scored on the same data.
    let mut scores = serde_json::Value::Null;
    let artifact = match eval {
        Some(e) => {
            use kiln::quantize::pipeline::{measure, EvalSet};
            let x = npy::read_real(e, None, input_scale)?;
            let y = npy::read_labels(e)?;
            let set = EvalSet {
                x: &x,
                y: &y,
                metric,
                sha256: kiln::convert::sha256_hex(&read(e)?),
            };
            let before = measure(&kiln::convert::assemble_graph(&graph, "unpruned")?, &set)?;
            let after = measure(&artifact, &set)?;
            if let Some(limit) = max_accuracy_drop {
                let drop = (before - after) * 100.0;
                if drop > limit {
                    anyhow::bail!(
                        "accuracy gate: the pruned model scores {:.2} % against the unpruned model's {:.2} % (drop {drop:.2} pt > --max-accuracy-drop {limit} pt); no artifact written\nhint: ask for a lower --sparsity",
                        after * 100.0,
                        before * 100.0
                    );
                }
            }
            scores = serde_json::json!({ "metric": metric, "unpruned": before, "pruned": after, "eval_sha256": set.sha256 });
            lineage["metrics"] = scores.clone();
            kiln::convert::assemble_graph_with_lineage(&pruned, &name, lineage)?
        }
        None => artifact,
    };
    std::fs::write(output, &artifact)
        .with_context(|| format!("cannot write {}", output.display()))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "output": output, "report": report, "metrics": scores })
            )?
        );
    } else {
        eprintln!(
            "wrote {}: sparsity {:.1} %, weights {} B dense / {} B bitmap-sparse, MACs {} -> {} (-{:.1} %)",
            output.display(),
            report.sparsity * 100.0,
            report.dense_bytes,
            report.compressed_bytes,
            report.macs_before,
            report.macs_after,
            (1.0 - report.macs_after as f64 / report.macs_before.max(1) as f64) * 100.0
        );
        for (conv, before, removed) in &report.channels_removed {
            eprintln!("  {conv}: {removed} of {before} channels removed");
        }
        if !scores.is_null() {
            eprintln!(
                "  {metric:?}: unpruned {}, pruned {}",
                scores["unpruned"], scores["pruned"]
            );
        }
    }
    Ok(())
}

fn keygen(output: &Path, force: bool, json: bool) -> Result<()> {
    use kiln::signing;
    let key = signing::generate_key()?;
    let paths = signing::write_key_pair(output, &key, force)?;
    let id = signing::key_id_hex(&signing::signing_key_id(&key));
    if json {
        println!(
            "{}",
            serde_json::json!({ "secret_key": paths.secret, "public_key": paths.public, "key_id": id })
        );
    } else {
        eprintln!(
            "wrote {} (secret, mode 0600: keep it private) and {}\nkey id {id}",
            paths.secret.display(),
            paths.public.display()
        );
    }
    Ok(())
}

/// Warns when a secret key file can be read by other users.
fn warn_if_shared(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                eprintln!(
                    "warning: {} can be read by other users; hint: chmod 600 {}",
                    path.display(),
                    path.display()
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

struct SignArgs<'a> {
    model: &'a Path,
    key: &'a Path,
    version: u32,
    security_counter: u32,
    target: Option<&'a str>,
    output: &'a Path,
    json: bool,
}

fn sign(a: SignArgs<'_>) -> Result<()> {
    use kiln::signing::{self, key_id_hex};
    // Cheap checks first.
    signing::target_field(a.target)?;
    let key = signing::load_signing_key(a.key)?;
    warn_if_shared(a.key);
    let artifact = read(a.model)?;
    let signed = signing::sign(&artifact, &key, a.version, a.security_counter, a.target)
        .map_err(|e| anyhow::anyhow!("cannot sign {}: {e}", a.model.display()))?;
    std::fs::write(a.output, &signed.artifact)
        .with_context(|| format!("cannot write {}", a.output.display()))?;
    let ids = |v: &[kiln_runtime::signature::KeyId]| v.iter().map(key_id_hex).collect::<Vec<_>>();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "output": a.output,
                "version": a.version,
                "security_counter": a.security_counter,
                "target": a.target.unwrap_or(""),
                "key_id": key_id_hex(&signed.key_id),
                "signatures": ids(&signed.signatures),
                "dropped": ids(&signed.dropped),
                "replaced": signed.replaced,
            })
        );
    } else {
        eprintln!(
            "wrote {}: version {}, security counter {}, target {}, signed by key {} ({} signature(s))",
            a.output.display(),
            a.version,
            a.security_counter,
            a.target.unwrap_or("any board"),
            key_id_hex(&signed.key_id),
            signed.signatures.len()
        );
        if !signed.dropped.is_empty() {
            eprintln!(
                "note: the header changed, so the earlier signature(s) by key(s) {} no longer apply and were dropped; have those keys sign {} again",
                ids(&signed.dropped).join(", "),
                a.output.display()
            );
        }
        if signed.replaced && signed.dropped.is_empty() {
            eprintln!("note: replaced the earlier signature by the same key");
        }
    }
    Ok(())
}

fn verify(model: &Path, pubkeys: &[PathBuf], json: bool) -> Result<()> {
    use kiln::signing::{self, key_id_hex};
    let trusted = pubkeys
        .iter()
        .map(|p| signing::load_public_key(p))
        .collect::<Result<Vec<_>, _>>()?;
    let artifact = read(model)?;
    match signing::verify_artifact(&artifact, &trusted) {
        Ok(info) => {
            let target = if info.target.is_empty() {
                "any board"
            } else {
                &info.target
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "valid": true,
                        "version": info.model_version,
                        "security_counter": info.security_counter,
                        "target": info.target,
                        "key_id": key_id_hex(&info.key_id),
                        "signatures": info.signatures.iter().map(key_id_hex).collect::<Vec<_>>(),
                        "sha256": info.sha256.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                    })
                );
            } else {
                eprintln!(
                    "{}: valid, version {}, security counter {}, target {target}, signed by key {}",
                    model.display(),
                    info.model_version,
                    info.security_counter,
                    key_id_hex(&info.key_id)
                );
            }
            Ok(())
        }
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "valid": false, "reason": e.code(), "message": e.to_string() })
                );
            }
            anyhow::bail!("{} does not verify: {e}", model.display())
        }
    }
}

fn key_record(
    action: kiln_device::keys::KeyAction,
    subject: &Path,
    key: &Path,
    output: &Path,
    json: bool,
) -> Result<()> {
    use kiln::signing::{self, key_id_hex};
    let subject_key = signing::load_public_key(subject)?;
    let signer = signing::load_signing_key(key)?;
    warn_if_shared(key);
    let record = signing::make_key_record(action, &subject_key, &signer);
    std::fs::write(output, record).with_context(|| format!("cannot write {}", output.display()))?;
    let verb = match action {
        kiln_device::keys::KeyAction::Admit => "admit",
        kiln_device::keys::KeyAction::Revoke => "revoke",
    };
    let subject_id = key_id_hex(&kiln_runtime::signature::key_id(&subject_key));
    let signer_id = key_id_hex(&signing::signing_key_id(&signer));
    if json {
        println!(
            "{}",
            serde_json::json!({ "output": output, "action": verb, "subject_key_id": subject_id, "signer_key_id": signer_id })
        );
    } else {
        eprintln!(
            "wrote {} ({} bytes): {verb} key {subject_id}, signed by key {signer_id}; devices that trust key {signer_id} accept it",
            output.display(),
            record.len()
        );
    }
    Ok(())
}

/// How to reach a board (`kiln flash`, `kiln device-info`, `kiln infer`).
#[derive(clap::Args, Debug)]
struct SerialArgs {
    /// The board: tcp:HOST:PORT (QEMU's `-serial tcp::PORT,server`, a network bridge) or a serial
    /// device (/dev/ttyACM0, COM3).
    #[arg(long, value_name = "tcp:HOST:PORT|/dev/ttyX")]
    serial: String,
    /// Baud rate of a serial device (8 data bits, no parity, 1 stop bit).
    #[arg(long, value_name = "N", default_value_t = kiln::device_link::transport::DEFAULT_BAUD)]
    baud: u32,
    /// Seconds to wait for the connection and for each short request (default 5 to connect, 2
    /// per request); each request is resent 3 times. Erasing, verifying, inference and the
    /// trial boot get at least 30, 60, 10 and 60 s.
    #[arg(long, value_name = "S")]
    timeout: Option<f64>,
}

fn open_link(a: &SerialArgs) -> Result<kiln::device_link::Link> {
    use kiln::device_link::{Endpoint, Link, Timeouts};
    let timeouts = match a.timeout {
        Some(t) if t.is_finite() && t > 0.0 && t <= 86_400.0 => {
            Timeouts::with_request(std::time::Duration::from_secs_f64(t))
        }
        Some(t) => anyhow::bail!("--timeout {t} is not a number of seconds between 0 and 86400"),
        None => Timeouts::default(),
    };
    let endpoint = Endpoint::parse(&a.serial, a.baud)?;
    Ok(Link::open(endpoint, timeouts)?)
}

fn flash(
    model: Option<&Path>,
    link: &SerialArgs,
    key_record: Option<&Path>,
    json: bool,
) -> Result<()> {
    use kiln::device_link::{self as dl, FlashEvent, OpError};
    // Cheap checks first: both files are read before the board is touched.
    let artifact = model.map(read).transpose()?;
    let record = key_record.map(read).transpose()?;
    let fail = |e: OpError, path: Option<&Path>| {
        let message = match (&e, path) {
            (OpError::Artifact { .. } | OpError::KeyRecord { .. }, Some(p)) => {
                format!("{}: {e}", p.display())
            }
            _ => e.to_string(),
        };
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "installed": false,
                    "error": e.code(),
                    "device_error": e.device_code().map(|c| c.name()),
                    "message": message,
                })
            );
        }
        anyhow::anyhow!(message)
    };
    let mut l = open_link(link).inspect_err(|e| {
        if json {
            println!(
                "{}",
                serde_json::json!({ "installed": false, "error": "link", "device_error": null, "message": e.to_string() })
            );
        }
    })?;
    let mut out = serde_json::Map::new();
    if let (Some(r), Some(path)) = (&record, key_record) {
        let trusted = dl::install_key_record(&mut l, r).map_err(|e| fail(e, Some(path)))?;
        if !json {
            eprintln!(
                "installed key record {}: the device trusts {trusted} key(s) now",
                path.display()
            );
        }
        out.insert(
            "key_record".into(),
            serde_json::json!({ "path": path, "trusted_keys": trusted }),
        );
    }
    let Some(artifact) = artifact else {
        if json {
            out.insert("installed".into(), false.into());
            println!("{}", serde_json::Value::Object(out));
        }
        return Ok(());
    };
    let bar = ProgressBar::hidden();
    let report = dl::flash(&mut l, &artifact, &mut |event| match event {
        FlashEvent::Begin { resume_from, total } => {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_length(total.into());
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} ({binary_bytes_per_sec}, eta {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message("sending");
            bar.set_position(resume_from.into());
            bar.reset_eta();
            if resume_from > 0 {
                bar.println(format!(
                    "resuming an interrupted transfer at byte {resume_from} of {total}"
                ));
            }
        }
        FlashEvent::Sent { offset, .. } => bar.set_position(offset.into()),
        FlashEvent::Committing => bar.set_message("verifying"),
        FlashEvent::Committed { version } => {
            bar.finish_and_clear();
            if !json {
                eprintln!("the device accepted v{version} and reboots into its trial; waiting for its self-test");
            }
        }
    });
    bar.finish_and_clear();
    let r = report.map_err(|e| fail(e, model))?;
    if json {
        let mut v = serde_json::to_value(&r)?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert("installed".into(), true.into());
            out.append(obj);
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::Value::Object(out))?
        );
    } else {
        let name = if r.name.is_empty() {
            "the model"
        } else {
            &r.name
        };
        let was = r
            .previous_version
            .map_or_else(|| "no model before".to_string(), |v| format!("was v{v}"));
        let resumed = if r.resume_from > 0 {
            format!(", resumed at byte {}", r.resume_from)
        } else {
            String::new()
        };
        eprintln!(
            "installed {name} v{} in slot {} ({was}): {} bytes in {:.1} s{resumed}; confirmed by its self-test on the device",
            r.version, r.slot, r.total_bytes, r.seconds
        );
    }
    Ok(())
}

fn device_info(link: &SerialArgs, json: bool) -> Result<()> {
    let mut l = open_link(link)?;
    let info = kiln::device_link::device_info(&mut l)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        eprint!("{}", info.render());
    }
    Ok(())
}

struct InferArgs<'a> {
    link: &'a SerialArgs,
    input: &'a Path,
    array: Option<&'a str>,
    index: Option<usize>,
    all: bool,
    model: Option<&'a Path>,
    output: &'a Path,
    json: bool,
}

fn infer(a: InferArgs<'_>) -> Result<()> {
    use kiln::device_link::tensors::{self, Selection, TypedModel};
    // Files first, then the board.
    let x = match a.array {
        Some(name) => npy::read_real(a.input, Some(name), None)?,
        None => npy::read_input(a.input)?,
    };
    let typed = match a.model {
        Some(p) => Some(
            TypedModel::new(&read(p)?).with_context(|| format!("cannot use {}", p.display()))?,
        ),
        None => None,
    };
    let selection = match (a.index, a.all) {
        (Some(i), _) => Selection::Index(i),
        (None, true) => Selection::All,
        (None, false) => Selection::Single,
    };
    let mut l = open_link(a.link)?;
    let info = kiln::device_link::device_info(&mut l)?;
    let Some(active) = info.active.clone() else {
        anyhow::bail!(
            "no model is installed on the device at {}: flash one with `kiln flash`",
            a.link.serial
        );
    };
    if let (Some(t), Some(p)) = (&typed, a.model) {
        if t.version != active.version {
            anyhow::bail!(
                "{} is v{} but the device runs {} v{}: give --model the artifact the device runs, or leave it out to send raw bytes",
                p.display(), t.version, active.name, active.version
            );
        }
    }
    let samples = tensors::samples(&x, active.input_len as usize, selection, typed.as_ref())
        .with_context(|| format!("cannot use {} as input", a.input.display()))?;
    let bar = progress(samples.len() as u64, "inferring");
    let mut raw = Vec::with_capacity(samples.len());
    let mut cycles = Vec::with_capacity(samples.len());
    for s in &samples {
        let r = kiln::device_link::infer(&mut l, &info, s)?;
        raw.push(r.output);
        cycles.push(r.cycles);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let out = tensors::outputs(&raw, active.output_len as usize, typed.as_ref())?;
    npy::write_npy(a.output, &out.shape, out.data())?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "samples": samples.len(),
                "model": { "name": active.name, "version": active.version },
                "output": a.output,
                "output_shape": out.shape,
                "dtype": out.dtype(),
                "raw": typed.is_none(),
                "cycles": cycles,
            })
        );
    } else {
        eprintln!(
            "ran {} sample(s) on {} v{}; wrote {} ({} {:?}{})",
            samples.len(),
            active.name,
            active.version,
            a.output.display(),
            out.dtype(),
            out.shape,
            if typed.is_none() {
                ", raw output bytes"
            } else {
                ""
            }
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo {
            out,
            json,
            no_fleet,
        } => kiln::demo::run(&kiln::demo::DemoOptions {
            out,
            json,
            fleet: !no_fleet,
            ..Default::default()
        })
        .map(drop),
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
            backend,
        } => run(&model, &input, output.as_deref(), json, backend),
        Command::Inspect { model, json } => inspect(&model, json),
        Command::Bench {
            model,
            target,
            runs,
            mhz,
            portable_kernels,
            backend,
            per_op,
            json,
        } => bench(
            &model,
            target,
            runs,
            (mhz, portable_kernels),
            (backend, per_op),
            json,
        ),
        Command::Quantize {
            model,
            output,
            precision,
            calib,
            weights,
            input_scale,
            estimator,
            no_bias_correction,
            eval: eval_set,
            metric,
            max_accuracy_drop,
            selftest_count,
            name,
            json,
        } => quantize(
            &model,
            &output,
            precision,
            &calib,
            weights.as_deref(),
            input_scale,
            estimator,
            !no_bias_correction,
            eval_set.as_deref(),
            metric,
            max_accuracy_drop,
            selftest_count,
            name,
            json,
        ),
        Command::Prune {
            model,
            output,
            sparsity,
            structured,
            calib,
            input_scale,
            distill_steps,
            eval: eval_set,
            metric,
            max_accuracy_drop,
            json,
        } => prune(PruneArgs {
            model: &model,
            output: &output,
            sparsity,
            structured,
            calib: calib.as_deref(),
            input_scale,
            distill_steps,
            eval: eval_set.as_deref(),
            metric,
            max_accuracy_drop,
            json,
        }),
        Command::Eval {
            model,
            data,
            metric,
            input_scale,
            reference,
            json,
        } => eval(
            &model,
            &data,
            metric,
            input_scale,
            reference.as_deref(),
            json,
        ),
        Command::ExportWeights {
            model,
            output,
            dequantize,
        } => export_weights(&model, &output, dequantize),
        Command::Keygen {
            output,
            force,
            json,
        } => keygen(&output, force, json),
        Command::Sign {
            model,
            key,
            version,
            security_counter,
            target,
            output,
            json,
        } => sign(SignArgs {
            model: &model,
            key: &key,
            version,
            security_counter,
            target: target.as_deref(),
            output: &output,
            json,
        }),
        Command::Verify {
            model,
            pubkeys,
            json,
        } => verify(&model, &pubkeys, json),
        Command::AdmitKey {
            subject,
            key,
            output,
            json,
        } => key_record(
            kiln_device::keys::KeyAction::Admit,
            &subject,
            &key,
            &output,
            json,
        ),
        Command::RevokeKey {
            subject,
            key,
            output,
            json,
        } => key_record(
            kiln_device::keys::KeyAction::Revoke,
            &subject,
            &key,
            &output,
            json,
        ),
        Command::Flash {
            model,
            link,
            key_record,
            json,
        } => flash(model.as_deref(), &link, key_record.as_deref(), json),
        Command::DeviceInfo { link, json } => device_info(&link, json),
        Command::Infer {
            link,
            input,
            array,
            index,
            all,
            model,
            output,
            json,
        } => infer(InferArgs {
            link: &link,
            input: &input,
            array: array.as_deref(),
            index,
            all,
            model: model.as_deref(),
            output: &output,
            json,
        }),
        Command::Fleet(cmd) => kiln::fleet::cli::run(cmd),
        Command::Simulate {
            server,
            enroll_token,
            devices,
            trusted_keys,
            board,
            cohort,
            fail_version,
            drift_version,
            faults,
            duration,
            max_poll,
            ramp,
            ca_cert,
            json,
        } => simulate(SimulateArgs {
            server,
            enroll_token,
            devices,
            trusted_keys,
            board,
            cohort,
            fail_version,
            drift_version,
            faults,
            duration,
            max_poll,
            ramp,
            ca_cert,
            json,
        }),
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

/// `kiln simulate` arguments.
struct SimulateArgs {
    server: String,
    enroll_token: String,
    devices: usize,
    trusted_keys: Vec<PathBuf>,
    board: String,
    cohort: Option<String>,
    fail_version: Option<u32>,
    drift_version: Option<u32>,
    faults: Option<String>,
    duration: u64,
    max_poll: f64,
    ramp: Option<f64>,
    ca_cert: Option<PathBuf>,
    json: bool,
}

/// Parses `drop=P,corrupt=P,crash=P`.
fn parse_faults(text: &str) -> Result<kiln_agent::agent::Faults> {
    let mut f = kiln_agent::agent::Faults::default();
    for part in text.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = part.split_once('=').with_context(|| {
            format!(
                "fault {part:?} is not NAME=P\nhint: --faults drop=0.05,corrupt=0.01,crash=0.01"
            )
        })?;
        let p: f64 = v
            .trim()
            .parse()
            .ok()
            .filter(|p: &f64| (0.0..=1.0).contains(p))
            .with_context(|| format!("fault {k}: {v:?} is not a probability in 0..1"))?;
        match k.trim() {
            "drop" => f.drop = p,
            "corrupt" => f.corrupt = p,
            "crash" => f.crash = p,
            other => bail!("unknown fault {other:?}\nhint: the faults are drop, corrupt and crash"),
        }
    }
    Ok(f)
}

fn simulate(a: SimulateArgs) -> Result<()> {
    let mut keys = Vec::new();
    for k in &a.trusted_keys {
        let text =
            std::fs::read_to_string(k).with_context(|| format!("cannot read {}", k.display()))?;
        keys.push(kiln_device::keys::parse_public_key(&text).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a public key ({e:?})\nhint: pass the .pub file from `kiln keygen`",
                k.display()
            )
        })?);
    }
    if !(a.max_poll > 0.0 && a.max_poll.is_finite()) {
        bail!("--max-poll must be a positive number of seconds");
    }
    let ramp = a.ramp.unwrap_or(a.max_poll);
    if !(ramp >= 0.0 && ramp.is_finite()) {
        bail!("--ramp must be a number of seconds, 0 or more");
    }
    let mut ca_certs = Vec::new();
    if let Some(path) = &a.ca_cert {
        // Checked here so a bad file is one line now, not an error in every device.
        kiln::fleet::client::ca_certificates(path)?;
        ca_certs
            .push(std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?);
    }
    let opts = kiln_agent::sim::SimOptions {
        ca_certs,
        board: a.board,
        trusted_keys: keys,
        fail_version: a.fail_version,
        drift_version: a.drift_version,
        faults: match &a.faults {
            Some(t) => parse_faults(t)?,
            None => kiln_agent::agent::Faults::default(),
        },
        duration: std::time::Duration::from_secs(a.duration),
        max_poll: std::time::Duration::from_secs_f64(a.max_poll),
        ramp: std::time::Duration::from_secs_f64(ramp),
        cohort: a.cohort,
        ..kiln_agent::sim::SimOptions::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    eprintln!(
        "simulating {} devices against {} for {} s",
        a.devices, a.server, a.duration
    );
    let report = rt
        .block_on(kiln_agent::sim::simulate(
            &a.server,
            &a.enroll_token,
            a.devices,
            opts,
        ))
        .context("simulation failed")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for s in &report.timeline {
            let v: Vec<String> = s
                .versions
                .iter()
                .map(|(k, n)| format!("v{k}: {n}"))
                .collect();
            eprintln!("{:>7.1}s  {}", s.t_s, v.join("  "));
        }
        let l = &report.checkin_latency;
        eprintln!(
            "check-ins {} ({:.1}/s)  round trip ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            report.checkins,
            report.checkins_per_s,
            l.p50_ms,
            l.p90_ms,
            l.p99_ms,
            l.p999_ms,
            l.max_ms
        );
        eprintln!(
            "installs {}  install failures {}  self-test failures {}  rollbacks {}  crashes {}  \
             digest mismatches {}  http errors {}  resumed downloads {}  inferences {}",
            report.installs,
            report.install_failures,
            report.selftest_failures,
            report.rollbacks,
            report.crashes,
            report.digest_mismatches,
            report.http_errors,
            report.resumed_downloads,
            report.inferences
        );
    }
    if let Some(v) = report.invariant_violations.first() {
        bail!(
            "{} device(s) were left without a verified model (first: {v})",
            report.invariant_violations.len()
        );
    }
    Ok(())
}
