//! The syslog plugin built as a real dynamic library, loaded through the plugin API, sending to
//! a real rsyslogd started in the foreground by the test with its own configuration: a Unix
//! datagram socket, TCP and UDP inputs on loopback, and every message written to a file in the
//! RFC 5424 format. Each line of that file is parsed back here.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader},
    net::{TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use trail_plugin_api::{ErrorKind, SinkBox};
use trail_plugin_testkit::{Event, Plugin, Profile, TestHost, events, expect_error, write};

/// Generous: the machine may be busy building.
const DEADLINE: Duration = Duration::from_secs(30);

fn plugin() -> Plugin {
    static PLUGIN: std::sync::OnceLock<Plugin> = std::sync::OnceLock::new();
    *PLUGIN.get_or_init(|| Plugin::build_and_load("trail-sink-syslog", Profile::Debug))
}

fn new_sink(config: Value) -> SinkBox {
    plugin()
        .new_sink(&config.to_string(), &TestHost::new("syslog"))
        .unwrap_or_else(|e| panic!("{config}: {e}"))
}

/// Polls `check` until it returns `Some`, or panics after [`DEADLINE`] with `what`.
fn poll<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An rsyslogd of the test's own, stopped (by its process id) when dropped.
struct Rsyslog {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    tcp_port: u16,
    udp_port: u16,
}

impl Rsyslog {
    fn start() -> Self {
        // In the system's temporary directory: a Unix socket path must be short.
        let dir = tempfile::Builder::new()
            .prefix("trail-rsyslog")
            .tempdir()
            .unwrap();
        let path = |name: &str| dir.path().join(name);
        fs::create_dir(path("work")).unwrap();
        let socket = path("log.sock");
        // imudp cannot report the port it bound, so take a free one (the window for another
        // process to take it first is tiny).
        let udp_port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = format!(
            r#"
global(workDirectory="{work}" maxMessageSize="64k")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{socket}" UseSpecialParser="off" ParseHostname="on"
      IgnoreTimestamp="off" UseSysTimeStamp="off" RateLimit.Interval="0")
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="0" listenPortFileName="{port_file}")
module(load="imudp")
input(type="imudp" address="127.0.0.1" port="{udp_port}" rcvbufSize="4m")
action(type="omfile" file="{out}" template="RSYSLOG_SyslogProtocol23Format")
"#,
            work = path("work").display(),
            socket = socket.display(),
            port_file = path("tcp.port").display(),
            out = path("out.log").display(),
        );
        fs::write(path("rsyslog.conf"), config).unwrap();
        let child = Command::new(rsyslogd())
            .args(["-n", "-f"])
            .arg(path("rsyslog.conf"))
            .arg("-i")
            .arg(path("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(fs::File::create(path("stdout")).unwrap())
            .stderr(fs::File::create(path("stderr")).unwrap())
            .spawn()
            .expect("starting rsyslogd");
        let mut rsyslog = Self {
            child,
            socket,
            tcp_port: 0,
            udp_port,
            dir,
        };
        let tcp_port = poll("rsyslogd to listen", || {
            rsyslog.check_running();
            let port = fs::read_to_string(rsyslog.path("tcp.port")).ok()?;
            let port = port.trim().parse().ok()?;
            rsyslog.socket.exists().then_some(port)
        });
        rsyslog.tcp_port = tcp_port;
        // Ready when a probe over UDP (the one input that cannot say it is listening) has
        // reached the file.
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        poll("a probe to go through rsyslogd", || {
            rsyslog.check_running();
            let _ = probe.send_to(
                b"<13>1 - probe probe - ready - ready",
                ("127.0.0.1", rsyslog.udp_port),
            );
            std::thread::sleep(Duration::from_millis(50));
            rsyslog
                .messages()
                .iter()
                .any(|m| m.app_name == "probe")
                .then_some(())
        });
        rsyslog
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn check_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "rsyslogd exited ({status}): {}{}",
                fs::read_to_string(self.path("stdout")).unwrap_or_default(),
                fs::read_to_string(self.path("stderr")).unwrap_or_default()
            );
        }
    }

    /// Every complete line of the output file, parsed as RFC 5424 (a line that does not parse
    /// fails the test).
    fn messages(&self) -> Vec<Message> {
        let Ok(file) = fs::File::open(self.path("out.log")) else {
            return Vec::new();
        };
        let mut messages = Vec::new();
        let mut reader = BufReader::new(file);
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap() > 0 {
            let Some(complete) = line.strip_suffix('\n') else {
                break; // still being written
            };
            messages.push(parse(complete).unwrap_or_else(|e| panic!("{e}: {complete:?}")));
            line.clear();
        }
        messages
    }

    /// The messages from `trail`, once there are `n` of them.
    fn wait_for(&self, n: usize) -> Vec<Message> {
        poll(&format!("{n} messages from trail"), || {
            let messages: Vec<Message> = self
                .messages()
                .into_iter()
                .filter(|m| m.app_name == "trail")
                .collect();
            (messages.len() >= n).then_some(messages)
        })
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rsyslogd() -> PathBuf {
    for candidate in ["/usr/sbin/rsyslogd", "/sbin/rsyslogd"] {
        if Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    // Elsewhere on PATH, or a clear failure.
    let found = Command::new("rsyslogd")
        .arg("-v")
        .stdout(Stdio::null())
        .status();
    assert!(
        found.is_ok(),
        "rsyslogd not found: install the rsyslog package (apt-get install rsyslog)"
    );
    "rsyslogd".into()
}

/// An RFC 5424 message.
#[derive(Debug, PartialEq, Eq)]
struct Message {
    facility: u8,
    severity: u8,
    timestamp: String,
    hostname: String,
    app_name: String,
    procid: String,
    msgid: String,
    /// SD-ID to its parameters in order; empty for NILVALUE.
    sd: BTreeMap<String, Vec<(String, String)>>,
    msg: Option<String>,
}

/// A strict parser of RFC 5424's syntax (section 6), written for these tests.
fn parse(line: &str) -> Result<Message, String> {
    let rest = line.strip_prefix('<').ok_or("no PRI")?;
    let (pri, rest) = rest.split_once('>').ok_or("unterminated PRI")?;
    if pri.is_empty() || pri.len() > 3 || (pri.len() > 1 && pri.starts_with('0')) {
        return Err(format!("bad PRI {pri:?}"));
    }
    let pri: u8 = pri.parse().map_err(|_| format!("bad PRI {pri:?}"))?;
    if pri > 191 {
        return Err(format!("PRI {pri} out of range"));
    }
    let rest = rest.strip_prefix("1 ").ok_or("not VERSION 1")?;
    let mut fields = rest.splitn(6, ' ');
    let mut header = |name: &str, max: usize| -> Result<String, String> {
        let value = fields.next().ok_or(format!("no {name}"))?;
        if value.is_empty() || value.len() > max || !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("bad {name} {value:?}"));
        }
        Ok(value.to_owned())
    };
    let timestamp = header("TIMESTAMP", 32)?;
    let hostname = header("HOSTNAME", 255)?;
    let app_name = header("APP-NAME", 48)?;
    let procid = header("PROCID", 128)?;
    let msgid = header("MSGID", 32)?;
    if timestamp != "-" {
        check_timestamp(&timestamp)?;
    }
    let rest = fields.next().ok_or("no STRUCTURED-DATA")?;
    let (sd, rest) = parse_sd(rest)?;
    let msg = match rest {
        "" => None,
        _ => Some(
            rest.strip_prefix(' ')
                .ok_or("no space before MSG")?
                .to_owned(),
        ),
    };
    Ok(Message {
        facility: pri / 8,
        severity: pri % 8,
        timestamp,
        hostname,
        app_name,
        procid,
        msgid,
        sd,
        msg,
    })
}

