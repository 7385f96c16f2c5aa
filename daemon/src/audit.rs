//! The daemon's own audit events: plugin loads, reloads, failures and refusals, events a sink dropped, the start
//! record and records found after a stop.
//!
//! Owns turning what happened into requests of the built-in event types (`event-types/trail_*.yml`, embedded
//! into the binary so they exist whatever the configured directory holds). The requests go through the same
//! checks and the same journal as any client's, attributed to the daemon's own process.

use std::path::Path;

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::warn;

/// What the plugin events say about a loaded plugin build (the loader's `Plugin` lends it: this module stays
/// below `sinks`).
#[derive(Debug, Clone, Copy)]
pub struct Build<'a> {
    /// The name the plugin declares.
    pub name: &'a str,
    /// The plugin's own version.
    pub version: &'a str,
    /// The plugin API version it was built against.
    pub api_version: &'a str,
    /// The installed file it was loaded from.
    pub file: &'a Path,
}

impl Build<'_> {
    /// `name version (api X.Y)`, as logs and messages name a build.
    pub fn describe(&self) -> String {
        format!("{} {} (api {})", self.name, self.version, self.api_version)
    }
}

/// Sends the daemon's own audit events; cheap to clone, never blocks (events are rare and queued).
#[derive(Clone, Debug)]
pub struct Auditor {
    tx: Option<mpsc::UnboundedSender<Vec<u8>>>,
}

impl Auditor {
    /// An auditor and the stream of request lines it produces.
    pub fn new() -> (Auditor, mpsc::UnboundedReceiver<Vec<u8>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Auditor { tx: Some(tx) }, rx)
    }

    /// An auditor that records nothing (for checks that start nothing).
    pub fn disabled() -> Auditor {
        Auditor { tx: None }
    }

    fn send(&self, event_type: &str, message: String, outcome: &str, payload: Value) {
        let Some(tx) = &self.tx else { return };
        let line = request(event_type, message, outcome, payload);
        if tx.send(line).is_err() {
            warn!(
                event_type,
                "the daemon is stopping; own audit event not recorded"
            );
        }
    }

    /// A reload of the configuration and event types was applied (`ok`) or refused; `payload` follows
    /// `event-types/trail_config_reloaded.yml`.
    pub fn config_reloaded(&self, message: String, ok: bool, payload: Value) {
        let outcome = if ok { "success" } else { "failure" };
        self.send("trail_config_reloaded", message, outcome, payload);
    }

    /// A plugin build was loaded at start (`generation` 1) or swapped in by a reload.
    pub fn plugin_loaded(&self, plugin: Build<'_>, generation: u64, sinks: &[String]) {
        let payload = json!({
            "plugin": plugin.name, "version": plugin.version, "api_version": plugin.api_version,
            "file": plugin.file.display().to_string(), "generation": generation, "sinks": sinks,
        });
        if generation <= 1 {
            self.send(
                "trail_plugin_loaded",
                format!("loaded sink plugin {}", plugin.describe()),
                "success",
                payload,
            );
        } else {
            self.send(
                "trail_plugin_reloaded",
                format!(
                    "reloaded sink plugin {} (generation {generation})",
                    plugin.describe()
                ),
                "success",
                payload,
            );
        }
    }

    /// A plugin file could not be loaded, or its sinks could not be built from it.
    pub fn plugin_failed(&self, file: &Path, plugin: Option<&str>, reason: &str) {
        self.send(
            "trail_plugin_failed",
            format!("sink plugin {} was not loaded: {reason}", file.display()),
            "failure",
            file_payload(file, plugin, reason),
        );
    }

    /// A plugin file was not loaded because someone other than root or the daemon's user could change it or a
    /// directory on its path.
    pub fn plugin_refused(&self, file: &Path, plugin: Option<&str>, reason: &str) {
        self.send(
            "trail_plugin_refused",
            format!("sink plugin {} was refused: {reason}", file.display()),
            "denied",
            file_payload(file, plugin, reason),
        );
    }

    /// A checkpoint was written: streamed to the sinks that select `trail_checkpoint`, its line unchanged.
    pub fn checkpoint(&self, path: &std::path::Path, line: &[u8], note: Option<&[u8]>) {
        let Some((_, message, payload)) = checkpoint_event(path, line, note) else {
            return;
        };
        self.send("trail_checkpoint", message, "success", payload);
    }

    /// Submissions were refused by the access rules or the rate limit: one record for the refusals of one uid,
    /// type and code (see [`crate::access::Denials`]); never a payload.
    pub fn submission_denied(&self, d: &crate::access::Denied) {
        let who = match &d.user {
            Some(name) => format!("uid {} ({name})", d.uid),
            None => format!("uid {}", d.uid),
        };
        let times = if d.count == 1 {
            "1 submission".to_owned()
        } else {
            format!("{} submissions", d.count)
        };
        let mut payload = json!({
            "event_type": d.event_type, "uid": d.uid, "gid": d.gid, "code": d.code.as_str(), "count": d.count,
            "first_at": d.first_at, "last_at": d.last_at, "interval_secs": d.interval_secs, "reason": d.reason,
        });
        if let Some(user) = &d.user {
            payload["user"] = json!(user);
        }
        if let Some(pid) = d.pid {
            payload["pid"] = json!(pid);
        }
        self.send(
            "trail_submission_denied",
            format!(
                "{who} was refused {times} of event type {:?} ({}) from {} to {}",
                d.event_type,
                d.code.as_str(),
                d.first_at,
                d.last_at
            ),
            "denied",
            payload,
        );
    }

    /// A sink skipped `dropped` events because the spool was full.
    pub fn sink_events_dropped(&self, sink: &str, dropped: u64) {
        self.send(
            "trail_sink_events_dropped",
            format!("sink {sink} skipped {dropped} events: the spool was full (drop_oldest)"),
            "failure",
            json!({"sink": sink, "dropped": dropped}),
        );
    }
}

