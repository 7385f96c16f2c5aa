//! The admin socket: `trail status`, `trail reload` and `trail replay` talk to the running daemon here.
//!
//! Owns the admin protocol: newline-delimited JSON, one request object per line (`{"command": "status"}`,
//! `{"command": "reload"}`, `{"command": "replay", "sink": "..."}`), one answer object per line. The socket is
//! created with mode 0600: only the daemon's user (and root) may use it. Commands that run plugin code or wait
//! for sink threads run on blocking threads, never on the runtime's workers.

use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::sinks::Sinks;

/// What the admin commands act on.
pub struct Admin {
    /// The sinks, when any are configured.
    pub sinks: Option<Arc<Sinks>>,
    /// Number of event types loaded.
    pub event_types: usize,
    /// When the daemon started.
    pub started: Instant,
    /// The submission socket's connections.
    pub connections: Arc<crate::ingest::Connections>,
    /// What the service manager is told (a reload is announced to it).
    pub service: Arc<crate::systemd::Service>,
}

#[derive(Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Status,
    Reload,
    Replay { sink: String },
}

/// Serves the admin socket until `stop` is cancelled.
pub async fn serve(listener: UnixListener, admin: Arc<Admin>, stop: CancellationToken) {
    let mut accept_errors = crate::ingest::Throttle::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => { tokio::spawn(connection(stream, admin.clone())); }
                Err(e) => crate::ingest::accept_failed(&mut accept_errors, "admin", &e).await,
            },
        }
    }
}

async fn connection(stream: UnixStream, admin: Arc<Admin>) {
    let (reader, mut writer) = stream.into_split();
    let mut lines = BufReader::new(reader).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim().is_empty() {
            continue;
        }
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                let admin = admin.clone();
                tokio::task::spawn_blocking(move || handle(&admin, request))
                    .await
                    .unwrap_or_else(
                        |e| json!({"ok": false, "error": format!("the command failed: {e}")}),
                    )
            }
            Err(e) => json!({"ok": false, "error": format!(
                "not an admin request ({e}); send {{\"command\": \"status\" | \"reload\" | \"replay\", ...}}"
            )}),
        };
        let mut out = serde_json::to_vec(&answer).expect("serializable");
        out.push(b'\n');
        if writer.write_all(&out).await.is_err() {
            break;
        }
    }
    debug!("admin connection closed");
}

fn handle(admin: &Admin, request: Request) -> Value {
    match request {
        Request::Status => {
            let mut status = json!({
                "ok": true,
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "uptime_seconds": admin.started.elapsed().as_secs(),
                "event_types": admin.event_types,
                "connections": admin.connections.status(),
            });
            if let Some(sinks) = &admin.sinks {
                let s = sinks.status();
                for key in ["sinks", "plugins", "libraries_mapped", "spool"] {
                    status[key] = s[key].clone();
                }
            }
            status
        }
        Request::Reload => match &admin.sinks {
            Some(sinks) => {
                let reloaded = admin.service.reload("the plugins", || sinks.reload_all());
                json!({"ok": true, "reloaded": reloaded})
            }
            None => {
                admin
                    .service
                    .reload("nothing (no sinks are configured)", || ());
                json!({"ok": true, "reloaded": [], "note": "no sinks are configured"})
            }
        },
        Request::Replay { sink } => match admin.sinks.as_ref().map(|s| s.replay(&sink)) {
            Some(Ok(report)) => {
                json!({"ok": true, "sink": sink, "delivered": report.delivered, "failed": report.failed})
            }
            Some(Err(e)) => json!({"ok": false, "error": e}),
            None => json!({"ok": false, "error": "no sinks are configured"}),
        },
    }
}
