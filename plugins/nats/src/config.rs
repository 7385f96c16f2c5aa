//! The sink's `config` section: parsing, defaults and every check, done once in the constructor. Owns turning
//! what the user wrote (servers, the subject template, the stream's definition, credentials kept in files or
//! environment variables, TLS files) into [`Settings`] that the delivery code uses without failing. It does no
//! network I/O: files named here are only checked to be readable, and read again by the client when it connects.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;
use trail_plugin_api::SinkError;
use trail_plugin_settings::{Secret, de_duration, de_positive_duration};

use crate::subject::Template;

/// The sink's `config` section, as written in trail.yaml. See README.md.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    servers: Servers,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    stream: Option<StreamConfig>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    password: Option<Secret>,
    #[serde(default)]
    token: Option<Secret>,
    #[serde(default)]
    nkey: Option<Secret>,
    #[serde(default)]
    creds_file: Option<PathBuf>,
    #[serde(default)]
    tls: Option<TlsConfig>,
    #[serde(default)]
    max_in_flight: Option<usize>,
    #[serde(default, deserialize_with = "de_positive_duration")]
    ack_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_positive_duration")]
    connect_timeout: Option<Duration>,
}

/// One server URL or several.
#[derive(Deserialize)]
#[serde(untagged)]
enum Servers {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamConfig {
    name: String,
    #[serde(default)]
    create: bool,
    #[serde(default)]
    subjects: Option<Vec<String>>,
    #[serde(default)]
    retention: Option<Retention>,
    #[serde(default, deserialize_with = "de_duration")]
    max_age: Option<Duration>,
    #[serde(default)]
    replicas: Option<usize>,
    #[serde(default, deserialize_with = "de_positive_duration")]
    duplicate_window: Option<Duration>,
    #[serde(default)]
    storage: Option<Storage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsConfig {
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    cert_file: Option<PathBuf>,
    #[serde(default)]
    key_file: Option<PathBuf>,
}

/// The stream's retention policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Retention {
    /// Kept until a limit (age, size) removes them.
    Limits,
    /// Kept while some consumer has not acknowledged them.
    Interest,
    /// Removed once one consumer acknowledged them.
    Workqueue,
}

/// Where the stream keeps its messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    /// On disk.
    File,
    /// In memory only.
    Memory,
}

/// The default `subject`.
pub const SUBJECT: &str = "audit.{host}.{type}";
/// The default `max_in_flight`.
pub const MAX_IN_FLIGHT: usize = 4096;
/// Most publishes in flight that `max_in_flight` may ask for.
const MAX_IN_FLIGHT_LIMIT: usize = 65_536;
/// The default `ack_timeout`.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// The default `connect_timeout`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The default `stream.replicas` of a created stream.
pub const REPLICAS: usize = 1;
/// The default `stream.duplicate_window` of a created stream (JetStream's own default).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The stream: what a created one gets, and what an existing one is checked against.
#[derive(Clone, Debug, PartialEq)]
pub struct Stream {
    /// Its name.
    pub name: String,
    /// Create it when it does not exist.
    pub create: bool,
    /// Subjects it captures; `explicit` when written in the configuration (then checked on an existing stream).
    pub subjects: Checked<Vec<String>>,
    /// Retention policy.
    pub retention: Checked<Retention>,
    /// Oldest message kept; zero: no limit.
    pub max_age: Checked<Duration>,
    /// Copies in a cluster.
    pub replicas: Checked<usize>,
    /// How long the server remembers message ids to drop duplicates.
    pub duplicate_window: Checked<Duration>,
    /// File or memory.
    pub storage: Checked<Storage>,
}

/// A stream setting: the value a created stream gets, and whether the configuration wrote it (so an existing
/// stream must have it).
#[derive(Clone, Debug, PartialEq)]
pub struct Checked<T> {
    /// The value.
    pub value: T,
    /// Written in the configuration.
    pub explicit: bool,
}

impl<T> Checked<T> {
    fn new(given: Option<T>, default: T) -> Self {
        match given {
            Some(value) => Self {
                value,
                explicit: true,
            },
            None => Self {
                value: default,
                explicit: false,
            },
        }
    }
}

/// How the client proves who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    /// None (the server lets anyone in, or decides by TLS client certificate).
    None,
    /// A user name and a password.
    UserPassword(String, String),
    /// A token.
    Token(String),
    /// An nkey seed (`SU…`).
    Nkey(String),
    /// A `.creds` file: a user JWT and its nkey seed.
    CredsFile(PathBuf),
}

