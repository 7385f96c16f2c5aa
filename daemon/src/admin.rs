//! The admin socket: `trail status`, `trail reload`, `trail replay` and `trail metrics` talk to the running daemon
//! here.
//!
//! Owns the admin protocol: newline-delimited JSON, one request object per line (`{"command": "status"}`,
//! `{"command": "reload"}`, `{"command": "replay", "sink": "..."}`, `{"command": "metrics"}` with an optional
//! `"openmetrics": true`), one answer object per line. Only this module
//! builds the answers: the sinks and the connections report typed values, which it puts into JSON. The socket is
//! created with mode 0600: only the daemon's user (and root) may use it. Commands that run plugin code or wait
//! for sink threads run on blocking threads, never on the runtime's workers.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::ingest::ConnectionsReport;
use crate::sinks::{self, ReloadError, Sinks};

/// What the admin commands act on.
pub struct Admin {
    /// Access control's counters (refusals by code and per uid).
    pub access: Arc<crate::access::Access>,
    /// The sinks, when any are configured.
    pub sinks: Option<Arc<Sinks>>,
    /// Reloads the configuration, the event types and the plugins (announced to the service manager).
    pub reloader: Arc<crate::reload::Reloader>,
    /// What connections share: the event types in force.
    pub ctx: Arc<crate::ingest::Context>,
    /// When the daemon started.
    pub started: Instant,
    /// The submission socket's connections.
    pub connections: Arc<crate::ingest::Connections>,
    /// The idempotency keys remembered.
    pub idempotency: Arc<crate::idempotency::Window>,
    /// The metrics (and what `status` shows of the writer and the log directory).
    pub metrics: Arc<crate::metrics::Metrics>,
}