fn check_timestamp(ts: &str) -> Result<(), String> {
    let b = ts.as_bytes();
    let digit = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
    let fixed = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    let ok = b.len() >= 20
        && (0..19).all(|i| match fixed.iter().find(|(at, _)| *at == i) {
            Some((_, c)) => b[i] == *c,
            None => digit(i),
        });
    let mut rest = &ts[19.min(ts.len())..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let n = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 || n > 6 {
            return Err(format!("bad TIME-SECFRAC in {ts:?}"));
        }
        rest = &fraction[n..];
    }
    let offset =
        rest == "Z" || (rest.len() == 6 && matches!(&rest[..1], "+" | "-") && &rest[3..4] == ":");
    if ok && offset {
        Ok(())
    } else {
        Err(format!("bad TIMESTAMP {ts:?}"))
    }
}

type Sd = BTreeMap<String, Vec<(String, String)>>;

fn parse_sd(text: &str) -> Result<(Sd, &str), String> {
    let mut sd = BTreeMap::new();
    if let Some(rest) = text.strip_prefix('-') {
        return Ok((sd, rest));
    }
    let mut rest = text;
    while let Some(element) = rest.strip_prefix('[') {
        let name_end = element.find([' ', ']']).ok_or("unterminated SD-ELEMENT")?;
        let id = &element[..name_end];
        check_sd_name(id)?;
        let mut params = Vec::new();
        let mut cursor = &element[name_end..];
        while let Some(param) = cursor.strip_prefix(' ') {
            let (name, value) = param.split_once("=\"").ok_or("no =\" in SD-PARAM")?;
            check_sd_name(name)?;
            let mut unescaped = String::new();
            let mut chars = value.char_indices();
            let end = loop {
                match chars.next().ok_or("unterminated PARAM-VALUE")? {
                    (_, '\\') => match chars.next().ok_or("dangling escape")? {
                        (_, c @ ('"' | '\\' | ']')) => unescaped.push(c),
                        (_, c) => {
                            unescaped.push('\\');
                            unescaped.push(c);
                        }
                    },
                    (i, '"') => break i,
                    (_, ']') => return Err("unescaped ] in PARAM-VALUE".into()),
                    (_, c) => unescaped.push(c),
                }
            };
            params.push((name.to_owned(), unescaped));
            cursor = &value[end + 1..];
        }
        rest = cursor.strip_prefix(']').ok_or("unterminated SD-ELEMENT")?;
        if sd.insert(id.to_owned(), params).is_some() {
            return Err(format!("SD-ID {id} twice"));
        }
    }
    if sd.is_empty() {
        return Err(format!("bad STRUCTURED-DATA at {text:?}"));
    }
    Ok((sd, rest))
}