/// Everything the sink needs, checked.
pub struct Settings {
    /// Server URLs (`nats://`, `tls://`, or `host:port`).
    pub servers: Vec<String>,
    /// The subject of each event.
    pub subject: Template,
    /// The stream to create or check; without, publishes go to whatever stream captures their subjects.
    pub stream: Option<Stream>,
    /// Credentials.
    pub auth: Auth,
    /// TLS is required (a `tls` section or a `tls://` server).
    pub tls_required: bool,
    /// CA certificates trusted for the servers' certificates, instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// The client's certificate and key, for servers that verify clients.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Most publishes awaiting their acknowledgement.
    pub max_in_flight: usize,
    /// Longest wait for one publish's acknowledgement.
    pub ack_timeout: Duration,
    /// Longest wait for a connection to a server.
    pub connect_timeout: Duration,
    /// The servers, for messages (no credentials).
    pub endpoint: String,
}

impl Settings {
    /// Parses and checks `config_json`; every error is a `CONFIG` error that names the field.
    pub fn parse(config_json: &str) -> Result<Self, SinkError> {
        trail_plugin_settings::parse_config(config_json, "nats", Self::check)
    }

    fn check(config: Config) -> Result<Self, String> {
        let servers = match config.servers {
            Servers::One(url) => vec![url],
            Servers::Many(urls) => urls,
        };
        if servers.is_empty() {
            return Err(
                "\"servers\" is empty: give at least one server, e.g. nats://nats.example:4222"
                    .into(),
            );
        }
        for url in &servers {
            check_server(url)?;
        }
        let endpoint = servers
            .iter()
            .map(|url| without_userinfo(url))
            .collect::<Vec<_>>()
            .join(",");
        let subject = Template::parse(config.subject.as_deref().unwrap_or(SUBJECT))
            .map_err(|e| format!("\"subject\": {e}"))?;

        let stream = match config.stream {
            None => None,
            Some(s) => Some(check_stream(s, &subject)?),
        };

        let mut given = Vec::new();
        if config.user.is_some() || config.password.is_some() {
            given.push("user/password");
        }
        if config.token.is_some() {
            given.push("token");
        }
        if config.nkey.is_some() {
            given.push("nkey");
        }
        if config.creds_file.is_some() {
            given.push("creds_file");
        }
        if given.len() > 1 {
            return Err(format!(
                "{} are all given: a connection uses one way of logging in, keep one of them",
                given.join(", ")
            ));
        }
        let auth = match (config.user, config.password) {
            (Some(user), Some(password)) => {
                if user.is_empty() {
                    return Err("\"user\" is empty: give the user name".into());
                }
                Auth::UserPassword(user, password.resolve("password")?)
            }
            (Some(_), None) => {
                return Err("\"user\" is given without \"password\": give both".into());
            }
            (None, Some(_)) => {
                return Err("\"password\" is given without \"user\": give both".into());
            }
            (None, None) => match (config.token, config.nkey, config.creds_file) {
                (Some(token), _, _) => Auth::Token(token.resolve("token")?),
                (_, Some(seed), _) => {
                    let seed = seed.resolve("nkey")?;
                    if !seed.starts_with("SU") {
                        return Err("\"nkey\" is not a user nkey seed: give the seed (it starts with SU), not the public key (U…)".into());
                    }
                    Auth::Nkey(seed)
                }
                (_, _, Some(path)) => {
                    readable("creds_file", &path)?;
                    Auth::CredsFile(path)
                }
                _ => Auth::None,
            },
        };

        let tls_url = servers.iter().any(|url| url.starts_with("tls://"));
        let (tls_required, ca_file, client_cert) = match config.tls {
            None => (tls_url, None, None),
            Some(tls) => {
                if let Some(path) = &tls.ca_file {
                    readable("tls.ca_file", path)?;
                }
                let client_cert = match (tls.cert_file, tls.key_file) {
                    (Some(cert), Some(key)) => {
                        readable("tls.cert_file", &cert)?;
                        readable("tls.key_file", &key)?;
                        Some((cert, key))
                    }
                    (None, None) => None,
                    _ => {
                        return Err("\"tls\": give both cert_file and key_file, or neither".into());
                    }
                };
                (true, tls.ca_file, client_cert)
            }
        };

        let max_in_flight = config.max_in_flight.unwrap_or(MAX_IN_FLIGHT);
        if !(1..=MAX_IN_FLIGHT_LIMIT).contains(&max_in_flight) {
            return Err(format!(
                "\"max_in_flight\": {max_in_flight} is out of range: give 1 to {MAX_IN_FLIGHT_LIMIT}"
            ));
        }
        Ok(Self {
            servers,
            subject,
            stream,
            auth,
            tls_required,
            ca_file,
            client_cert,
            max_in_flight,
            ack_timeout: config.ack_timeout.unwrap_or(ACK_TIMEOUT),
            connect_timeout: config.connect_timeout.unwrap_or(CONNECT_TIMEOUT),
            endpoint,
        })
    }
}

