//! The `tcplb` binary: parse the command line, set up logging, run.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use tracing_subscriber::EnvFilter;

use tcplb::cli::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let line = format!("{} (see tcplb --help)", one_line(&e.render().to_string()));
            Report { json: json_asked() }.error(line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    let report = Report { json: cli.log_format == LogFormat::Json };
    if let Some(command) = &cli.command {
        return generate(command);
    }
    let filter = match log_filter(cli.log_level.as_deref()) {
        Ok(f) => f,
        Err(e) => {
            report.error(&format!("{e:#}"));
            return ExitCode::from(2);
        }
    };
    let format = cli.log_format;
    let check = cli.check;
    let overrides = cli.overrides();
    let config_path = cli.config.clone();
    let config = match cli.into_config() {
        Ok(c) => c,
        Err(problems) => {
            for line in problems.lines() {
                report.error(line);
            }
            return ExitCode::from(2);
        }
    };
    if check {
        let problems = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(tcplb::Server::preflight(&config)),
            Err(e) => vec![format!("cannot start the runtime: {e}")],
        };
        if !problems.is_empty() {
            for p in &problems {
                report.error(p);
            }
            return ExitCode::from(2);
        }
        let what = config_path.as_ref().map_or("flags".into(), |p| p.display().to_string());
        println!("{what}: OK ({} listener(s))", config.listeners.len());
        return ExitCode::SUCCESS;
    }
    // Kept to the end of main: dropping it flushes the queued log lines.
    let _log = tcplb::logging::init(filter, format == LogFormat::Json);

    // The control plane (reload, DNS, probes, admin) runs here; connections
    // run on the server's own worker threads.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            report.error(&format!("cannot start the runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async {
        // Before anything listens: a signal must never meet its default action.
        let signals = tcplb::Signals::install();
        // Started by `tcplb` itself for an upgrade: take its sockets over.
        let bound = match tcplb::Inherited::from_env() {
            Ok(Some(inherited)) => tcplb::Server::bind_inheriting(config, inherited).await,
            Ok(None) => tcplb::Server::bind(config).await,
            Err(e) => Err(tcplb::Error::Upgrade(e)),
        };
        match bound {
            Ok(server) => {
                let (shutdown, reload) = signals.split(config_path, overrides, server.handle());
                tokio::spawn(reload);
                server.run(shutdown).await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                report.error(&e.to_string());
                ExitCode::from(if e.is_usage() { 2 } else { 1 })
            }
        }
    })
}

/// Writes an error that stops tcplb: one line on stderr, and under
/// `--log-format json` a JSON object like every other log line.
#[derive(Debug, Clone, Copy)]
struct Report {
    /// `--log-format json` was given.
    json: bool,
}

impl Report {
    fn error(self, message: &str) {
        if self.json {
            let line =
                serde_json::json!({ "level": "ERROR", "target": "tcplb", "message": message });
            eprintln!("{line}");
        } else {
            eprintln!("tcplb: error: {message}");
        }
    }
}

/// Whether JSON logs were asked for, read from the raw arguments and the
/// environment (for errors found before the command line could be parsed).
fn json_asked() -> bool {
    let args: Vec<String> = std::env::args().collect();
    let flag = args.windows(2).any(|w| w[0] == "--log-format" && w[1] == "json")
        || args.iter().any(|a| a == "--log-format=json");
    flag || std::env::var("TCPLB_LOG_FORMAT").is_ok_and(|v| v == "json")
}

/// Prints completions or the man page, from the clap definition.
fn generate(command: &Command) -> ExitCode {
    let mut cmd = Cli::command();
    let mut out = std::io::stdout();
    match command {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut cmd, "tcplb", &mut out);
        }
        Command::Manpage => {
            let written = clap_mangen::Man::new(cmd).render(&mut out);
            if let Err(e) = written.and_then(|()| std::io::Write::flush(&mut out)) {
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    return ExitCode::SUCCESS;
                }
                eprintln!("tcplb: error: cannot write the man page: {e}");
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}

/// Folds clap's multi-line error into one line, without the usage block.
fn one_line(rendered: &str) -> String {
    let body = rendered.split("\n\nUsage:").next().unwrap_or(rendered);
    let body = body.split("\n\nFor more information").next().unwrap_or(body);
    body.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `--log-level` wins, then RUST_LOG, then "info".
fn log_filter(flag: Option<&str>) -> anyhow::Result<EnvFilter> {
    match flag {
        Some(f) => EnvFilter::try_new(f).with_context(|| format!("invalid --log-level '{f}'")),
        None => match std::env::var("RUST_LOG") {
            Ok(v) if !v.is_empty() => {
                EnvFilter::try_new(&v).with_context(|| format!("invalid RUST_LOG '{v}'"))
            }
            _ => Ok(EnvFilter::new("info")),
        },
    }
}