fn check_sd_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'=' | b']' | b'"'));
    ok.then_some(()).ok_or(format!("bad SD-NAME {name:?}"))
}

#[test]
fn the_parser_accepts_rfc5424_and_refuses_the_rest() {
    let m = parse(r#"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut="3" eventSource="Application" eventID="1011"][examplePriority@32473 class="high"] msg"#).unwrap();
    assert_eq!((m.facility, m.severity), (20, 5));
    assert_eq!(
        m.sd["examplePriority@32473"],
        [("class".to_owned(), "high".to_owned())]
    );
    assert_eq!(m.sd["exampleSDID@32473"].len(), 3);
    assert_eq!(m.msg.as_deref(), Some("msg"));
    let m = parse(r#"<34>1 2003-10-11T22:14:15.003-07:00 h su - - [a@1 x="q\"\]\\"]"#).unwrap();
    assert_eq!(m.sd["a@1"], [("x".to_owned(), r#"q"]\"#.to_owned())]);
    assert_eq!(m.msg, None);
    for bad in [
        "<34>2 - h a - - -",
        "<192>1 - h a - - -",
        "<034>1 - h a - - -",
        "<34>1 2003-10-11 22:14:15Z h a - - -",
        "<34>1 2003-10-11T22:14:15.0000001Z h a - - -",
        "<34>1 - h a - - [a@1 x=\"]\"]",
        "<34>1 - h a - - [a@1 x=\"unterminated]",
        "<34>1 - h a - - nosd",
        "<34>1 - h a - -",
    ] {
        assert!(parse(bad).is_err(), "{bad} was accepted");
    }
}

/// What every message from `trail` must be for `event`, in `format: json`.
#[track_caller]
fn check_json_message(m: &Message, event: &Event, facility: u8, hostname: &str) {
    let record: Value = serde_json::from_str(&event.line).unwrap();
    let severity = match record["severity"].as_str().unwrap() {
        "info" => 6,
        "notice" => 5,
        "warning" => 4,
        "critical" => 2,
        other => panic!("severity {other}"),
    };
    assert_eq!((m.facility, m.severity), (facility, severity), "{m:?}");
    // received_at with its nanoseconds cut to the microseconds RFC 5424 allows.
    let received_at = record["received_at"].as_str().unwrap();
    assert_eq!(m.timestamp, format!("{}Z", &received_at[..26]));
    assert_eq!(m.hostname, hostname);
    assert_eq!(m.app_name, "trail");
    assert_eq!(m.procid, std::process::id().to_string());
    assert_eq!(m.msgid, event.event_type);
    assert!(m.sd.is_empty(), "{m:?}");
    assert_eq!(m.msg.as_deref(), Some(event.line.as_str()));
}

/// Sends `sent` in batches of 50, then checks that rsyslogd wrote each exactly once.
fn deliver_and_check(rsyslog: &Rsyslog, sink: &mut SinkBox, sent: &[Event], hostname: &str) {
    for batch in sent.chunks(50) {
        write(sink, batch).unwrap();
    }
    let received = rsyslog.wait_for(sent.len());
    let mut by_seq = BTreeMap::new();
    for m in &received {
        let record: Value = serde_json::from_str(m.msg.as_deref().unwrap()).unwrap();
        let seq = record["seq"].as_u64().unwrap();
        assert!(by_seq.insert(seq, m).is_none(), "seq {seq} twice");
    }
    assert_eq!(by_seq.len(), sent.len());
    for event in sent {
        check_json_message(by_seq[&event.seq], event, 10, hostname);
    }
}

#[test]
fn every_event_arrives_over_the_unix_socket() {
    let rsyslog = Rsyslog::start();
    let mut sink = new_sink(serde_json::json!({
        "path": rsyslog.socket,
        "hostname": "via-unix",
    }));
    deliver_and_check(&rsyslog, &mut sink, &events(1..301), "via-unix");
}

#[test]
fn every_event_arrives_over_tcp() {
    let rsyslog = Rsyslog::start();
    let mut sink = new_sink(serde_json::json!({
        "transport": "tcp",
        "address": format!("127.0.0.1:{}", rsyslog.tcp_port),
        "hostname": "via-tcp",
    }));
    deliver_and_check(&rsyslog, &mut sink, &events(1..301), "via-tcp");
    assert!(sink.close().is_ok());
}

#[test]
fn every_event_arrives_over_udp() {
    let rsyslog = Rsyslog::start();
    let mut sink = new_sink(serde_json::json!({
        "transport": "udp",
        "address": format!("127.0.0.1:{}", rsyslog.udp_port),
        "hostname": "via-udp",
    }));
    // Fewer than over the other transports: UDP may drop what a busy receiver cannot take.
    deliver_and_check(&rsyslog, &mut sink, &events(1..101), "via-udp");
}

#[test]
fn structured_data_carries_the_fields_and_the_message_the_text() {
    let rsyslog = Rsyslog::start();
    let mut sink = new_sink(serde_json::json!({
        "transport": "tcp",
        "address": format!("127.0.0.1:{}", rsyslog.tcp_port),
        "format": "structured",
        "facility": "local4",
        "hostname": "sd-host",
        "sd_id": "audit@99999",
    }));
    let sent = events(1..41);
    write(&mut sink, &sent).unwrap();
    let received = rsyslog.wait_for(sent.len());
    for (m, event) in received.iter().zip(&sent) {
        let record: Value = serde_json::from_str(&event.line).unwrap();
        let params = &m.sd["audit@99999"];
        assert_eq!(m.sd.len(), 1);
        // Every field but the message, objects flattened one level, in the record's order.
        let mut expected = Vec::new();
        for (key, value) in record.as_object().unwrap() {
            match (key.as_str(), value) {
                ("message", _) => {}
                ("source" | "actor" | "target", Value::Object(members)) => {
                    for (member, value) in members {
                        expected.push((format!("{key}.{member}"), text(value)));
                    }
                }
                (key, value) => expected.push((key.to_owned(), text(value))),
            }
        }
        assert_eq!(*params, expected, "{m:?}");
        assert_eq!(m.msg.as_deref(), record["message"].as_str());
        assert_eq!(m.facility, 20);
        assert_eq!(m.msgid, event.event_type);
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[test]
fn both_formats_together_with_a_fixed_severity() {
    let rsyslog = Rsyslog::start();
    let mut sink = new_sink(serde_json::json!({
        "path": rsyslog.socket,
        "format": "both",
        "facility": "audit",
        "severity": "notice",
    }));
    let sent = events(1..9);
    write(&mut sink, &sent).unwrap();
    let received = rsyslog.wait_for(sent.len());
    for (m, event) in received.iter().zip(&sent) {
        assert_eq!((m.facility, m.severity), (13, 5));
        assert_eq!(
            m.sd["trail@32473"][0],
            ("seq".to_owned(), event.seq.to_string())
        );
        assert_eq!(m.msg.as_deref(), Some(event.line.as_str()));
    }
}

#[test]
fn a_tcp_collector_that_closed_the_connection_gets_a_new_one() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let mut sink =
        new_sink(serde_json::json!({"transport": "tcp", "address": address.to_string()}));
    // The plugin connected when it was created.
    let first = accept(&listener);
    write(&mut sink, &events(1..3)).unwrap();
    let framed = read_frames(&first, 2);
    assert!(framed[0].contains(r#""seq":1,"#), "{framed:?}");
    drop(first);
    // The plugin can only notice the close once its kernel has taken the FIN in, which a loaded machine may
    // defer for a moment; a write before that goes into the dead socket (TCP syslog has no acknowledgements).
    std::thread::sleep(Duration::from_millis(200));

    // The next write notices the closed connection and delivers over a new one.
    let sent = events(3..6);
    let writer = std::thread::spawn(move || {
        write(&mut sink, &sent).unwrap();
        sink
    });
    let second = accept(&listener);
    let framed = read_frames(&second, 3);
    assert!(framed[2].contains(r#""seq":5,"#), "{framed:?}");
    writer.join().unwrap();
}

/// The next connection to `listener`, within the deadline.
fn accept(listener: &TcpListener) -> std::net::TcpStream {
    listener.set_nonblocking(true).unwrap();
    let (stream, _) = poll("a connection from the plugin", || listener.accept().ok());
    stream.set_nonblocking(false).unwrap();
    stream
}

/// Reads `n` octet-counted frames.
fn read_frames(stream: &std::net::TcpStream, n: usize) -> Vec<String> {
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut reader = BufReader::new(stream);
    (0..n)
        .map(|_| {
            let mut length = Vec::new();
            reader.read_until(b' ', &mut length).unwrap();
            let length: usize = std::str::from_utf8(&length)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            let mut frame = vec![0; length];
            std::io::Read::read_exact(&mut reader, &mut frame).unwrap();
            let frame = String::from_utf8(frame).unwrap();
            parse(&frame).unwrap_or_else(|e| panic!("{e}: {frame}"));
            frame
        })
        .collect()
}

#[test]
fn no_listener_is_retryable() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no.sock");
    let host = TestHost::new("syslog");
    let mut sink = plugin()
        .new_sink(&serde_json::json!({"path": missing}).to_string(), &host)
        .unwrap();
    assert!(
        host.logs()[1].contains("is the syslog daemon running"),
        "{:?}",
        host.logs()
    );
    let error = write(&mut sink, &events(1..3)).unwrap_err();
    assert_eq!(error.delivered, 0);
    expect_error::<()>(
        Err(error.error),
        ErrorKind::RETRYABLE,
        &["cannot connect to", "no.sock"],
    );

    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut sink =
        new_sink(serde_json::json!({"transport": "tcp", "address": format!("127.0.0.1:{port}")}));
    let error = write(&mut sink, &events(1..3)).unwrap_err();
    assert_eq!(error.delivered, 0);
    expect_error::<()>(
        Err(error.error),
        ErrorKind::RETRYABLE,
        &["cannot connect to 127.0.0.1"],
    );
}

#[test]
fn an_event_too_large_for_a_datagram_is_permanent() {
    let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut sink = new_sink(serde_json::json!({
        "transport": "udp",
        "address": receiver.local_addr().unwrap().to_string(),
    }));
    let mut sent = events(1..4);
    sent[1].line = sent[1].line.replace(
        "\"method\":\"sso\"",
        &format!("\"method\":\"{}\"", "x".repeat(70_000)),
    );
    let error = write(&mut sink, &sent).unwrap_err();
    assert_eq!(error.delivered, 1);
    expect_error::<()>(
        Err(error.error),
        ErrorKind::PERMANENT,
        &[
            "event seq 2",
            "too large for one datagram",
            "use transport tcp",
        ],
    );
}

#[test]
fn configuration_errors_come_back_as_config_errors() {
    let result = plugin().new_sink(
        r#"{"transport": "tcp", "adress": "h:1"}"#,
        &TestHost::new("s"),
    );
    expect_error(result, ErrorKind::CONFIG, &["unknown field `adress`"]);
    let result = plugin().new_sink(r#"{"transport": "tcp"}"#, &TestHost::new("s"));
    expect_error(result, ErrorKind::CONFIG, &["needs \"address\""]);
}