/// The request of the `trail_started` record every start writes first, naming the last checkpoint `found`.
pub fn started_request(found: &crate::log::start::Found) -> Vec<u8> {
    let mut payload = json!({"version": env!("CARGO_PKG_VERSION")});
    let message = match &found.checkpoint {
        Some(c) => {
            payload["checkpoint"] = json!(c.name);
            payload["checkpoint_reason"] = json!(c.reason);
            payload["checkpoint_hash"] = json!(c.hash);
            if let Some(seq) = c.seq {
                payload["checkpoint_seq"] = json!(seq);
            }
            format!(
                "trail daemon started; last checkpoint {} ({})",
                c.name, c.reason
            )
        }
        None => "trail daemon started; no checkpoint found".to_owned(),
    };
    request("trail_started", message, "success", payload)
}

/// The request of the `trail_log_tampered` record: records follow the stop checkpoint `last` that no start wrote.
pub fn tampered_request(
    last: &crate::log::start::Last,
    foreign: &crate::log::start::Foreign,
) -> Vec<u8> {
    let mut payload = json!({
        "checkpoint": last.name, "file": foreign.file, "first_seq": foreign.first_seq,
        "last_seq": foreign.last_seq, "records": foreign.records,
    });
    if let Some(seq) = last.seq {
        payload["checkpoint_seq"] = json!(seq);
    }
    let message = format!(
        "{} records (seq {}..{}, from {}) follow the stop checkpoint {} and no start of the daemon wrote them: they were added while it was not running",
        foreign.records, foreign.first_seq, foreign.last_seq, foreign.file, last.name
    );
    request("trail_log_tampered", message, "failure", payload)
}

/// The request of a `trail_checkpoint` event for the checkpoint at `path` whose line is `line`.
pub fn checkpoint_request(
    path: &std::path::Path,
    line: &[u8],
    note: Option<&[u8]>,
) -> Option<Vec<u8>> {
    let (_, message, payload) = checkpoint_event(path, line, note)?;
    Some(request("trail_checkpoint", message, "success", payload))
}

fn checkpoint_event(
    path: &std::path::Path,
    line: &[u8],
    note: Option<&[u8]>,
) -> Option<(String, String, Value)> {
    let name = path.file_name()?.to_str()?.to_owned();
    let text = std::str::from_utf8(line).ok()?.trim_end_matches('\n');
    let cp = crate::log::checkpoint::Checkpoint::parse(line).ok()?;
    let mut payload = json!({"name": name, "line": text, "reason": cp.body.reason});
    if let Some(seq) = cp.body.seq {
        payload["seq"] = json!(seq);
    }
    if let Some(note) = note.and_then(|n| std::str::from_utf8(n).ok()) {
        payload["note"] = json!(note);
    }
    let message = format!("checkpoint {name} ({}) written", cp.body.reason);
    Some((name, message, payload))
}

/// A request line of one of the daemon's own types.
fn request(event_type: &str, message: String, outcome: &str, payload: Value) -> Vec<u8> {
    let request = json!({
        "type": event_type,
        "actor": {"id": "traild", "name": "trail daemon", "type": "system"},
        "message": message,
        "outcome": outcome,
        "payload": payload,
    });
    serde_json::to_vec(&request).expect("serializable")
}

/// The payload of the plugin-file events: `file`, `reason` and, when known, `plugin`.
fn file_payload(file: &Path, plugin: Option<&str>, reason: &str) -> Value {
    let mut payload = json!({"file": file.display().to_string(), "reason": reason});
    if let Some(p) = plugin {
        payload["plugin"] = json!(p);
    }
    payload
}
