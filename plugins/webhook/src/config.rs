//! The sink's `config` section: parsing, defaults and every check, done once in the
//! constructor. Owns turning what the user wrote (including secrets kept in files or
//! environment variables) into [`Settings`] that the delivery code can use without failing.
//! It does no network I/O.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use serde::Deserialize;
use trail_plugin_api::SinkError;
use trail_plugin_settings::{Secret, de_duration, de_positive_duration};
use ureq::http::{HeaderName, HeaderValue, Uri};

use crate::slack::Template;

/// The sink's `config` section, as written in trail.yaml. See README.md.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    url: Secret,
    #[serde(default)]
    format: Format,
    #[serde(default = "yes")]
    batch: bool,
    #[serde(default)]
    max_events: Option<usize>,
    #[serde(default, deserialize_with = "de_positive_duration")]
    timeout: Option<Duration>,
    #[serde(default)]
    headers: BTreeMap<String, Secret>,
    #[serde(default)]
    signing_secret: Option<Secret>,
    #[serde(default)]
    signature_header: Option<String>,
    #[serde(default)]
    token: Option<Secret>,
    #[serde(default)]
    token_header: Option<String>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    template: Option<String>,
    #[serde(default, deserialize_with = "de_duration")]
    max_retry_after: Option<Duration>,
}

fn yes() -> bool {
    true
}

/// What a request's body looks like.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// The stored JSON records: an array of them, or one object per request.
    #[default]
    Json,
    /// A Slack incoming-webhook message, `{"text": "…"}`, one line per event.
    Slack,
}

/// The default `signature_header`.
pub const SIGNATURE_HEADER: &str = "Trail-Signature";
/// The default `token_header`.
pub const TOKEN_HEADER: &str = "Trail-Token";
/// The default `timeout`.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// The default `max_retry_after`.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// The default `max_events` for `format: json`.
pub const MAX_EVENTS_JSON: usize = 500;
/// The default `max_events` for `format: slack`: keeps a message readable and well under
/// Slack's limit on message length.
pub const MAX_EVENTS_SLACK: usize = 20;
/// The default Slack template.
pub const DEFAULT_TEMPLATE: &str =
    "[{severity}] {type}: {actor.name} {outcome} on {target.type} {target.name}";

/// Headers the plugin sets itself, or that HTTP/1.1 framing owns.
const RESERVED_HEADERS: [&str; 6] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "content-type",
    "user-agent",
];

/// Everything the sink needs, checked.
pub struct Settings {
    /// Where to post.
    pub url: String,
    /// `scheme://host:port` of `url`, safe to log: the path and query of a webhook URL are often
    /// the secret (Slack's are).
    pub endpoint: String,
    /// Body format.
    pub format: Format,
    /// Events per request (1 when `batch` is false).
    pub max_events: usize,
    /// Whether several events go in one request (a JSON array, or several lines of text).
    pub batch: bool,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// Longest wait honoured from a `Retry-After` header.
    pub max_retry_after: Duration,
    /// Extra headers, including the token header.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// HMAC key and header name.
    pub signing: Option<(Vec<u8>, HeaderName)>,
    /// Root certificates that replace the built-in ones.
    pub roots: Option<Arc<Vec<ureq::tls::Certificate<'static>>>>,
    /// The Slack template, for `format: slack`.
    pub template: Option<Template>,
}

impl Settings {
    /// Parses and checks `config_json`; every error is a `CONFIG` error that names the field.
    pub fn parse(config_json: &str) -> Result<Self, SinkError> {
        trail_plugin_settings::parse_config(config_json, "webhook", Self::check)
    }

