//! `kiln-agent --server URL --enroll-token E --board B --state-dir DIR --trusted-key K.pub
//! [--trusted-key K2.pub …] [--socket PATH] [--cohort NAME] [--name NAME] [--ca-cert PEM]`
//!
//! `--ca-cert` (or `KILN_CA_CERT`) also trusts that CA certificate for an `https://` server.
//!
//! Polls the fleet server, installs signed models into A/B files in DIR, serves inference on a
//! Unix socket (default DIR/infer.sock). Stops on Ctrl-C / SIGINT.

use kiln_agent::agent::{Agent, AgentConfig};
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: kiln-agent --server URL --enroll-token E --board B --state-dir DIR \
--trusted-key K.pub [--trusted-key K2.pub ...] [--socket PATH] [--cohort NAME] [--name NAME] \
[--ca-cert PEM]";

struct Args {
    server: String,
    enroll_token: String,
    board: String,
    state_dir: PathBuf,
    keys: Vec<PathBuf>,
    socket: Option<PathBuf>,
    cohort: Option<String>,
    name: Option<String>,
    ca_cert: Option<PathBuf>,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let (mut server, mut tok, mut board, mut dir) = (None, None, None, None);
    let mut a = Args {
        server: String::new(),
        enroll_token: String::new(),
        board: String::new(),
        state_dir: PathBuf::new(),
        keys: Vec::new(),
        socket: None,
        cohort: None,
        name: None,
        ca_cert: std::env::var_os("KILN_CA_CERT").map(PathBuf::from),
    };
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.into());
        }
        let val = it
            .next()
            .ok_or_else(|| format!("error: {flag} needs a value\nhint: {USAGE}"))?;
        match flag.as_str() {
            "--server" => server = Some(val),
            "--enroll-token" => tok = Some(val),
            "--board" => board = Some(val),
            "--state-dir" => dir = Some(PathBuf::from(val)),
            "--trusted-key" => a.keys.push(PathBuf::from(val)),
            "--socket" => a.socket = Some(PathBuf::from(val)),
            "--cohort" => a.cohort = Some(val),
            "--name" => a.name = Some(val),
            "--ca-cert" => a.ca_cert = Some(PathBuf::from(val)),
            _ => return Err(format!("error: unknown flag {flag}\nhint: {USAGE}")),
        }
    }
    let need = |v: Option<String>, f: &str| {
        v.ok_or_else(|| format!("error: {f} is required\nhint: {USAGE}"))
    };
    a.server = need(server, "--server")?;
    a.enroll_token = need(tok, "--enroll-token")?;
    a.board = need(board, "--board")?;
    a.state_dir = dir.ok_or_else(|| format!("error: --state-dir is required\nhint: {USAGE}"))?;
    if a.keys.is_empty() {
        return Err(format!(
            "error: at least one --trusted-key is required\nhint: {USAGE}"
        ));
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let mut keys = Vec::new();
    for k in &args.keys {
        let text = match std::fs::read_to_string(k) {
            Ok(t) => t,
            Err(e) => {
                eprintln!(
                    "error: cannot read {}: {e}\nhint: pass the .pub file from `kiln keygen`",
                    k.display()
                );
                return ExitCode::from(2);
            }
        };
        match kiln_device::keys::parse_public_key(&text) {
            Ok(key) => keys.push(key),
            Err(e) => {
                eprintln!("error: {} is not a public key: {e:?}\nhint: pass the .pub file from `kiln keygen`", k.display());
                return ExitCode::from(2);
            }
        }
    }
    let mut cfg = AgentConfig::new(&args.server, &args.enroll_token, &args.board, keys);
    if let Some(path) = &args.ca_cert {
        let pem = match std::fs::read(path) {
            Ok(p) => p,
            Err(e) => {
                eprintln!(
                    "error: cannot read --ca-cert {}: {e}\nhint: give the PEM file of the CA that signed the server's certificate",
                    path.display()
                );
                return ExitCode::from(2);
            }
        };
        if reqwest::Certificate::from_pem_bundle(&pem).map_or(true, |c| c.is_empty()) {
            eprintln!(
                "error: --ca-cert {} holds no PEM certificate\nhint: give a file with a `BEGIN CERTIFICATE` block",
                path.display()
            );
            return ExitCode::from(2);
        }
        cfg.ca_certs.push(pem);
    }
    cfg.cohort = args.cohort;
    if let Some(n) = args.name {
        cfg.name = n;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let socket = args
        .socket
        .unwrap_or_else(|| args.state_dir.join("infer.sock"));
    let r: Result<(), String> = rt.block_on(async move {
        let mut agent = Agent::open(cfg, &args.state_dir).map_err(|e| format!("error: {e}"))?;
        let shared = agent.shared();
        let sock = socket.clone();
        tokio::spawn(async move {
            if let Err(e) = kiln_agent::service::serve(&sock, shared).await {
                eprintln!("kiln-agent: inference socket {}: {e}", sock.display());
            }
        });
        let stop = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        agent.run(stop).await.map_err(|e| format!("error: {e}"))
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