fn check_stream(s: StreamConfig, subject: &Template) -> Result<Stream, String> {
    let valid = !s.name.is_empty()
        && s.name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        return Err(format!(
            "\"stream.name\": {:?} is not a stream name the plugin accepts: use letters, digits, - and _",
            s.name
        ));
    }
    if let Some(subjects) = &s.subjects {
        if subjects.is_empty() {
            return Err("\"stream.subjects\" is empty: give at least one, e.g. audit.>".into());
        }
        for pattern in subjects {
            crate::subject::check_pattern(pattern)
                .map_err(|e| format!("\"stream.subjects\": {e}"))?;
        }
    }
    if s.replicas.is_some_and(|r| !(1..=5).contains(&r)) {
        return Err("\"stream.replicas\": give 1 to 5 (JetStream's limit)".into());
    }
    Ok(Stream {
        subjects: Checked::new(s.subjects, vec![subject.capture()]),
        retention: Checked::new(s.retention, Retention::Limits),
        max_age: Checked::new(s.max_age, Duration::ZERO),
        replicas: Checked::new(s.replicas, REPLICAS),
        duplicate_window: Checked::new(s.duplicate_window, DUPLICATE_WINDOW),
        storage: Checked::new(s.storage, Storage::File),
        name: s.name,
        create: s.create,
    })
}

/// A server URL the client can use: `nats://`, `tls://` or no scheme, a host, and a port or none.
fn check_server(url: &str) -> Result<(), String> {
    let rest = match url.split_once("://") {
        Some(("nats" | "tls", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "\"servers\": {:?}: unknown scheme {scheme:?}: write nats://host:port or tls://host:port",
                without_userinfo(url)
            ));
        }
        None => url,
    };
    if rest.contains('@') {
        return Err(format!(
            "\"servers\": {:?}: credentials in the URL are not accepted: give them as user/password or token, which may be kept in a file",
            without_userinfo(url)
        ));
    }
    let host = rest.rsplit_once(':').map_or(rest, |(host, port)| {
        if port.parse::<u16>().is_err() && !rest.ends_with(']') {
            ""
        } else {
            host
        }
    });
    if host.is_empty() || rest.contains('/') || rest.contains(char::is_whitespace) {
        return Err(format!(
            "\"servers\": {:?} is not a server address: write nats://host:port",
            without_userinfo(url)
        ));
    }
    url.parse::<async_nats::ServerAddr>().map_err(|e| {
        format!(
            "\"servers\": {:?} is not a server address ({e}): write nats://host:port",
            without_userinfo(url)
        )
    })?;
    Ok(())
}

/// `url` without a `user:password@` part, for messages.
fn without_userinfo(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}://{host}"),
        (None, Some((_, host))) => host.to_owned(),
        _ => url.to_owned(),
    }
}

