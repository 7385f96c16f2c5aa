//! The sink's `config` section: parsing, defaults and checks, done once in the constructor.
//! Owns the names users write (facilities, severities, transports, formats) and the RFC 5424
//! limits on header fields, so that the formatting code never meets an invalid setting. It
//! does no network I/O.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Deserializer, de};
use trail_plugin_api::SinkError;
use trail_plugin_settings::de_positive_duration;

/// The sink's `config` section, as written in trail.yaml. See README.md.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    transport: Transport,
    #[serde(default)]
    path: Option<PathBuf>,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    facility: Option<Facility>,
    #[serde(default)]
    severity: Option<Severity>,
    #[serde(default)]
    format: Format,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    app_name: Option<String>,
    #[serde(default)]
    sd_id: Option<String>,
    #[serde(default, deserialize_with = "de_positive_duration")]
    timeout: Option<Duration>,
}

/// How messages reach the collector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// A local Unix datagram socket, one message per datagram (`/dev/log`).
    #[default]
    Unix,
    /// TCP with RFC 6587 octet-counting framing (`<length> <message>`).
    Tcp,
    /// UDP, one message per datagram (RFC 5426).
    Udp,
}

/// What goes into the structured data and the message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// No structured data; the message is the stored JSON record.
    #[default]
    Json,
    /// The event's fields as structured data; the message is the event's `message`, if any.
    Structured,
    /// The fields as structured data, and the JSON record as the message.
    Both,
}

/// A syslog facility, by name or code (0–23).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Facility(pub u8);

/// Facility names, with their codes (RFC 5424, table 1, with the usual `syslog.h` names).
const FACILITIES: [(&str, u8); 24] = [
    ("kern", 0),
    ("user", 1),
    ("mail", 2),
    ("daemon", 3),
    ("auth", 4),
    ("syslog", 5),
    ("lpr", 6),
    ("news", 7),
    ("uucp", 8),
    ("cron", 9),
    ("authpriv", 10),
    ("ftp", 11),
    ("ntp", 12),
    ("audit", 13),
    ("alert", 14),
    ("clock", 15),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
    ("local7", 23),
];

/// A syslog severity, by name or code (0–7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Severity(pub u8);

/// Severity names, with their codes (RFC 5424, table 2).
const SEVERITIES: [(&str, u8); 8] = [
    ("emerg", 0),
    ("alert", 1),
    ("crit", 2),
    ("err", 3),
    ("warning", 4),
    ("notice", 5),
    ("info", 6),
    ("debug", 7),
];

impl<'de> Deserialize<'de> for Facility {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        by_name(d, &FACILITIES, 23, "facility").map(Facility)
    }
}

impl<'de> Deserialize<'de> for Severity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        by_name(d, &SEVERITIES, 7, "severity").map(Severity)
    }
}

fn by_name<'de, D: Deserializer<'de>>(
    d: D,
    names: &[(&str, u8)],
    max: u8,
    what: &str,
) -> Result<u8, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Code(u64),
        Name(String),
    }
    let known = || {
        names
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match Raw::deserialize(d)
        .map_err(|_| de::Error::custom(format!("expected a {what} name or number")))?
    {
        Raw::Code(code) if code <= max as u64 => Ok(code as u8),
        Raw::Code(code) => Err(de::Error::custom(format!(
            "{what} {code} is out of range: use 0 to {max}, or one of {}",
            known()
        ))),
        Raw::Name(name) => names
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, code)| *code)
            .ok_or_else(|| {
                de::Error::custom(format!("unknown {what} {name:?}: use one of {}", known()))
            }),
    }
}

/// Where the events go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// A Unix datagram socket at this path.
    Unix(PathBuf),
    /// `host:port` over TCP.
    Tcp(String),
    /// `host:port` over UDP.
    Udp(String),
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp(address) => write!(f, "tcp:{address}"),
            Self::Udp(address) => write!(f, "udp:{address}"),
        }
    }
}

/// The default `path`.
pub const DEV_LOG: &str = "/dev/log";
/// The default `facility`.
pub const FACILITY: Facility = Facility(10);
/// The default `app_name`.
pub const APP_NAME: &str = "trail";
/// The default `sd_id`: the private enterprise number 32473 is the one RFC 5612 reserves for
/// documentation; organisations with their own number should use it.
pub const SD_ID: &str = "trail@32473";
/// The default `timeout`.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the sink needs, checked.
#[derive(Debug)]
pub struct Settings {
    /// Where to send.
    pub destination: Destination,
    /// The facility of every message.
    pub facility: Facility,
    /// A fixed severity, or `None` to derive it from each event's `severity`.
    pub severity: Option<Severity>,
    /// Structured data and message.
    pub format: Format,
    /// HOSTNAME.
    pub hostname: String,
    /// APP-NAME.
    pub app_name: String,
    /// SD-ID of the structured-data element.
    pub sd_id: String,
    /// Connect and send timeout.
    pub timeout: Duration,
}

