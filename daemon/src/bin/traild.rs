//! `traild`: the trail daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use trail::{Config, telemetry};

/// The trail audit-trail daemon.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (YAML); without it, the embedded development configuration is used.
    #[arg(long, short, env = "TRAIL_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Format of the daemon's own log lines on standard error.
    #[arg(long, value_enum, default_value_t, global = true)]
    log_format: telemetry::Format,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Check the configuration and event types, then exit (0 valid, 78 invalid).
    Validate,
    /// (Internal, used by `validate`) check one plugin library in this process: a JSON request on standard
    /// input, a JSON answer on standard output.
    #[command(name = "__check-plugin", hide = true)]
    CheckPlugin,
}

fn main() -> ExitCode {
    let args = Args::parse();
    telemetry::init(args.log_format);
    // A write past a file-size limit (RLIMIT_FSIZE) must fail with EFBIG, like a full disk, and be answered
    // `unavailable`; the default action of SIGXFSZ would end the daemon instead.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    if let Some(Command::CheckPlugin) = args.command {
        return ExitCode::from(trail::sinks::validate::child_main() as u8);
    }
    let config = match &args.config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(trail::EXIT_CONFIG as u8);
            }
        },
        None => {
            let c = Config::development();
            tracing::info!("no --config given: using the embedded development configuration: {c}");
            c
        }
    };
    if let Some(Command::Validate) = args.command {
        return match trail::validate(&config) {
            Ok(v) => {
                let plugins: Vec<&str> = v.sinks.plugins.iter().map(|(p, _)| p.as_str()).collect();
                tracing::info!(
                    event_types = v.own_event_types(),
                    builtin_event_types = v.builtin_event_types(),
                    sinks_built = v.sinks.sinks.len(),
                    plugins_loaded = ?plugins,
                    "configuration is valid"
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::from(e.exit_code() as u8)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("trail-worker")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let stop = CancellationToken::new();
        if let Err(e) = trail::shutdown::on_signals(stop.clone()) {
            tracing::error!(error = %e, "cannot install signal handlers");
            return Err(None);
        }
        trail::run(config, stop).await.map_err(Some)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Some(e)) => {
            tracing::error!("{e}");
            ExitCode::from(e.exit_code() as u8)
        }
        Err(None) => ExitCode::FAILURE,
    }
}
