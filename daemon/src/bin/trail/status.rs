//! `trail status` on a terminal: the admin socket's `status` answer as a readable table (the JSON itself with
//! `--json` or when the output is not a terminal; README's "Status" section documents every field).

use std::fmt::Write as _;

use serde_json::Value;

/// The table for a `status` answer.
pub fn table(s: &Value) -> String {
    let mut out = String::new();
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let num = |v: &Value| v.as_u64().unwrap_or(0);
    let _ = writeln!(
        out,
        "trail {}, pid {}, up {} (since {})",
        text(&s["version"]),
        text(&s["pid"]),
        duration(num(&s["uptime_seconds"])),
        text(&s["started_at"])
    );
    let mut row = |name: &str, value: String| {
        let _ = writeln!(out, "{name:<16} {value}");
    };
    let c = &s["configuration"];
    row(
        "configuration",
        format!(
            "generation {}, loaded {}{}; reloads: {} applied, {} refused",
            text(&c["generation"]),
            text(&c["loaded_at"]),
            c["file"]
                .as_str()
                .map(|f| format!(", file {f}"))
                .unwrap_or_default(),
            num(&c["reloads_applied"]),
            num(&c["reloads_refused"]),
        ),
    );
    let last = &c["last_reload"];
    if last.is_object() {
        let errors: Vec<String> = last["errors"]
            .as_array()
            .map(|a| a.iter().map(text).collect())
            .unwrap_or_default();
        let mut line = format!(
            "{} (generation {}, by {}) at {}",
            text(&last["result"]),
            text(&last["generation"]),
            text(&last["requested_by"]),
            text(&last["at"])
        );
        for e in errors {
            line.push_str(&format!("\n{:<16}   error: {e}", ""));
        }
        row("last reload", line);
    } else {
        row("last reload", "none since start".into());
    }
    row(
        "event types",
        format!(
            "{} ({} own, {} built in)",
            num(&s["event_types"]),
            num(&s["event_types_own"]),
            num(&s["event_types_builtin"])
        ),
    );
    let k = &s["connections"];
    row(
        "connections",
        format!(
            "{} open of {}, {} refused, {} closed idle",
            num(&k["open"]),
            num(&k["max"]),
            num(&k["refused"]),
            num(&k["idle_closed"])
        ),
    );
    let r = &s["refusals"];
    let codes: Vec<String> = r["by_code"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| num(n) > 0)
        .map(|(code, n)| format!("{code} {n}"))
        .collect();
    let mut refused = if codes.is_empty() {
        "none".to_owned()
    } else {
        codes.join(", ")
    };
    for u in r["per_uid"].as_array().into_iter().flatten() {
        let who = match u["user"].as_str() {
            Some(name) => format!("uid {} ({name})", text(&u["uid"])),
            None => format!("uid {}", text(&u["uid"])),
        };
        let _ = write!(
            refused,
            "\n{:<16}   {who}: forbidden {}, rate_limited {}, too_large {}; last {}",
            "",
            num(&u["forbidden"]),
            num(&u["rate_limited"]),
            num(&u["too_large"]),
            text(&u["last_at"])
        );
    }
    row("refusals", refused);
    let f = &s["fsync"];
    let ms = |v: &Value| v.as_f64().map_or("-".into(), |m| format!("{m} ms"));
    row(
        &format!("fsync ({} s)", num(&f["window_secs"])),
        format!(
            "{} syncs, p50 {}, p99 {}",
            num(&f["syncs"]),
            ms(&f["p50_ms"]),
            ms(&f["p99_ms"])
        ),
    );
    let l = &s["log"];
    let free = match (l["free_bytes"].as_u64(), l["filesystem_bytes"].as_u64()) {
        (Some(free), Some(size)) => format!("; {} free of {}", bytes(free), bytes(size)),
        _ => String::new(),
    };
    row(
        "log",
        format!(
            "{}: {} files, {}{free}",
            text(&l["dir"]),
            num(&l["files"]),
            bytes(num(&l["bytes"]))
        ),
    );
    let kept = &l["retention_stalled"];
    if kept.is_object() {
        row(
            "retention kept",
            format!(
                "{} (expired by {}) for {} s{}: {}",
                text(&kept["file"]),
                text(&kept["expired_by"]),
                num(&kept["waited_seconds"]),
                if num(&kept["waited_seconds"]) > num(&kept["warn_after_seconds"]) {
                    " (warned)"
                } else {
                    ""
                },
                text(&kept["error"])
            ),
        );
    }
    let cp = &s["last_checkpoint"];
    row(
        "last checkpoint",
        if cp.is_object() {
            format!(
                "{} ({}, seq {}) {}",
                text(&cp["at"]),
                text(&cp["reason"]),
                text(&cp["seq"]),
                text(&cp["file"])
            )
        } else {
            "none".into()
        },
    );
    let i = &s["idempotency"];
    row(
        "idempotency",
        format!(
            "{} keys of {}, {} in flight",
            num(&i["keys"]),
            num(&i["max_keys"]),
            num(&i["in_flight"])
        ),
    );
    if let Some(sinks) = s["sinks"].as_array() {
        let mut rows = vec![
            [
                "SINK",
                "STATE",
                "DELIVERED",
                "RETRIES",
                "DEAD",
                "DROPPED",
                "BACKLOG",
                "OLDEST",
                "SERVING",
            ]
            .map(String::from),
        ];
        for k in sinks {
            rows.push([
                text(&k["name"]),
                text(&k["state"]),
                num(&k["delivered"]).to_string(),
                num(&k["retries"]).to_string(),
                num(&k["dead_lettered"]).to_string(),
                num(&k["dropped"]).to_string(),
                format!(
                    "{} ({})",
                    num(&k["backlog_events"]),
                    bytes(num(&k["backlog_bytes"]))
                ),
                k["oldest_undelivered_age_secs"]
                    .as_f64()
                    .map_or("-".into(), |a| duration(a as u64)),
                text(&k["serving"]),
            ]);
        }
        out.push('\n');
        columns(&mut out, &rows);
        for k in sinks {
            if let Some(e) = k["last_error"].as_str() {
                let _ = writeln!(out, "  {}: last error: {e}", text(&k["name"]));
            }
        }
    }
    if let Some(plugins) = s["plugins"].as_array() {
        let mut rows = vec![["PLUGIN", "VERSION", "API", "GENERATION", "FILE"].map(String::from)];
        for p in plugins {
            rows.push([
                text(&p["name"]),
                text(&p["version"]),
                text(&p["api_version"]),
                text(&p["generation"]),
                text(&p["file"]),
            ]);
        }
        out.push('\n');
        columns(&mut out, &rows);
        for p in plugins {
            let failure = &p["last_failure"];
            if failure.is_object() {
                let _ = writeln!(
                    out,
                    "  {}: last failed load: {}",
                    text(&p["name"]),
                    text(&failure["reason"])
                );
            }
        }
        let _ = writeln!(
            out,
            "\nlibraries mapped {}; spool backlog {}",
            num(&s["libraries_mapped"]),
            bytes(num(&s["spool"]["backlog_bytes"]))
        );
    }
    out
}

/// Rows as left-aligned columns.
fn columns<const N: usize>(out: &mut String, rows: &[[String; N]]) {
    let mut widths = [0; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = String::new();
        for (i, (w, cell)) in widths.iter().zip(row).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// `1d02h`, `3h04m`, `5m06s`, `7s`.
fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h:02}h"),
    }
}

/// Bytes with a binary unit.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        for (secs, text) in [
            (7, "7s"),
            (306, "5m06s"),
            (11040, "3h04m"),
            (93600, "1d02h"),
        ] {
            assert_eq!(duration(secs), text);
        }
        for (n, text) in [(12, "12 B"), (1536, "1.5 KiB"), (3 << 30, "3.0 GiB")] {
            assert_eq!(bytes(n), text);
        }
    }
}