impl Settings {
    /// Parses and checks `config_json`; every error is a `CONFIG` error that names the field.
    pub fn parse(config_json: &str) -> Result<Self, SinkError> {
        trail_plugin_settings::parse_config(config_json, "syslog", Self::check)
    }

    fn check(config: Config) -> Result<Self, String> {
        let destination = match (config.transport, config.path, config.address) {
            (Transport::Unix, path, None) => {
                Destination::Unix(path.unwrap_or_else(|| PathBuf::from(DEV_LOG)))
            }
            (Transport::Unix, _, Some(_)) => {
                return Err(
                    "\"address\" is for transport tcp or udp: remove it, or set \"transport\""
                        .into(),
                );
            }
            (_, Some(_), _) => {
                return Err(
                    "\"path\" is for transport unix: remove it, and give \"address\"".into(),
                );
            }
            (transport, None, None) => {
                return Err(format!(
                    "transport {} needs \"address\": give the collector as host:port, e.g. \"logs.example.com:{}\"",
                    if transport == Transport::Tcp {
                        "tcp"
                    } else {
                        "udp"
                    },
                    if transport == Transport::Tcp {
                        601
                    } else {
                        514
                    },
                ));
            }
            (transport, None, Some(address)) => {
                check_address(&address)?;
                if transport == Transport::Tcp {
                    Destination::Tcp(address)
                } else {
                    Destination::Udp(address)
                }
            }
        };
        let hostname = match config.hostname {
            Some(name) => {
                check_header_field("hostname", &name, 255)?;
                name
            }
            None => kernel_hostname(),
        };
        let app_name = config.app_name.unwrap_or_else(|| APP_NAME.to_owned());
        check_header_field("app_name", &app_name, 48)?;
        let sd_id = config.sd_id.unwrap_or_else(|| SD_ID.to_owned());
        check_sd_id(&sd_id)?;
        Ok(Self {
            destination,
            facility: config.facility.unwrap_or(FACILITY),
            severity: config.severity,
            format: config.format,
            hostname,
            app_name,
            sd_id,
            timeout: config.timeout.unwrap_or(TIMEOUT),
        })
    }
}

fn check_address(address: &str) -> Result<(), String> {
    let port = address
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty())
        .and_then(|(_, port)| port.parse::<u16>().ok());
    match port {
        Some(port) if port > 0 => Ok(()),
        _ => Err(format!(
            "\"address\": {address:?} is not host:port: write e.g. \"logs.example.com:514\" or \"[2001:db8::1]:514\""
        )),
    }
}

/// RFC 5424 header fields: 1 to `max` printable US-ASCII characters, no spaces.
fn check_header_field(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.is_empty()
        || value.len() > max
        || !value.bytes().all(|b| b.is_ascii_graphic())
        || value == "-"
    {
        return Err(format!(
            "\"{field}\": {value:?} is not a valid syslog header field: use 1 to {max} printable ASCII characters without spaces"
        ));
    }
    Ok(())
}

/// An SD-ID of one's own: `name@<private enterprise number>`, at most 32 characters, printable
/// US-ASCII except `=`, space, `]` and `"` (RFC 5424, 6.3.2 and 7.2.2).
fn check_sd_id(value: &str) -> Result<(), String> {
    let valid_chars = value
        .bytes()
        .all(|b| b.is_ascii_graphic() && !matches!(b, b'=' | b']' | b'"'));
    let pen = value
        .split_once('@')
        .filter(|(name, number)| {
            !name.is_empty()
                && !number.is_empty()
                && number.split('.').all(|n| n.parse::<u32>().is_ok())
        })
        .is_some();
    if value.len() > 32 || !valid_chars || !pen {
        return Err(format!(
            "\"sd_id\": {value:?} is not a valid SD-ID of one's own: write name@<private enterprise number>, e.g. \"trail@32473\", at most 32 characters"
        ));
    }
    Ok(())
}

