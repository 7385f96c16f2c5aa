//! The sink's `config` section: parsing, defaults and every check, done once in the constructor. Owns turning
//! what the user wrote (a connection string or discrete settings, secrets kept in files or environment
//! variables, table names) into [`Settings`] that the delivery code uses without failing: a validated client
//! configuration, the TLS mode and roots, and table names that are safe to put into SQL. It does no network I/O.

use std::{path::PathBuf, str::FromStr, sync::Arc, time::Duration};

use rustls::pki_types::{CertificateDer, pem::PemObject};
use serde::Deserialize;
use tokio_postgres::config::{Host, SslMode};
use trail_plugin_api::SinkError;
use trail_plugin_settings::{Secret, de_positive_duration};

/// The sink's `config` section, as written in trail.yaml. See README.md.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    url: Option<Secret>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    dbname: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    password: Option<Secret>,
    #[serde(default)]
    sslmode: Option<Tls>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    table: Option<String>,
    #[serde(default)]
    watermark_table: Option<String>,
    #[serde(default = "yes")]
    create_tables: bool,
    #[serde(default, deserialize_with = "de_positive_duration")]
    connect_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_positive_duration")]
    timeout: Option<Duration>,
    #[serde(default)]
    connections: Option<i64>,
}

fn yes() -> bool {
    true
}

/// Whether the connection uses TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tls {
    /// Never.
    Disable,
    /// When the server offers it (a network attacker can refuse it for the server).
    Prefer,
    /// Always; the server's certificate and host name are verified.
    Require,
}

/// The default `table`.
pub const TABLE: &str = "trail_events";
/// The default `watermark_table`.
pub const WATERMARK_TABLE: &str = "trail_watermarks";
/// The default `connect_timeout`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The default `timeout` of one batch's transaction.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// The most `connections`: each is a server backend and one of the server's `max_connections`.
pub const MAX_CONNECTIONS: usize = 16;
/// Longest table name: PostgreSQL keeps 63 bytes of an identifier, and the longest index name the plugin
/// derives from the table's adds 9 (`_host_seq`).
const MAX_TABLE_NAME: usize = 54;

/// A table name checked to be safe in SQL: `name` or `schema.name`, lower-case letters, digits and `_`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableName {
    schema: Option<String>,
    name: String,
}

impl TableName {
    fn parse(field: &str, text: &str) -> Result<Self, String> {
        let (schema, name) = match text.split_once('.') {
            Some((schema, name)) => (Some(schema), name),
            None => (None, text),
        };
        for part in schema.iter().chain([&name]) {
            let valid = part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                && part
                    .bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
            if !valid {
                return Err(format!(
                    "\"{field}\": {text:?} is not a table name the plugin accepts: use lower-case letters, digits and _ (starting with a letter or _), optionally after a schema name and a dot"
                ));
            }
            if part.len() > MAX_TABLE_NAME {
                return Err(format!(
                    "\"{field}\": {part:?} is longer than {MAX_TABLE_NAME} bytes: choose a shorter name"
                ));
            }
        }
        Ok(Self {
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
        })
    }

    /// The name, quoted for SQL (`"audit"."trail_events"`).
    pub fn sql(&self) -> String {
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"{}\"", self.name),
            None => format!("\"{}\"", self.name),
        }
    }

    /// The unquoted name of an index on this table (created in the table's schema): the table's name with
    /// `suffix`.
    pub fn derived(&self, suffix: &str) -> String {
        format!("{}_{suffix}", self.name)
    }

    /// The name as the user wrote it, for `to_regclass` and messages.
    pub fn text(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{schema}.{}", self.name),
            None => self.name.clone(),
        }
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

/// Everything the sink needs, checked.
pub struct Settings {
    /// The client configuration: hosts, ports, user, password, database, TLS mode, timeouts.
    pub client: tokio_postgres::Config,
    /// `user@host:port/dbname`, safe to log (no password).
    pub endpoint: String,
    /// TLS roots when TLS may be used (`sslmode` other than `disable`): `ca_file`'s, or Mozilla's.
    pub roots: Option<Arc<rustls::RootCertStore>>,
    /// Whether the roots are `ca_file`'s.
    pub own_roots: bool,
    /// The events table.
    pub table: TableName,
    /// The watermark table.
    pub watermark_table: TableName,
    /// Create the tables and indexes when they are missing.
    pub create_tables: bool,
    /// Longest time one batch's transaction (connecting included) may take; with several connections, one
    /// part's transaction.
    pub timeout: Duration,
    /// How many connections a batch's rows may be spread over (1..=[`MAX_CONNECTIONS`]).
    pub connections: usize,
}

impl Settings {
    /// Parses and checks `config_json`; every error is a `CONFIG` error that names the field.
    pub fn parse(config_json: &str, sink_name: &str) -> Result<Self, SinkError> {
        trail_plugin_settings::parse_config(config_json, "postgres", |config: Config| {
            Self::check(config, sink_name)
        })
    }

