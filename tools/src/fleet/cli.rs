//! The fleet verbs of `kiln`: `serve`, `push`, `rollout`, `rollback`, `models`, `devices`.
//! Tables go to stderr for people, `--json` to stdout for scripts.

use super::api::{ModelRef, RollbackRequest, RolloutRequest, RolloutState, RolloutStatus};
use super::client::Client;
use super::server::{serve_until_signal, ServerConfig, TlsFiles};
use anyhow::{Context as _, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;

/// Where the server is and the token to use.
#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// Fleet server URL, e.g. http://fleet:8080.
    #[arg(long, env = "KILN_SERVER", value_name = "URL")]
    pub server: String,
    /// Admin token.
    #[arg(long, env = "KILN_TOKEN", value_name = "T", hide_env_values = true)]
    pub token: String,
    /// Also trust this CA certificate (PEM) for an https:// server, e.g. a private CA or the
    /// server's self-signed certificate.
    #[arg(long, env = "KILN_CA_CERT", value_name = "PEM")]
    pub ca_cert: Option<PathBuf>,
}

impl Conn {
    /// The admin client for this server, token and CA.
    ///
    /// # Errors
    /// The CA file cannot be read or parsed.
    pub fn client(&self) -> Result<Client> {
        Client::with_ca_cert(&self.server, &self.token, self.ca_cert.as_deref())
    }
}

