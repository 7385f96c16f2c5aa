//! The webhook plugin built as a real dynamic library, loaded through the plugin API, posting
//! to real HTTP and HTTPS servers on loopback.

#[path = "support/server.rs"]
mod server;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use trail_plugin_api::{ErrorKind, SinkBox, WriteError};
use trail_plugin_testkit::{
    Event, Plugin, Profile, TestHost, deliver, events, expect_error, tls::TestCa, write,
};

use self::server::{Reply, Request, Server};

const SECRET: &str = "test-secret-0123456789abcdef";

fn plugin() -> Plugin {
    static PLUGIN: std::sync::OnceLock<Plugin> = std::sync::OnceLock::new();
    *PLUGIN.get_or_init(|| Plugin::build_and_load("trail-sink-webhook", Profile::Debug))
}

fn new_sink(config: Value) -> SinkBox {
    plugin()
        .new_sink(&config.to_string(), &TestHost::new("hook"))
        .unwrap_or_else(|e| panic!("{config}: {e}"))
}

/// The events a server accepted (answered 2xx), by the ids in the bodies, in order.
fn accepted_ids(requests: &[Request], statuses: &[u16]) -> Vec<String> {
    requests
        .iter()
        .zip(statuses)
        .filter(|(_, status)| (200..300).contains(*status))
        .flat_map(|(r, _)| body_events(r))
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The events of a JSON body: an array, or one object.
fn body_events(request: &Request) -> Vec<Value> {
    match serde_json::from_slice(&request.body).unwrap() {
        Value::Array(events) => events,
        event => vec![event],
    }
}

fn ids(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.id.clone()).collect()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The receiver's check, written from README.md's recipe (with another HMAC implementation
/// than the plugin's): parse `t` and `v1`, refuse a `t` more than `tolerance` seconds from
/// `now`, compare HMAC-SHA256(secret, "<t>.<body>") with `v1` in constant time.
fn verify(header: &str, body: &[u8], secret: &str, now: u64, tolerance: u64) -> Result<(), String> {
    let mut t = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => t = value.parse::<u64>().ok(),
            Some(("v1", value)) => signatures.push(value.to_owned()),
            _ => {}
        }
    }
    let t = t.ok_or("no timestamp")?;
    if now.abs_diff(t) > tolerance {
        return Err(format!(
            "timestamp {t} is {}s away from now",
            now.abs_diff(t)
        ));
    }
    for signature in signatures {
        let Some(expected) = hex(&signature) else {
            continue;
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        if mac.verify_slice(&expected).is_ok() {
            return Ok(());
        }
    }
    Err("no valid signature".to_owned())
}

fn hex(text: &str) -> Option<Vec<u8>> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[test]
fn batches_arrive_as_json_arrays_with_headers_and_a_verifiable_signature() {
    let server = Server::http(|_| Reply::ok());
    let mut sink = new_sink(serde_json::json!({
        "url": server.url("/audit?k=1"),
        "max_events": 100,
        "signing_secret": SECRET,
        "token": "gitlab-style-token",
        "headers": {"X-Tenant": "acme"},
    }));
    let batch = events(1..251);
    write(&mut sink, &batch).unwrap();

    let requests = server.requests();
    let sizes: Vec<usize> = requests.iter().map(|r| body_events(r).len()).collect();
    assert_eq!(sizes, [100, 100, 50]);
    // The stored lines, unchanged, in order.
    let expected: String = format!(
        "[{}]",
        batch[..100]
            .iter()
            .map(|e| e.line.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    assert_eq!(requests[0].text(), expected);
    assert_eq!(accepted_ids(&requests, &[200; 3]), ids(&batch));
    for request in &requests {
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/audit?k=1");
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert_eq!(request.header("trail-token"), Some("gitlab-style-token"));
        assert_eq!(request.header("x-tenant"), Some("acme"));
        assert!(
            request
                .header("user-agent")
                .unwrap()
                .starts_with("trail-webhook/")
        );
        let signature = request.header("trail-signature").expect("a signature");
        verify(signature, &request.body, SECRET, now(), 300).unwrap();
    }
}

#[test]
fn tampered_or_replayed_requests_fail_verification() {
    let server = Server::http(|_| Reply::ok());
    let mut sink = new_sink(serde_json::json!({"url": server.url("/"), "signing_secret": SECRET}));
    write(&mut sink, &events(1..3)).unwrap();
    let request = server.requests().remove(0);
    let signature = request.header("trail-signature").unwrap();
    let t: u64 = signature[2..signature.find(',').unwrap()].parse().unwrap();
    verify(signature, &request.body, SECRET, now(), 300).unwrap();

    // Another secret.
    assert!(
        verify(
            signature,
            &request.body,
            "not-the-secret-0123456789",
            now(),
            300
        )
        .is_err()
    );
    // A changed body.
    let mut tampered = request.body.clone();
    let at = tampered.len() / 2;
    tampered[at] ^= 1;
    assert_eq!(
        verify(signature, &tampered, SECRET, now(), 300),
        Err("no valid signature".to_owned())
    );
    // A fresh timestamp on an old signature.
    let restamped = signature.replacen(&format!("t={t}"), &format!("t={}", t + 400), 1);
    assert!(verify(&restamped, &request.body, SECRET, t + 400, 300).is_err());
    // The same request presented again ten minutes later.
    let replayed = verify(signature, &request.body, SECRET, t + 600, 300);
    assert_eq!(
        replayed,
        Err(format!("timestamp {t} is 600s away from now"))
    );
}

#[test]
fn one_event_per_request_sends_the_record_itself() {
    let server = Server::http(|_| Reply::ok());
    let mut sink = new_sink(serde_json::json!({"url": server.url("/one"), "batch": false}));
    let batch = events(10..15);
    write(&mut sink, &batch).unwrap();
    let bodies: Vec<String> = server
        .requests()
        .iter()
        .map(|r| r.text().to_owned())
        .collect();
    let lines: Vec<String> = batch.iter().map(|e| e.line.clone()).collect();
    assert_eq!(bodies, lines);
}

#[test]
fn a_503_then_200_delivers_everything_once_after_the_requested_delay() {
    // The second request is answered 503 twice, with Retry-After: 1; everything else 200.
    let calls = Arc::new(AtomicUsize::new(0));
    let statuses = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (c, s) = (calls.clone(), statuses.clone());
    let server = Server::http(move |_| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        let reply = if n == 1 || n == 2 {
            Reply::status(503, "overloaded, come back later").header("Retry-After", "1")
        } else {
            Reply::ok()
        };
        s.lock().unwrap().push(reply.status);
        reply
    });
    let mut sink = new_sink(serde_json::json!({"url": server.url("/"), "max_events": 100}));
    let batch = events(1..251);
    let delivery = deliver(&mut sink, &batch, 10);

    assert!(delivery.dead.is_empty(), "{:?}", delivery.dead);
    let delivered: Vec<u64> = delivery.errors.iter().map(|e| e.delivered).collect();
    assert_eq!(delivered, [100, 0], "{:?}", delivery.errors);
    for error in &delivery.errors {
        assert_eq!(error.error.kind, ErrorKind::RETRYABLE, "{error}");
        let message = error.error.message.as_str();
        assert!(
            message.contains("HTTP 503 Service Unavailable"),
            "{message}"
        );
        assert!(
            message.contains("retrying after 1s as the server asked"),
            "{message}"
        );
        assert!(message.contains("overloaded, come back later"), "{message}");
    }
    let requests = server.requests();
    assert_eq!(
        accepted_ids(&requests, &statuses.lock().unwrap()),
        ids(&batch)
    );
    // Retry-After was honoured: each retry came at least a second after its 503 (less a
    // little for the one-second resolution of the header).
    for i in [2, 3] {
        let gap = requests[i].at - requests[i - 1].at;
        assert!(gap >= Duration::from_millis(950), "retry {i} after {gap:?}");
    }
}

#[test]
fn a_400_is_permanent_with_the_status_and_the_start_of_the_answer() {
    let server = Server::http(|_| {
        Reply::status(400, "{\"error\": \"schema mismatch\",\n \"detail\": \"…\"}")
    });
    let mut sink = new_sink(serde_json::json!({"url": server.url("/")}));
    let batch = events(1..6);
    let error = write(&mut sink, &batch).unwrap_err();
    assert_eq!(error.delivered, 0);
    expect_error::<()>(
        Err(error.error),
        ErrorKind::PERMANENT,
        &[
            "HTTP 400 Bad Request",
            r#"{\"error\": \"schema mismatch\", \"detail\": \"…\"}"#,
            "event seq 1",
        ],
    );

    // Driven as trail does, every event of the batch ends up a dead letter, at the cost of
    // two requests each (the batch, then its first event alone; the last one alone).
    let server = Server::http(|_| Reply::status(400, "no"));
    let mut sink = new_sink(serde_json::json!({"url": server.url("/")}));
    let delivery = deliver(&mut sink, &batch, 10);
    let dead: Vec<u64> = delivery.dead.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(dead, [1, 2, 3, 4, 5]);
    for (seq, error) in &delivery.dead {
        assert_eq!(error.kind, ErrorKind::PERMANENT);
        assert!(
            error.message.contains("HTTP 400 Bad Request: \"no\""),
            "{error}"
        );
        assert!(
            error.message.contains(&format!("event seq {seq},")),
            "{error}"
        );
    }
    assert_eq!(server.requests().len(), 9);
}

#[test]
fn a_refused_batch_is_narrowed_down_to_the_event_the_server_refuses() {
    let bad = events(1..41).remove(22);
    let bad_id = bad.id.clone();
    let statuses = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = statuses.clone();
    let server = Server::http(move |request| {
        let reply = if request.text().contains(&bad_id) {
            Reply::status(422, "event rejected")
        } else {
            Reply::ok()
        };
        s.lock().unwrap().push(reply.status);
        reply
    });
    let mut sink = new_sink(serde_json::json!({"url": server.url("/")}));
    let batch = events(1..41);
    let delivery = deliver(&mut sink, &batch, 5);

    assert_eq!(delivery.dead.len(), 1, "{:?}", delivery.errors);
    let (seq, error) = &delivery.dead[0];
    assert_eq!(*seq, bad.seq);
    assert_eq!(error.kind, ErrorKind::PERMANENT);
    assert!(error.message.contains("HTTP 422"), "{error}");
    assert!(error.message.contains("event rejected"), "{error}");
    let mut expected = ids(&batch);
    expected.retain(|id| *id != bad.id);
    assert_eq!(
        accepted_ids(&server.requests(), &statuses.lock().unwrap()),
        expected
    );
    // Bisection: a handful of requests, not one per event.
    assert!(
        server.requests().len() <= 14,
        "{} requests",
        server.requests().len()
    );
}

#[test]
fn other_client_errors_are_permanent_without_narrowing() {
    let server = Server::http(|_| Reply::status(401, "bad token"));
    let mut sink = new_sink(serde_json::json!({"url": server.url("/")}));
    let error = write(&mut sink, &events(1..50)).unwrap_err();
    assert_eq!(error.delivered, 0);
    assert_eq!(error.error.kind, ErrorKind::PERMANENT);
    assert!(
        error
            .error
            .message
            .contains("HTTP 401 Unauthorized: \"bad token\""),
        "{error}"
    );
    assert_eq!(server.requests().len(), 1);
}

/// The write failed before anything was delivered, retryably, saying `message`.
fn assert_nothing_delivered_retryable(result: Result<(), WriteError>, message: &str) {
    let error = result.unwrap_err();
    assert_eq!(
        (error.delivered, error.error.kind),
        (0, ErrorKind::RETRYABLE)
    );
    assert!(error.error.message.contains(message), "{error}");
}

#[test]
fn connection_failures_and_timeouts_are_retryable() {
    // A port nobody listens on.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut sink = new_sink(serde_json::json!({"url": format!("http://127.0.0.1:{port}/")}));
    assert_nothing_delivered_retryable(
        write(&mut sink, &events(1..3)),
        &format!("posting to http://127.0.0.1:{port}"),
    );

    // A server slower than the timeout.
    let server = Server::http(|_| {
        std::thread::sleep(Duration::from_millis(1500));
        Reply::ok()
    });
    let mut slow = new_sink(serde_json::json!({"url": server.url("/"), "timeout": "300ms"}));
    assert_nothing_delivered_retryable(
        write(&mut slow, &events(1..3)),
        "no complete answer within 300ms",
    );
}

#[test]
fn https_with_the_right_ca_works_and_with_a_wrong_one_fails() {
    let ca = TestCa::new("trail test CA");
    let other = TestCa::new("unrelated CA");
    let server = Server::https(ca.server_config(), |_| Reply::ok());
    let dir = tempfile::tempdir().unwrap();
    let (right, wrong) = (dir.path().join("right.pem"), dir.path().join("wrong.pem"));
    std::fs::write(&right, &ca.pem).unwrap();
    std::fs::write(&wrong, &other.pem).unwrap();
    let batch = events(1..6);
    let mut good = new_sink(serde_json::json!({"url": server.url("/tls"), "ca_file": right}));
    write(&mut good, &batch).unwrap();
    assert_eq!(accepted_ids(&server.requests(), &[200]), ids(&batch));
    for config in [
        serde_json::json!({"url": server.url("/tls"), "ca_file": wrong}),
        // Mozilla's roots do not know the test CA either.
        serde_json::json!({"url": server.url("/tls")}),
    ] {
        let mut bad = new_sink(config);
        let error = write(&mut bad, &batch).unwrap_err();
        assert_eq!(
            (error.delivered, error.error.kind),
            (0, ErrorKind::RETRYABLE)
        );
        assert!(error.error.message.contains("TLS failed"), "{error}");
        assert!(error.error.message.contains("UnknownIssuer"), "{error}");
    }
    assert_eq!(server.requests().len(), 1);
}

#[test]
fn slack_messages_are_rendered_from_the_template() {
    let server = Server::http(|_| Reply::status(200, "ok"));
    let template = "{actor.name} {type} {target.type} {target.name}: {outcome}";
    let batch = events(1..6);

    let mut one_each = new_sink(serde_json::json!({
        "url": server.url("/services/T0/B0/secret"),
        "format": "slack",
        "batch": false,
        "template": template,
    }));
    write(&mut one_each, &batch[..2]).unwrap();
    let mut together = new_sink(serde_json::json!({
        "url": server.url("/services/T0/B0/secret"),
        "format": "slack",
        "template": template,
    }));
    write(&mut together, &batch).unwrap();

    let texts: Vec<String> = server
        .requests()
        .iter()
        .map(|r| {
            assert_eq!(r.header("content-type"), Some("application/json"));
            let message: HashMap<String, String> = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(message.len(), 1, "{message:?}");
            message["text"].clone()
        })
        .collect();
    let lines = [
        "alice-1 role_granted project billing &lt;1&gt; &amp; co: success",
        "alice-2 access_denied project billing &lt;2&gt; &amp; co: success",
        // Event 3 has no target, event 5 no actor.
        "alice-3 project_deleted - -: success",
        "alice-4 user_login project billing &lt;4&gt; &amp; co: success",
        "- role_granted project billing &lt;5&gt; &amp; co: success",
    ];
    assert_eq!(
        texts,
        [lines[0].to_owned(), lines[1].to_owned(), lines.join("\n")]
    );
}

#[test]
fn configuration_errors_come_back_as_config_errors() {
    let check = |config: Value, contains: &[&str]| {
        let result = plugin().new_sink(&config.to_string(), &TestHost::new("hook"));
        expect_error(result, ErrorKind::CONFIG, contains);
    };
    check(
        serde_json::json!({"url": "http://h", "retries": 3}),
        &["unknown field `retries`"],
    );
    check(
        serde_json::json!({"url": "http://h", "format": "slack", "template": "{actor.login}"}),
        &["\"template\": unknown field {actor.login}", "actor.name"],
    );
    check(
        serde_json::json!({"url": {"env": "TRAIL_TEST_NO_SUCH_VARIABLE"}}),
        &["is not set"],
    );
}

#[test]
fn the_plugin_logs_where_it_posts_without_the_secret_path() {
    let host = TestHost::new("hook");
    plugin()
        .new_sink(
            &serde_json::json!({"url": "https://hooks.example.com/services/T0/B0/XYZ", "format": "slack"}).to_string(),
            &host,
        )
        .unwrap();
    assert_eq!(
        host.logs(),
        ["info: posting to https://hooks.example.com as Slack messages of up to 20 events"]
    );
}
