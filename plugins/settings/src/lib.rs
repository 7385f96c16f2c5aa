//! Configuration parsing shared by trail's first-party sink plugins (`webhook`, `syslog`, `postgres`): reading a
//! sink's `config` with errors the daemon reports as configuration errors, durations such as `500ms`, `1.5s`,
//! `5m`, `2h`, `7d` or a number of seconds, and secrets kept in the environment or in files ([`Secret`]). Not
//! part of the plugin API: third-party plugins depend on `trail-plugin-api` alone.
//!
//! [`quantity`] is the grammar of durations and sizes; the daemon's configuration reads its own durations and
//! sizes with it too, so that one value means the same in both places.

#![deny(missing_docs)]

pub mod quantity;
mod secret;

pub use quantity::parse_duration;
pub use secret::Secret;

use std::time::Duration;

use serde::de::{self, DeserializeOwned, Deserializer};
use trail_plugin_api::SinkError;

/// Reads `config_json` (the sink's `config` section) as `C` and checks it into the plugin's settings; every
/// problem becomes a `CONFIG` error starting `config: ` (a field the plugin does not know names `plugin`'s README).
pub fn parse_config<C: DeserializeOwned, S>(
    config_json: &str,
    plugin: &str,
    check: impl FnOnce(C) -> Result<S, String>,
) -> Result<S, SinkError> {
    let config: C = serde_json::from_str(config_json).map_err(|e| {
        config_error(format!(
            "{e}: see the {plugin} plugin's README for the fields it accepts"
        ))
    })?;
    check(config).map_err(config_error)
}

fn config_error(message: String) -> SinkError {
    SinkError::config(format!("config: {message}"))
}

/// Like [`de_duration`], refusing zero: for timeouts and the like.
pub fn de_positive_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    match de_duration(d)? {
        Some(zero) if zero.is_zero() => Err(de::Error::custom(
            "must be a positive duration, e.g. \"10s\"",
        )),
        other => Ok(other),
    }
}

/// For `#[serde(default, deserialize_with = "de_duration")]` on an `Option<Duration>`: a number of seconds or a
/// text that [`parse_duration`] reads (the grammar of [`quantity`]).
pub fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    quantity::deserialize_duration(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_strings_deserialize() {
        #[derive(serde::Deserialize)]
        struct C {
            #[serde(default, deserialize_with = "de_duration")]
            t: Option<Duration>,
        }
        #[derive(serde::Deserialize)]
        struct P {
            #[serde(deserialize_with = "de_positive_duration")]
            t: Option<Duration>,
        }
        let positive = |json: &str| {
            serde_json::from_str::<P>(json)
                .map(|p| p.t)
                .map_err(|e| e.to_string())
        };
        assert_eq!(positive(r#"{"t": "1s"}"#), Ok(Some(Duration::from_secs(1))));
        assert!(
            positive(r#"{"t": 0}"#)
                .unwrap_err()
                .contains("must be a positive duration")
        );
        assert!(
            positive(r#"{"t": "0ms"}"#)
                .unwrap_err()
                .contains("must be a positive duration")
        );
        let t = |json: &str| {
            serde_json::from_str::<C>(json)
                .map(|c| c.t)
                .map_err(|e| e.to_string())
        };
        assert_eq!(t(r#"{"t": 3}"#), Ok(Some(Duration::from_secs(3))));
        assert_eq!(t(r#"{"t": "250ms"}"#), Ok(Some(Duration::from_millis(250))));
        assert_eq!(t(r#"{}"#), Ok(None));
        assert!(
            t(r#"{"t": "3 parsecs"}"#)
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(
            t(r#"{"t": true}"#)
                .unwrap_err()
                .contains("expected a duration")
        );
    }
}