/// The fleet verbs.
#[derive(Subcommand, Debug)]
pub enum FleetCommand {
    /// Run the fleet server: registry, devices, staged rollouts gated by telemetry.
    ///
    /// SQLite and a local artifact folder in --data-dir by default; --database postgres://… and
    /// --store URL (s3://bucket/prefix) for larger fleets (several servers may share one
    /// database). Pushed artifacts must be signed by a --trusted-key. HTTPS with --tls-cert and
    /// --tls-key; the fleet page is at / (it asks for the admin token). Stops gracefully on SIGTERM or Ctrl-C. The HTTP API is
    /// described in docs/FLEET_API.md.
    Serve {
        /// Data folder (SQLite database and artifacts).
        #[arg(long, value_name = "DIR", default_value = "kiln-fleet")]
        data_dir: PathBuf,
        /// Address to listen on.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
        listen: String,
        /// Database URL (sqlite://… or postgres://…); default: DIR/fleet.db.
        #[arg(long, value_name = "URL")]
        database: Option<String>,
        /// Object store URL for artifacts; default: DIR/artifacts.
        #[arg(long, value_name = "URL")]
        store: Option<String>,
        /// Admin token (registry, rollouts, listings).
        #[arg(
            long,
            env = "KILN_ADMIN_TOKEN",
            value_name = "T",
            hide_env_values = true
        )]
        admin_token: String,
        /// Enroll token (devices enroll with it).
        #[arg(
            long,
            env = "KILN_ENROLL_TOKEN",
            value_name = "E",
            hide_env_values = true
        )]
        enroll_token: String,
        /// Public key file (.pub) whose signatures are accepted; repeat for several.
        #[arg(long = "trusted-key", value_name = "K.pub", required = true)]
        trusted_keys: Vec<PathBuf>,
        /// Serve HTTPS with this certificate chain (PEM, server certificate first); needs
        /// --tls-key.
        #[arg(long, value_name = "CERT.pem", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key (PEM) of --tls-cert.
        #[arg(long, value_name = "KEY.pem", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Push a signed artifact to the registry and start a staged rollout of it.
    ///
    /// Prints {"rollout": ID} on stdout. Waves are cumulative percentages of the devices; each
    /// wave's gate is judged once --min-devices of it reported and --wave-wait passed.
    Push {
        /// The signed artifact.
        artifact: PathBuf,
        #[command(flatten)]
        conn: Conn,
        /// Only devices of this cohort.
        #[arg(long, value_name = "NAME")]
        cohort: Option<String>,
        /// Cumulative percentages per wave, ending at 100.
        #[arg(long, value_delimiter = ',', default_value = "5,25,100")]
        waves: Vec<u8>,
        /// Devices of a wave that must report before its gate is judged.
        #[arg(long, value_name = "N", default_value_t = 1)]
        min_devices: u32,
        /// Most install + self-test failures (and inference errors), in %.
        #[arg(long, value_name = "P", default_value_t = 5.0)]
        max_failure_pct: f64,
        /// Most p50 latency regression against the previous version, in %.
        #[arg(long, value_name = "L", default_value_t = 20.0)]
        max_latency_regression_pct: f64,
        /// Most PSI of any input or output against the artifact's BASELINE.
        #[arg(long, value_name = "X", default_value_t = 0.25)]
        max_psi: f64,
        /// Seconds each wave runs at least.
        #[arg(long = "wave-wait", value_name = "SECS", default_value_t = 300)]
        wave_wait_s: u32,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Look at or steer a rollout.
    Rollout {
        #[command(subcommand)]
        action: RolloutCommand,
    },
    /// Order every device of a model (in a cohort) back to a version.
    Rollback {
        /// Model name.
        #[arg(long, value_name = "NAME")]
        model: String,
        /// Version to go back to.
        #[arg(long, value_name = "VERSION")]
        to: u32,
        /// Only devices of this cohort.
        #[arg(long, value_name = "NAME")]
        cohort: Option<String>,
        #[command(flatten)]
        conn: Conn,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// List the registered model versions with their lineage.
    Models {
        #[command(flatten)]
        conn: Conn,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// List the enrolled devices and what they run.
    Devices {
        #[command(flatten)]
        conn: Conn,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Move a registered version to a stage: registered, staging, production, rejected,
    /// archived. Rollouts move versions by themselves (complete → production, the previous
    /// production version → archived; aborted → rejected); this is for the rest.
    ///
    /// Example: kiln stage --model kws --version 3 staging --server URL --token T
    Stage {
        /// Model name.
        #[arg(long)]
        model: String,
        /// Version.
        #[arg(long)]
        version: u32,
        /// The stage.
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(super::api::STAGES))]
        stage: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show the audit log: who pushed, rolled out, paused, aborted, rolled back or staged
    /// what, and when (newest first).
    Audit {
        /// Rows to show.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        conn: Conn,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
}

/// `kiln rollout …`.
#[derive(Subcommand, Debug)]
pub enum RolloutCommand {
    /// State, devices per version and each wave's gate figures.
    Status {
        /// Rollout id.
        id: i64,
        #[command(flatten)]
        conn: Conn,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Refresh every 2 s until the rollout completes or aborts.
        #[arg(long)]
        watch: bool,
    },
    /// Hold the rollout: no new devices get it.
    Pause {
        /// Rollout id.
        id: i64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Let a paused rollout go on.
    Resume {
        /// Rollout id.
        id: i64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Stop the rollout and order its devices back to the previous version.
    Abort {
        /// Rollout id.
        id: i64,
        #[command(flatten)]
        conn: Conn,
    },
}

/// Runs a fleet verb.
///
/// # Errors
/// One line for the user.
pub fn run(cmd: FleetCommand) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(run_async(cmd))
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn run_async(cmd: FleetCommand) -> Result<()> {
    match cmd {
        FleetCommand::Serve {
            data_dir,
            listen,
            database,
            store,
            admin_token,
            enroll_token,
            trusted_keys,
            tls_cert,
            tls_key,
        } => {
            let keys = trusted_keys
                .iter()
                .map(|p| crate::signing::load_public_key(p))
                .collect::<Result<Vec<_>, _>>()?;
            let config = ServerConfig {
                data_dir,
                database,
                store,
                admin_token,
                enroll_token,
                trusted_keys: keys,
            };
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
                _ => None,
            };
            serve_until_signal(config, &listen, tls.as_ref()).await
        }
        FleetCommand::Push {
            artifact,
            conn,
            cohort,
            waves,
            min_devices,
            max_failure_pct,
            max_latency_regression_pct,
            max_psi,
            wave_wait_s,
            json,
        } => {
            // The server checks the waves too; checking them first keeps a bad command from
            // registering the artifact and then failing.
            let increasing = waves.windows(2).all(|p| p[0] < p[1]);
            if waves.first().is_none_or(|w| *w == 0) || !increasing || waves.last() != Some(&100) {
                anyhow::bail!(
                    "--waves {waves:?} refused: give increasing cumulative percentages from 1 to 100 that end at 100, e.g. 5,25,100"
                );
            }
            let bytes = std::fs::read(&artifact).map_err(|e| {
                anyhow::anyhow!(
                    "cannot read {}: {e}; hint: give the path of a signed .kiln artifact",
                    artifact.display()
                )
            })?;
            let c = conn.client()?;
            let pushed = c.push(bytes).await?;
            eprintln!(
                "{} {} v{} (sha256 {})",
                if pushed.existed {
                    "already registered:"
                } else {
                    "registered:"
                },
                pushed.model.model,
                pushed.model.version,
                pushed.sha256
            );
            let id = c
                .create_rollout(&RolloutRequest {
                    target: pushed.model.clone(),
                    cohort,
                    waves,
                    min_devices,
                    max_failure_pct,
                    max_latency_regression_pct,
                    max_psi,
                    wave_wait_s,
                })
                .await?;
            if json {
                print_json(&serde_json::json!({ "rollout": id }))
            } else {
                eprintln!(
                    "rollout {id} started; follow it with `kiln rollout status {id} --watch`"
                );
                println!("{{\"rollout\": {id}}}");
                Ok(())
            }
        }
        FleetCommand::Rollout { action } => match action {
            RolloutCommand::Status {
                id,
                conn,
                json,
                watch,
            } => {
                let c = conn.client()?;
                loop {
                    let s = c.rollout_status(id).await?;
                    print_status(&s);
                    let done = !matches!(s.state, RolloutState::Running | RolloutState::Paused);
                    if !watch || done {
                        if json {
                            print_json(&s)?;
                        }
                        return Ok(());
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
            }
            RolloutCommand::Pause { id, conn } => act(id, conn, "pause").await,
            RolloutCommand::Resume { id, conn } => act(id, conn, "resume").await,
            RolloutCommand::Abort { id, conn } => act(id, conn, "abort").await,
        },
        FleetCommand::Rollback {
            model,
            to,
            cohort,
            conn,
            json,
        } => {
            let c = conn.client()?;
            let id = c
                .rollback(&RollbackRequest {
                    model: model.clone(),
                    to,
                    cohort,
                })
                .await?;
            eprintln!("rollback {id}: every device of {model} is ordered to v{to}");
            if json {
                print_json(&serde_json::json!({ "rollout": id }))?;
            }
            Ok(())
        }
        FleetCommand::Models { conn, json } => {
            let c = conn.client()?;
            let models = c.models().await?;
            eprintln!(
                "{:<24} {:>8} {:<10} {:>8} {:>10} {:<16} {:<20} SIGNED BY",
                "MODEL", "VERSION", "STAGE", "COUNTER", "BYTES", "SHA256", "PUSHED"
            );
            for m in &models {
                eprintln!(
                    "{:<24} {:>8} {:<10} {:>8} {:>10} {:<16} {:<20} {}",
                    m.model.model,
                    m.model.version,
                    m.stage,
                    m.security_counter,
                    m.size,
                    m.sha256.get(..16).unwrap_or(&m.sha256),
                    m.pushed_at,
                    m.signed_by.join(",")
                );
            }
            if json {
                print_json(&models)?;
            }
            Ok(())
        }
        FleetCommand::Stage {
            model,
            version,
            stage,
            conn,
        } => {
            let c = conn.client()?;
            c.set_stage(&super::api::StageRequest {
                target: ModelRef {
                    model: model.clone(),
                    version,
                },
                stage: stage.clone(),
            })
            .await?;
            eprintln!("{model} v{version} is now {stage}");
            Ok(())
        }
        FleetCommand::Audit { limit, conn, json } => {
            let c = conn.client()?;
            let rows = c.audit(limit).await?;
            if json {
                print_json(&rows)?;
            } else {
                eprintln!("{:<26} {:<10} {:<10} DETAIL", "AT", "WHO", "ACTION");
                for r in &rows {
                    eprintln!("{:<26} {:<10} {:<10} {}", r.at, r.who, r.action, r.detail);
                }
            }
            Ok(())
        }
        FleetCommand::Devices { conn, json } => {
            let c = conn.client()?;
            let devices = c.devices().await?;
            eprintln!(
                "{:<20} {:<16} {:<16} {:<10} {:<20} {:<20} LAST EVENT",
                "DEVICE", "NAME", "BOARD", "COHORT", "RUNNING", "LAST SEEN"
            );
            for d in &devices {
                let running = d.running.as_ref().map_or("-".to_string(), |r: &ModelRef| {
                    format!("{} v{}", r.model, r.version)
                });
                eprintln!(
                    "{:<20} {:<16} {:<16} {:<10} {:<20} {:<20} {}",
                    d.device_id,
                    d.name,
                    d.board,
                    d.cohort,
                    running,
                    d.last_seen.as_deref().unwrap_or("-"),
                    d.last_event.as_deref().unwrap_or("-")
                );
            }
            if json {
                print_json(&devices)?;
            }
            Ok(())
        }
    }
}

async fn act(id: i64, conn: Conn, action: &str) -> Result<()> {
    let c = conn.client()?;
    let s = c.rollout_action(id, action).await?;
    print_status(&s);
    Ok(())
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// The status as a table on stderr.
pub fn print_status(s: &RolloutStatus) {
    eprintln!(
        "rollout {}: {} v{} (previous {}) {:?}{}",
        s.id,
        s.target.model,
        s.target.version,
        s.previous.map_or("-".into(), |p| format!("v{p}")),
        s.state,
        s.reason
            .as_deref()
            .map_or(String::new(), |r| format!(": {r}"))
    );
    let devices: Vec<String> = s
        .devices
        .iter()
        .map(|(v, n)| format!("v{v}: {n}"))
        .collect();
    eprintln!(
        "devices: {}",
        if devices.is_empty() {
            "-".into()
        } else {
            devices.join(", ")
        }
    );
    eprintln!(
        "{:>4} {:>4} {:<8} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>7} {:>6}",
        "WAVE",
        "PCT",
        "STATE",
        "DEVICES",
        "REPORTED",
        "FAILED%",
        "ERRORS",
        "P50 US",
        "LAT+%",
        "PSI",
        "GATE"
    );
    for w in &s.waves {
        let g = &w.gate;
        eprintln!(
            "{:>4} {:>4} {:<8} {:>7} {:>8} {:>8.1} {:>9.4} {:>9} {:>9} {:>7} {:>6}",
            w.index + 1,
            w.pct,
            w.state,
            g.devices,
            g.reported,
            g.failure_pct,
            g.error_rate,
            opt(g.latency_p50_us, 0),
            opt(g.latency_regression_pct, 1),
            opt(g.psi, 3),
            match g.passed {
                Some(true) => "pass",
                Some(false) => "FAIL",
                None => "-",
            }
        );
    }
}