    fn check(config: Config, sink_name: &str) -> Result<Self, String> {
        let (mut client, explicit_sslmode) = match config.url {
            Some(url) => {
                let url = url.resolve("url")?;
                (parse_url(&url)?, mentions_sslmode(&url))
            }
            None => (tokio_postgres::Config::new(), false),
        };
        if let Some(host) = &config.host {
            if host.is_empty() {
                return Err(
                    "\"host\" is empty: give a host name, an address or a socket directory".into(),
                );
            }
            if !client.get_hosts().is_empty() || !client.get_hostaddrs().is_empty() {
                return Err("\"host\" and the url's host are both given: keep one of them".into());
            }
            client.host(host);
        }
        if let Some(port) = config.port {
            if !client.get_ports().is_empty() {
                return Err("\"port\" and the url's port are both given: keep one of them".into());
            }
            client.port(port);
        }
        if let Some(dbname) = &config.dbname {
            if client.get_dbname().is_some() {
                return Err(
                    "\"dbname\" and the url's database are both given: keep one of them".into(),
                );
            }
            client.dbname(dbname);
        }
        if let Some(user) = &config.user {
            if client.get_user().is_some() {
                return Err("\"user\" and the url's user are both given: keep one of them".into());
            }
            client.user(user);
        }
        if let Some(password) = config.password {
            if client.get_password().is_some() {
                return Err(
                    "\"password\" and the url's password are both given: keep one of them".into(),
                );
            }
            client.password(password.resolve("password")?);
        }
        if client.get_hosts().is_empty() {
            return Err(
                "no host: give \"host\" (a host name, an address, or the directory of the server's Unix socket) or a \"url\" that names one"
                    .into(),
            );
        }
        let Some(user) = client.get_user().map(str::to_owned) else {
            return Err("no user: give \"user\", or a \"url\" that names one".into());
        };
        let only_unix = client
            .get_hosts()
            .iter()
            .all(|h| matches!(h, Host::Unix(_)));
        let tls = match config.sslmode {
            Some(_) if explicit_sslmode => {
                return Err(
                    "\"sslmode\" and the url's sslmode are both given: keep one of them".into(),
                );
            }
            Some(mode) => mode,
            None if explicit_sslmode => match client.get_ssl_mode() {
                SslMode::Disable => Tls::Disable,
                SslMode::Prefer => Tls::Prefer,
                _ => Tls::Require,
            },
            // The server does not speak TLS over Unix sockets.
            None if only_unix => Tls::Disable,
            None => Tls::Require,
        };
        client.ssl_mode(match tls {
            Tls::Disable => SslMode::Disable,
            Tls::Prefer => SslMode::Prefer,
            Tls::Require => SslMode::Require,
        });
        let (roots, own_roots) = match (tls, config.ca_file) {
            (Tls::Disable, Some(_)) => {
                return Err(
                    "\"ca_file\" is only used with TLS: remove it, or set sslmode to require"
                        .into(),
                );
            }
            (Tls::Disable, None) => (None, false),
            (_, Some(path)) => (Some(Arc::new(read_roots(&path)?)), true),
            (_, None) => {
                let roots = rustls::RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                };
                (Some(Arc::new(roots)), false)
            }
        };
        match config.connect_timeout {
            Some(_) if client.get_connect_timeout().is_some() => {
                return Err(
                    "\"connect_timeout\" and the url's connect_timeout are both given: keep one of them"
                        .into(),
                );
            }
            Some(timeout) => {
                client.connect_timeout(timeout);
            }
            None if client.get_connect_timeout().is_none() => {
                client.connect_timeout(CONNECT_TIMEOUT);
            }
            None => {}
        }
        if client.get_application_name().is_none() {
            client.application_name(format!("trail {sink_name}"));
        }

        let table = TableName::parse("table", config.table.as_deref().unwrap_or(TABLE))?;
        let watermark_table = TableName::parse(
            "watermark_table",
            config.watermark_table.as_deref().unwrap_or(WATERMARK_TABLE),
        )?;
        if table == watermark_table {
            return Err(format!(
                "\"table\" and \"watermark_table\" are both {table}: give them different names"
            ));
        }

        let connections = match config.connections {
            None => 1,
            Some(n) if (1..=MAX_CONNECTIONS as i64).contains(&n) => n as usize,
            Some(n) => {
                return Err(format!(
                    "\"connections\" is {n}: give a number from 1 to {MAX_CONNECTIONS} (1, the default, writes each batch on one connection)"
                ));
            }
        };