fn readable(field: &str, path: &std::path::Path) -> Result<(), String> {
    std::fs::File::open(path).map(drop).map_err(|e| {
        format!(
            "\"{field}\": cannot read {}: {e}: give a file that traild may read (an absolute path)",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use trail_plugin_api::ErrorKind;

    use super::*;

    #[track_caller]
    fn check_error(config: &str, expected: &str) {
        match Settings::parse(config) {
            Ok(_) => panic!("{config} was accepted"),
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::CONFIG, "{e}");
                assert!(e.message.contains(expected), "{config}: {}", e.message);
            }
        }
    }

    #[test]
    fn configuration_errors_name_the_field_and_say_what_to_do() {
        check_error(r#"{}"#, "missing field `servers`");
        check_error(r#"{"servers": []}"#, "\"servers\" is empty");
        check_error(r#"{"servers": "http://x:4222"}"#, "unknown scheme \"http\"");
        check_error(
            r#"{"servers": "nats://u:hunter2@x:4222"}"#,
            "credentials in the URL are not accepted",
        );
        let leaked = Settings::parse(r#"{"servers": "nats://u:hunter2@x:4222"}"#)
            .err()
            .unwrap();
        assert!(!leaked.message.contains("hunter2"), "{}", leaked.message);
        check_error(r#"{"servers": "nats://x:port"}"#, "is not a server address");
        check_error(
            r#"{"servers": "x", "subjekt": "a"}"#,
            "unknown field `subjekt`",
        );
        check_error(
            r#"{"servers": "x", "subject": "a.{hots}"}"#,
            "\"subject\": unknown placeholder {hots}",
        );
        check_error(r#"{"servers": "x", "subject": "a..b"}"#, "empty token");
        check_error(r#"{"servers": "x", "subject": "a.*"}"#, "wildcard");
        check_error(
            r#"{"servers": "x", "user": "u"}"#,
            "\"user\" is given without \"password\"",
        );
        check_error(
            r#"{"servers": "x", "user": "u", "password": "p", "token": "t"}"#,
            "user/password, token are all given",
        );
        check_error(
            r#"{"servers": "x", "token": {"env": "TRAIL_TEST_SURELY_UNSET"}}"#,
            "environment variable TRAIL_TEST_SURELY_UNSET is not set",
        );
        check_error(
            r#"{"servers": "x", "nkey": "UABC"}"#,
            "not a user nkey seed",
        );
        check_error(
            r#"{"servers": "x", "creds_file": "/nonexistent.creds"}"#,
            "\"creds_file\": cannot read /nonexistent.creds",
        );
        check_error(
            r#"{"servers": "x", "tls": {"ca_file": "/nonexistent.pem"}}"#,
            "\"tls.ca_file\": cannot read",
        );
        check_error(
            r#"{"servers": "x", "tls": {"cert_file": "/etc/hostname"}}"#,
            "give both cert_file and key_file",
        );
        check_error(
            r#"{"servers": "x", "max_in_flight": 0}"#,
            "\"max_in_flight\": 0 is out of range",
        );
        check_error(
            r#"{"servers": "x", "ack_timeout": "0s"}"#,
            "must be a positive duration",
        );
        check_error(
            r#"{"servers": "x", "stream": {"name": "a.b"}}"#,
            "not a stream name",
        );
        check_error(
            r#"{"servers": "x", "stream": {"name": "A", "replicas": 7}}"#,
            "\"stream.replicas\"",
        );
        check_error(
            r#"{"servers": "x", "stream": {"name": "A", "subjects": []}}"#,
            "\"stream.subjects\" is empty",
        );
        check_error(
            r#"{"servers": "x", "stream": {"name": "A", "subjects": ["a b"]}}"#,
            "\"stream.subjects\"",
        );
        check_error(
            r#"{"servers": "x", "stream": {"name": "A", "retention": "forever"}}"#,
            "unknown variant `forever`",
        );
        check_error(
            r#"{"servers": "x", "stream": {"name": "A", "duplicate_window": "0s"}}"#,
            "must be a positive duration",
        );
    }

    #[test]
    fn defaults() {
        let s = Settings::parse(r#"{"servers": "nats://127.0.0.1:4222"}"#).unwrap();
        assert_eq!(s.servers, ["nats://127.0.0.1:4222"]);
        assert_eq!(s.subject.text(), SUBJECT);
        assert_eq!(s.stream, None);
        assert_eq!(s.auth, Auth::None);
        assert!(!s.tls_required);
        assert_eq!(s.max_in_flight, MAX_IN_FLIGHT);
        assert_eq!(s.ack_timeout, ACK_TIMEOUT);
        assert_eq!(s.connect_timeout, CONNECT_TIMEOUT);

        let s = Settings::parse(
            r#"{"servers": ["tls://a:4222", "b:4223"], "subject": "fleet.{type}", "stream": {"name": "AUDIT", "create": true, "replicas": 3}, "token": "t"}"#,
        )
        .unwrap();
        assert!(s.tls_required);
        assert_eq!(s.endpoint, "tls://a:4222,b:4223");
        assert_eq!(s.auth, Auth::Token("t".into()));
        let stream = s.stream.unwrap();
        assert!(stream.create);
        assert_eq!(stream.subjects.value, ["fleet.>"]);
        assert!(!stream.subjects.explicit);
        assert_eq!(
            stream.replicas,
            Checked {
                value: 3,
                explicit: true
            }
        );
        assert_eq!(stream.duplicate_window.value, DUPLICATE_WINDOW);
        assert_eq!(stream.max_age.value, Duration::ZERO);
        assert_eq!(stream.retention.value, Retention::Limits);

        let s = Settings::parse(r#"{"servers": "x", "user": "u", "password": "p", "tls": {}}"#)
            .unwrap();
        assert_eq!(s.auth, Auth::UserPassword("u".into(), "p".into()));
        assert!(s.tls_required);
    }
}