/// The kernel's host name, or `-` (NILVALUE) when it is not a valid HOSTNAME.
fn kernel_hostname() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let result = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if result != 0 {
        return "-".to_owned();
    }
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    match std::str::from_utf8(&buffer[..end]) {
        Ok(name) if check_header_field("hostname", name, 255).is_ok() => name.to_owned(),
        _ => "-".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use trail_plugin_api::ErrorKind;

    use super::*;

    #[track_caller]
    fn check_error(config: &str, expected: &str) {
        match Settings::parse(config) {
            Ok(s) => panic!("{config} was accepted: {s:?}"),
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::CONFIG, "{e}");
                assert!(e.message.contains(expected), "{config}: {e}");
            }
        }
    }

    #[test]
    fn configuration_errors_name_the_field_and_say_what_to_do() {
        check_error(
            r#"{"transprt": "tcp"}"#,
            "unknown field `transprt`, expected one of",
        );
        check_error(r#"{"transport": "tls"}"#, "unknown variant `tls`");
        check_error(r#"{"transport": "tcp"}"#, "transport tcp needs \"address\"");
        check_error(
            r#"{"transport": "udp", "path": "/dev/log", "address": "h:514"}"#,
            "\"path\" is for transport unix",
        );
        check_error(
            r#"{"address": "h:514"}"#,
            "\"address\" is for transport tcp or udp",
        );
        check_error(
            r#"{"transport": "udp", "address": "h"}"#,
            "\"address\": \"h\" is not host:port",
        );
        check_error(
            r#"{"transport": "udp", "address": "h:0"}"#,
            "is not host:port",
        );
        check_error(
            r#"{"transport": "udp", "address": ":514"}"#,
            "is not host:port",
        );
        check_error(
            r#"{"facility": "local9"}"#,
            "unknown facility \"local9\": use one of kern, user",
        );
        check_error(
            r#"{"facility": 24}"#,
            "facility 24 is out of range: use 0 to 23",
        );
        check_error(
            r#"{"severity": "warn"}"#,
            "unknown severity \"warn\": use one of emerg",
        );
        check_error(r#"{"severity": 8}"#, "severity 8 is out of range");
        check_error(r#"{"format": "cef"}"#, "unknown variant `cef`");
        check_error(
            r#"{"hostname": "my host"}"#,
            "\"hostname\": \"my host\" is not a valid syslog header field",
        );
        check_error(
            r#"{"app_name": "a-very-long-application-name-that-goes-on-and-on-x"}"#,
            "\"app_name\"",
        );
        check_error(
            r#"{"sd_id": "trail"}"#,
            "\"sd_id\": \"trail\" is not a valid SD-ID",
        );
        check_error(r#"{"sd_id": "trail@x"}"#, "not a valid SD-ID");
        check_error(r#"{"sd_id": "tr ail@32473"}"#, "not a valid SD-ID");
        check_error(r#"{"timeout": "0s"}"#, "must be a positive duration");
        check_error(r#"{"timeout": "1 fortnight"}"#, "unknown unit");
    }

    #[test]
    fn defaults_and_names() {
        let s = Settings::parse("{}").unwrap();
        assert_eq!(s.destination, Destination::Unix(PathBuf::from("/dev/log")));
        assert_eq!(s.facility, Facility(10));
        assert_eq!(s.severity, None);
        assert_eq!(s.format, Format::Json);
        assert_eq!(s.app_name, "trail");
        assert_eq!(s.sd_id, "trail@32473");
        assert_eq!(s.timeout, Duration::from_secs(10));
        assert!(!s.hostname.is_empty() && !s.hostname.contains(' '));

        let s = Settings::parse(
            r#"{"transport": "tcp", "address": "[::1]:601", "facility": "local3", "severity": "warning",
                "format": "both", "hostname": "audit-1", "app_name": "trail-eu", "sd_id": "audit@1.2.3", "timeout": "1500ms"}"#,
        )
        .unwrap();
        assert_eq!(s.destination, Destination::Tcp("[::1]:601".to_owned()));
        assert_eq!((s.facility, s.severity), (Facility(19), Some(Severity(4))));
        assert_eq!(s.format, Format::Both);
        assert_eq!(
            (s.hostname.as_str(), s.app_name.as_str()),
            ("audit-1", "trail-eu")
        );
        assert_eq!(s.sd_id, "audit@1.2.3");
        assert_eq!(s.timeout, Duration::from_millis(1500));

        let s = Settings::parse(
            r#"{"transport": "udp", "address": "h:514", "facility": 13, "severity": 0}"#,
        )
        .unwrap();
        assert_eq!(s.destination.to_string(), "udp:h:514");
        assert_eq!((s.facility, s.severity), (Facility(13), Some(Severity(0))));
    }
}