        let hosts: Vec<String> = client
            .get_hosts()
            .iter()
            .map(|h| match h {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        let ports: Vec<String> = client.get_ports().iter().map(u16::to_string).collect();
        let endpoint = format!(
            "{user}@{}{}/{}",
            hosts.join(","),
            if ports.is_empty() {
                String::new()
            } else {
                format!(":{}", ports.join(","))
            },
            client.get_dbname().unwrap_or(&user),
        );
        Ok(Self {
            client,
            endpoint,
            roots,
            own_roots,
            table,
            watermark_table,
            create_tables: config.create_tables,
            timeout: config.timeout.unwrap_or(TIMEOUT),
            connections,
        })
    }
}

/// A libpq-style connection string (`postgresql://…` or `key=value …`), with errors that say what to write.
fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
    for libpq_only in ["verify-full", "verify-ca"] {
        if url.contains(libpq_only) {
            return Err(format!(
                "\"url\": sslmode={libpq_only} is written sslmode=require here: the plugin always verifies the server's certificate and host name when it uses TLS"
            ));
        }
    }
    // The client library's message may quote the string, password included: say only what is wrong.
    tokio_postgres::Config::from_str(url).map_err(|e| {
        let reason = e.to_string();
        let reason = reason
            .split_once(": ")
            .map_or(reason.as_str(), |(_, r)| r)
            .to_owned();
        format!(
            "\"url\" is not a connection string the plugin understands ({reason}): write postgresql://user@host:port/dbname?sslmode=require or host=… user=… dbname=…"
        )
    })
}

/// Whether a connection string sets `sslmode` (the client library's default, `prefer`, cannot be told from a
/// `prefer` written out).
fn mentions_sslmode(url: &str) -> bool {
    url.match_indices("sslmode")
        .any(|(at, _)| url[at + "sslmode".len()..].trim_start().starts_with('='))
}