    fn check(config: Config) -> Result<Self, String> {
        let url = config.url.resolve("url")?;
        let uri: Uri = url.parse().map_err(|e| {
            format!("\"url\": not a valid URL ({e}): write e.g. https://audit.example.com/hook")
        })?;
        let scheme = uri.scheme_str().unwrap_or_default();
        if !matches!(scheme, "http" | "https") || uri.host().is_none() {
            return Err(format!(
                "\"url\" must start with http:// or https:// and name a host, not {:?}: write e.g. https://audit.example.com/hook",
                redact(&url)
            ));
        }
        let host = uri.host().unwrap_or_default();
        let endpoint = match uri.port_u16() {
            Some(port) => format!("{scheme}://{host}:{port}"),
            None => format!("{scheme}://{host}"),
        };

        let batch = config.batch;
        let max_events = match (batch, config.max_events) {
            (false, Some(_)) => {
                return Err(
                    "\"max_events\" applies to batches only: remove it, or set \"batch\": true"
                        .into(),
                );
            }
            (false, None) => 1,
            (true, Some(0)) => return Err("\"max_events\" must be at least 1".into()),
            (true, Some(n)) => n,
            (true, None) => match config.format {
                Format::Json => MAX_EVENTS_JSON,
                Format::Slack => MAX_EVENTS_SLACK,
            },
        };

        let template = match (config.format, config.template) {
            (Format::Json, Some(_)) => {
                return Err(
                    "\"template\" applies to format slack only: remove it, or set \"format\": \"slack\""
                        .into(),
                );
            }
            (Format::Json, None) => None,
            (Format::Slack, template) => Some(
                Template::parse(template.as_deref().unwrap_or(DEFAULT_TEMPLATE))
                    .map_err(|e| format!("\"template\": {e}"))?,
            ),
        };

        let mut headers = Vec::new();
        let mut taken: Vec<String> = RESERVED_HEADERS.iter().map(|h| h.to_string()).collect();
        let signing = match config.signing_secret {
            Some(secret) => {
                let key = secret.resolve("signing_secret")?;
                if key.len() < 16 {
                    return Err(format!(
                        "\"signing_secret\" is {} bytes long: use at least 16 random bytes, e.g. the output of `openssl rand -hex 32`",
                        key.len()
                    ));
                }
                let name = header_name(
                    "signature_header",
                    config
                        .signature_header
                        .as_deref()
                        .unwrap_or(SIGNATURE_HEADER),
                    &taken,
                )?;
                taken.push(name.as_str().to_owned());
                Some((key.into_bytes(), name))
            }
            None if config.signature_header.is_some() => {
                return Err("\"signature_header\" needs \"signing_secret\": add the secret, or remove the header name".into());
            }
            None => None,
        };
        match config.token {
            Some(token) => {
                let name = header_name(
                    "token_header",
                    config.token_header.as_deref().unwrap_or(TOKEN_HEADER),
                    &taken,
                )?;
                taken.push(name.as_str().to_owned());
                let value = header_value("token", token.resolve("token")?)?;
                headers.push((name, value));
            }
            None if config.token_header.is_some() => {
                return Err(
                    "\"token_header\" needs \"token\": add the token, or remove the header name"
                        .into(),
                );
            }
            None => {}
        }
        for (name, value) in config.headers {
            let field = format!("headers.{name}");
            let name = header_name(&field, &name, &taken)?;
            taken.push(name.as_str().to_owned());
            let value = header_value(&field, value.resolve(&field)?)?;
            headers.push((name, value));
        }

        let roots = match config.ca_file {
            Some(_) if scheme != "https" => {
                return Err(
                    "\"ca_file\" is only used with https:// URLs: remove it, or use https".into(),
                );
            }
            Some(path) => Some(Arc::new(read_roots(&path)?)),
            None => None,
        };

        Ok(Self {
            url,
            endpoint,
            format: config.format,
            max_events,
            batch,
            timeout: config.timeout.unwrap_or(TIMEOUT),
            max_retry_after: config.max_retry_after.unwrap_or(MAX_RETRY_AFTER),
            headers,
            signing,
            roots,
            template,
        })
    }
}

/// The URL without its path, query and user info, for messages.
fn redact(url: &str) -> String {
    match url.find("://") {
        Some(i) => {
            let rest = &url[i + 3..];
            let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
            let host = authority.rsplit('@').next().unwrap_or_default();
            format!("{}://{host}/…", &url[..i])
        }
        None => "…".to_owned(),
    }
}