#[derive(Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Status,
    Reload,
    Replay {
        sink: String,
    },
    Metrics {
        #[serde(default)]
        openmetrics: bool,
    },
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
    // The socket is 0600: the peer is the daemon's user or root; its uid is recorded with a reload it asks for.
    let Ok(uid) = stream.peer_cred().map(|c| c.uid()) else {
        debug!("cannot read the admin peer's credentials; closing the connection");
        return;
    };
    let (reader, mut writer) = stream.into_split();
    let mut lines = BufReader::new(reader).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim().is_empty() {
            continue;
        }
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                let admin = admin.clone();
                tokio::task::spawn_blocking(move || handle(&admin, request, uid))
                    .await
                    .unwrap_or_else(
                        |e| json!({"ok": false, "error": format!("the command failed: {e}")}),
                    )
            }
            Err(e) => json!({"ok": false, "error": format!(
                "not an admin request ({e}); send {{\"command\": \"status\" | \"reload\" | \"replay\" | \"metrics\", ...}}"
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

/// The answer to `status`.
#[derive(Serialize)]
struct Status {
    ok: bool,
    version: &'static str,
    pid: u32,
    started_at: String,
    uptime_seconds: u64,
    /// All event types in force: `event_types_own` + `event_types_builtin`.
    event_types: usize,
    event_types_own: usize,
    event_types_builtin: usize,
    configuration: crate::reload::Status,
    connections: ConnectionsReport,
    idempotency: crate::idempotency::Status,
    fsync: crate::metrics::FsyncReport,
    log: crate::metrics::LogReport,
    last_checkpoint: Option<crate::journal::LastCheckpoint>,
    refusals: crate::access::RefusalsReport,
    /// `sinks`, `plugins`, `libraries_mapped`, `spool`, when sinks are configured.
    #[serde(flatten)]
    sinks: Option<sinks::Report>,
}

/// One element of the answer to `reload`: what was done with one changed library.
#[derive(Serialize)]
struct Reloaded<'a> {
    file: &'a Path,
    plugin: &'a str,
    #[serde(flatten)]
    swapped: Option<&'a sinks::Swapped>,
    ok: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    refused: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl<'a> Reloaded<'a> {
    fn of(r: &'a sinks::Reload) -> Reloaded<'a> {
        let (swapped, error) = match &r.result {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(e)),
        };
        Reloaded {
            file: &r.file,
            plugin: &r.plugin,
            swapped,
            ok: error.is_none(),
            refused: matches!(error, Some(ReloadError::Load(e)) if e.refused()),
            error: error.map(ToString::to_string),
        }
    }
}

fn to_json(answer: impl Serialize) -> Value {
    serde_json::to_value(answer).expect("admin answers are serializable")
}

fn handle(admin: &Admin, request: Request, uid: u32) -> Value {
    match request {
        Request::Status => {
            let registry = admin.ctx.rules().registry.clone();
            let builtin = registry
                .types()
                .iter()
                .filter(|t| crate::event_types::is_daemon_type(&t.name))
                .count();
            to_json(Status {
                ok: true,
                version: env!("CARGO_PKG_VERSION"),
                pid: std::process::id(),
                started_at: admin.metrics.started_at(),
                uptime_seconds: admin.started.elapsed().as_secs(),
                event_types: registry.len(),
                event_types_own: registry.len() - builtin,
                event_types_builtin: builtin,
                configuration: admin.reloader.status(),
                connections: admin.connections.status(),
                idempotency: admin.idempotency.status(crate::clock::now()),
                fsync: admin.metrics.fsync_recent(),
                log: admin.metrics.log(),
                last_checkpoint: admin.metrics.last_checkpoint(),
                refusals: admin.access.refusals.report(),
                sinks: admin.sinks.as_ref().map(|s| s.status()),
            })
        }
        Request::Metrics { openmetrics } => {
            let format = if openmetrics {
                crate::metrics::Format::OpenMetrics
            } else {
                crate::metrics::Format::Prometheus
            };
            json!({"ok": true, "content_type": format.content_type(), "text": admin.metrics.render(format)})
        }
        Request::Reload => {
            let done = admin.reloader.reload_all(crate::reload::Who::Admin { uid });
            let plugins: Vec<Value> = match &done.plugins {
                Some(Ok(all)) => all.iter().map(|r| to_json(Reloaded::of(r))).collect(),
                Some(Err(e)) => vec![json!({"ok": false, "error": e.to_string()})],
                None => Vec::new(),
            };
            // `ok` is false when anything was refused: the configuration, or a changed plugin library.
            json!({"ok": done.ok(), "config": to_json(&done.config), "reloaded": plugins})
        }
        Request::Replay { sink } => match admin.sinks.as_ref().map(|s| s.replay(&sink)) {
            Some(Ok(report)) => {
                json!({"ok": true, "sink": sink, "delivered": report.delivered, "failed": report.failed})
            }
            Some(Err(e)) => json!({"ok": false, "error": e.to_string()}),
            None => json!({"ok": false, "error": "no sinks are configured"}),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::loader::{LoadError, LoadErrorKind};
    use crate::sinks::{Reload, Swapped};

    #[test]
    fn reload_answers_keep_their_field_order() {
        let check = |result, expected: &str| {
            let reload = Reload {
                file: "/p/libx.so".into(),
                plugin: "x".into(),
                result,
            };
            assert_eq!(to_json(Reloaded::of(&reload)).to_string(), expected);
        };
        check(
            Ok(Swapped {
                version: "1.2.0".into(),
                generation: 3,
                sinks: vec!["a".into(), "b".into()],
            }),
            r#"{"file":"/p/libx.so","plugin":"x","version":"1.2.0","generation":3,"sinks":["a","b"],"ok":true}"#,
        );
        let load = |kind| {
            Err(ReloadError::Load(LoadError {
                file: "/p/libx.so".into(),
                kind,
            }))
        };
        check(
            load(LoadErrorKind::Refused("/p is writable by others".into())),
            r#"{"file":"/p/libx.so","plugin":"x","ok":false,"refused":true,"error":"plugin /p/libx.so: refused: /p is writable by others"}"#,
        );
        check(
            load(LoadErrorKind::Replaced),
            r#"{"file":"/p/libx.so","plugin":"x","ok":false,"error":"plugin /p/libx.so: it was replaced while being checked; it will be looked at again"}"#,
        );
    }
}