fn read_roots(path: &std::path::Path) -> Result<rustls::RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| {
        format!(
            "\"ca_file\": cannot read {}: {e}: give a readable PEM file of CA certificates",
            path.display()
        )
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| {
            format!(
                "\"ca_file\": {} is not valid PEM ({e}): give a PEM file of CA certificates",
                path.display()
            )
        })?;
        roots.add(cert).map_err(|e| {
            format!(
                "\"ca_file\": {} holds a certificate that cannot be a CA ({e})",
                path.display()
            )
        })?;
    }
    if roots.is_empty() {
        return Err(format!(
            "\"ca_file\": {} holds no certificate: give a PEM file with at least one \"BEGIN CERTIFICATE\" block",
            path.display()
        ));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use trail_plugin_api::ErrorKind;

    use super::*;

    fn parse(config: &str) -> Result<Settings, SinkError> {
        Settings::parse(config, "pg")
    }

    #[track_caller]
    fn check_error(config: &str, expected: &str) {
        match parse(config) {
            Ok(_) => panic!("{config} was accepted"),
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::CONFIG, "{e}");
                assert!(e.message.contains(expected), "{config}: {}", e.message);
            }
        }
    }

    #[test]
    fn configuration_errors_name_the_field_and_say_what_to_do() {
        check_error(r#"{}"#, "no host: give \"host\"");
        check_error(r#"{"host": "db"}"#, "no user: give \"user\"");
        check_error(r#"{"host": "db", "usr": "x"}"#, "unknown field `usr`");
        check_error(
            r#"{"url": "postgresql://u@db/a?sslmode=verify-full"}"#,
            "sslmode=verify-full is written sslmode=require",
        );
        check_error(
            r#"{"url": "postgresql://u:hunter2@db/a?sslmode=sometimes"}"#,
            "\"url\" is not a connection string the plugin understands",
        );
        let leaked = parse(r#"{"url": "host=db user=u password=hunter2 sslmode=sometimes"}"#)
            .err()
            .unwrap();
        assert!(!leaked.message.contains("hunter2"), "{}", leaked.message);
        check_error(
            r#"{"url": "postgresql://u@db/a", "host": "other"}"#,
            "\"host\" and the url's host are both given",
        );
        check_error(
            r#"{"url": "postgresql://u:p@db/a", "password": "q"}"#,
            "\"password\" and the url's password are both given",
        );
        check_error(
            r#"{"url": "postgresql://u@db/a?sslmode=require", "sslmode": "disable"}"#,
            "\"sslmode\" and the url's sslmode are both given",
        );
        check_error(
            r#"{"host": "db", "user": "u", "sslmode": "always"}"#,
            "unknown variant `always`",
        );
        check_error(
            r#"{"host": "db", "user": "u", "password": {"env": "TRAIL_TEST_SURELY_UNSET"}}"#,
            "environment variable TRAIL_TEST_SURELY_UNSET is not set",
        );
        check_error(
            r#"{"host": "db", "user": "u", "sslmode": "disable", "ca_file": "/x.pem"}"#,
            "\"ca_file\" is only used with TLS",
        );
        check_error(
            r#"{"host": "db", "user": "u", "ca_file": "/nonexistent.pem"}"#,
            "\"ca_file\": cannot read /nonexistent.pem",
        );
        check_error(
            r#"{"host": "db", "user": "u", "timeout": "0s"}"#,
            "must be a positive duration",
        );
        check_error(
            r#"{"host": "db", "user": "u", "table": "events; drop table x"}"#,
            "is not a table name the plugin accepts",
        );
        check_error(
            r#"{"host": "db", "user": "u", "table": "Events"}"#,
            "use lower-case letters",
        );
        check_error(
            r#"{"host": "db", "user": "u", "table": "a.b.c"}"#,
            "is not a table name",
        );
        check_error(
            r#"{"host": "db", "user": "u", "watermark_table": "\"x\""}"#,
            "\"watermark_table\"",
        );
        check_error(
            &format!(
                r#"{{"host": "db", "user": "u", "table": "{}"}}"#,
                "t".repeat(55)
            ),
            "longer than 54 bytes",
        );
        check_error(
            r#"{"host": "db", "user": "u", "table": "x", "watermark_table": "x"}"#,
            "give them different names",
        );
        for n in ["0", "17", "-1", "1000000000000"] {
            check_error(
                &format!(r#"{{"host": "db", "user": "u", "connections": {n}}}"#),
                &format!("\"connections\" is {n}: give a number from 1 to 16"),
            );
        }
        check_error(
            r#"{"host": "db", "user": "u", "connections": "4"}"#,
            "invalid type: string \"4\"",
        );
    }

    #[test]
    fn defaults_and_tls_modes() {
        let s = parse(r#"{"host": "db.example", "user": "trail", "dbname": "audit"}"#).unwrap();
        assert_eq!(s.endpoint, "trail@db.example/audit");
        assert_eq!(s.client.get_ssl_mode(), SslMode::Require);
        assert!(s.roots.is_some() && !s.own_roots);
        assert_eq!(s.table.sql(), "\"trail_events\"");
        assert_eq!(s.watermark_table.sql(), "\"trail_watermarks\"");
        assert!(s.create_tables);
        assert_eq!(s.timeout, TIMEOUT);
        assert_eq!(s.connections, 1);
        assert_eq!(s.client.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert_eq!(s.client.get_application_name(), Some("trail pg"));

        // A Unix socket directory: no TLS unless asked.
        let s = parse(r#"{"host": "/run/postgresql", "user": "trail"}"#).unwrap();
        assert_eq!(s.client.get_ssl_mode(), SslMode::Disable);
        assert!(s.roots.is_none());
        assert_eq!(s.endpoint, "trail@/run/postgresql/trail");

        // What the url says is kept, in either form.
        let s = parse(r#"{"url": "postgresql://trail:pw@db:6543/audit?sslmode=prefer"}"#).unwrap();
        assert_eq!(s.client.get_ssl_mode(), SslMode::Prefer);
        assert_eq!(s.endpoint, "trail@db:6543/audit");
        assert!(!s.endpoint.contains("pw"));
        let s =
            parse(r#"{"url": "host=db user=trail sslmode = disable connect_timeout=3"}"#).unwrap();
        assert_eq!(s.client.get_ssl_mode(), SslMode::Disable);
        assert_eq!(
            s.client.get_connect_timeout(),
            Some(&Duration::from_secs(3))
        );
        let s = parse(r#"{"url": "postgresql://trail@db/audit"}"#).unwrap();
        assert_eq!(s.client.get_ssl_mode(), SslMode::Require);

        let s = parse(
            r#"{"host": "db", "port": 6000, "user": "u", "password": "p", "table": "audit.events", "watermark_table": "audit.hosts", "create_tables": false, "timeout": "5s", "connections": 16}"#,
        )
        .unwrap();
        assert_eq!(s.client.get_ports(), [6000]);
        assert_eq!(s.client.get_password(), Some(&b"p"[..]));
        assert_eq!(s.table.sql(), "\"audit\".\"events\"");
        assert_eq!(s.table.derived("time"), "events_time");
        assert_eq!(s.watermark_table.text(), "audit.hosts");
        assert!(!s.create_tables);
        assert_eq!(s.timeout, Duration::from_secs(5));
        assert_eq!(s.connections, 16);
        let s = parse(r#"{"host": "db", "user": "u", "connections": 1}"#).unwrap();
        assert_eq!(s.connections, 1);
    }

    #[test]
    fn sslmode_is_found_in_either_form_of_connection_string() {
        assert!(mentions_sslmode("postgresql://h/d?sslmode=require"));
        assert!(mentions_sslmode("host=h sslmode =disable"));
        assert!(!mentions_sslmode("postgresql://h/d"));
        assert!(!mentions_sslmode("host=h password=sslmode"));
    }
}