fn header_name(field: &str, name: &str, taken: &[String]) -> Result<HeaderName, String> {
    let parsed = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
        format!(
            "\"{field}\": {name:?} is not a valid HTTP header name: use letters, digits and dashes"
        )
    })?;
    if taken.iter().any(|t| t == parsed.as_str()) {
        return Err(format!(
            "\"{field}\": the header {name} is set by the plugin or by another option: choose another name"
        ));
    }
    Ok(parsed)
}

fn header_value(field: &str, value: String) -> Result<HeaderValue, String> {
    let mut value = HeaderValue::from_str(&value).map_err(|_| {
        format!("\"{field}\": the value is not a valid HTTP header value: remove control characters and line breaks")
    })?;
    value.set_sensitive(true);
    Ok(value)
}

fn read_roots(path: &std::path::Path) -> Result<Vec<ureq::tls::Certificate<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| {
        format!(
            "\"ca_file\": cannot read {}: {e}: give a readable PEM file of CA certificates",
            path.display()
        )
    })?;
    let mut roots = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(cert)) => roots.push(cert),
            Ok(_) => {}
            Err(e) => {
                return Err(format!(
                    "\"ca_file\": {} is not valid PEM ({e}): give a PEM file of CA certificates",
                    path.display()
                ));
            }
        }
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

    fn error(config: &str) -> String {
        match Settings::parse(config) {
            Ok(_) => panic!("{config} was accepted"),
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::CONFIG, "{e}");
                e.message.to_string()
            }
        }
    }

    #[track_caller]
    fn check_error(config: &str, expected: &str) {
        let message = error(config);
        assert!(message.contains(expected), "{config}: {message}");
    }

    #[test]
    fn configuration_errors_name_the_field_and_say_what_to_do() {
        check_error(r#"{}"#, "missing field `url`");
        check_error(
            r#"{"url": "https://h", "urll": 1}"#,
            "unknown field `urll`, expected one of",
        );
        check_error(
            r#"{"url": "ftp://h/x"}"#,
            "\"url\" must start with http:// or https://",
        );
        check_error(r#"{"url": "https://h h/x"}"#, "\"url\": not a valid URL");
        check_error(r#"{"url": "audit.example.com"}"#, "must start with http");
        check_error(
            r#"{"url": {"env": "TRAIL_TEST_SURELY_UNSET"}}"#,
            "environment variable TRAIL_TEST_SURELY_UNSET is not set",
        );
        check_error(
            r#"{"url": {"file": "/nonexistent/url"}}"#,
            "\"url\": cannot read /nonexistent/url",
        );
        check_error(
            r#"{"url": {"vault": "x"}}"#,
            "unknown field `vault`, expected `env` or `file`",
        );
        check_error(r#"{"url": {"env": "A", "file": "/b"}}"#, "not both");
        check_error(
            r#"{"url": "https://h", "format": "xml"}"#,
            "unknown variant `xml`",
        );
        check_error(
            r#"{"url": "https://h", "template": "{type}"}"#,
            "\"template\" applies to format slack only",
        );
        check_error(
            r#"{"url": "https://h", "format": "slack", "template": "{actor.nmae}"}"#,
            "\"template\": unknown field {actor.nmae}",
        );
        check_error(
            r#"{"url": "https://h", "batch": false, "max_events": 5}"#,
            "\"max_events\" applies to batches only",
        );
        check_error(r#"{"url": "https://h", "max_events": 0}"#, "at least 1");
        check_error(
            r#"{"url": "https://h", "timeout": "10 parsecs"}"#,
            "unknown unit",
        );
        check_error(
            r#"{"url": "https://h", "timeout": "0s"}"#,
            "must be a positive duration",
        );
        check_error(
            r#"{"url": "https://h", "signing_secret": "short"}"#,
            "use at least 16 random bytes",
        );
        check_error(
            r#"{"url": "https://h", "signature_header": "X-Sig"}"#,
            "needs \"signing_secret\"",
        );
        check_error(
            r#"{"url": "https://h", "token_header": "X-Tok"}"#,
            "needs \"token\"",
        );
        check_error(
            r#"{"url": "https://h", "headers": {"Content-Type": "text/plain"}}"#,
            "set by the plugin",
        );
        check_error(
            r#"{"url": "https://h", "headers": {"bad header": "x"}}"#,
            "not a valid HTTP header name",
        );
        check_error(
            r#"{"url": "https://h", "headers": {"X-A": "a\nb"}}"#,
            "not a valid HTTP header value",
        );
        check_error(
            r#"{"url": "https://h", "token": "t", "headers": {"trail-token": "x"}}"#,
            "headers.trail-token",
        );
        check_error(
            r#"{"url": "http://h", "ca_file": "/x.pem"}"#,
            "only used with https://",
        );
        check_error(
            r#"{"url": "https://h", "ca_file": "/nonexistent.pem"}"#,
            "\"ca_file\": cannot read /nonexistent.pem",
        );
    }

    #[test]
    fn defaults() {
        let s = Settings::parse(r#"{"url": "https://audit.example.com:8443/hooks/T0/B1/xyz?k=v"}"#)
            .unwrap();
        assert_eq!(s.endpoint, "https://audit.example.com:8443");
        assert_eq!(s.format, Format::Json);
        assert!(s.batch);
        assert_eq!(s.max_events, 500);
        assert_eq!(s.timeout, Duration::from_secs(10));
        assert_eq!(s.max_retry_after, Duration::from_secs(30));
        assert!(s.headers.is_empty() && s.signing.is_none() && s.roots.is_none());

        let s = Settings::parse(r#"{"url": "http://h/x", "format": "slack"}"#).unwrap();
        assert_eq!(s.endpoint, "http://h");
        assert_eq!(s.max_events, 20);
        assert!(s.template.is_some());

        let s = Settings::parse(
            r#"{"url": "http://h", "batch": false, "timeout": "1500ms", "max_retry_after": 5}"#,
        )
        .unwrap();
        assert_eq!(s.max_events, 1);
        assert_eq!(s.timeout, Duration::from_millis(1500));
        assert_eq!(s.max_retry_after, Duration::from_secs(5));
    }

    #[test]
    fn secrets_come_from_the_config_a_file_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "0123456789abcdef0123\n").unwrap();
        // SAFETY: no other test of this crate reads or writes this variable.
        unsafe { std::env::set_var("TRAIL_WEBHOOK_TEST_TOKEN", "tok-from-env") };
        let config = format!(
            r#"{{"url": "https://h", "signing_secret": {{"file": "{}"}}, "token": {{"env": "TRAIL_WEBHOOK_TEST_TOKEN"}}, "token_header": "X-Gitlab-Event-Streaming-Token", "headers": {{"Authorization": "Bearer abc"}}}}"#,
            file.display()
        );
        let s = Settings::parse(&config).unwrap();
        let (key, name) = s.signing.unwrap();
        assert_eq!(key, b"0123456789abcdef0123");
        assert_eq!(name.as_str(), "trail-signature");
        let headers: Vec<(String, String)> = s
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        assert_eq!(
            headers,
            [
                (
                    "x-gitlab-event-streaming-token".to_owned(),
                    "tok-from-env".to_owned()
                ),
                ("authorization".to_owned(), "Bearer abc".to_owned())
            ]
        );
        assert!(s.headers.iter().all(|(_, v)| v.is_sensitive()));
    }

    #[test]
    fn messages_never_show_the_path_of_a_url() {
        assert_eq!(
            redact("https://hooks.example/services/T/B/secret"),
            "https://hooks.example/…"
        );
        assert_eq!(redact("ftp://user:pw@h:21/x?y"), "ftp://h:21/…");
        assert_eq!(redact("nonsense"), "…");
    }
}
