//! Secrets in a plugin's configuration: a value written inline, or read from the daemon's environment or a file
//! when the plugin is constructed, so that passwords and tokens need not be written in trail.yaml.

use std::{fmt, path::PathBuf};

use serde::{
    Deserialize, Deserializer,
    de::{self, MapAccess, Visitor},
};

/// A secret written in the configuration (`"…"`), or taken from an environment variable
/// (`{env: NAME}`) or a file (`{file: /path}`, trailing line breaks removed).
#[derive(Debug, PartialEq, Eq)]
pub enum Secret {
    /// Written in the configuration itself.
    Inline(String),
    /// The value of this environment variable of the daemon.
    Env(String),
    /// The content of this file.
    File(PathBuf),
}

impl Secret {
    /// The secret's value; `field` names it in errors.
    pub fn resolve(self, field: &str) -> Result<String, String> {
        let value = match self {
            Self::Inline(value) => value,
            Self::Env(name) => std::env::var(&name).map_err(|e| {
                format!("\"{field}\": environment variable {name} {}: set it in traild's environment, or write the value in the configuration",
                    match e {
                        std::env::VarError::NotPresent => "is not set",
                        std::env::VarError::NotUnicode(_) => "is not valid UTF-8",
                    })
            })?,
            Self::File(path) => {
                let mut text = std::fs::read_to_string(&path).map_err(|e| {
                    format!(
                        "\"{field}\": cannot read {}: {e}: give a file that traild may read",
                        path.display()
                    )
                })?;
                let kept = text.trim_end_matches(['\r', '\n']).len();
                text.truncate(kept);
                text
            }
        };
        if value.is_empty() {
            return Err(format!("\"{field}\" is empty: give it a value"));
        }
        Ok(value)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecretVisitor;

        impl<'de> Visitor<'de> for SecretVisitor {
            type Value = Secret;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, {\"env\": \"VARIABLE\"} or {\"file\": \"/path\"}")
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<Secret, E> {
                Ok(Secret::Inline(value.to_owned()))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Secret, A::Error> {
                let Some(key) = map.next_key::<String>()? else {
                    return Err(de::Error::custom(
                        "empty map: expected {\"env\": \"VARIABLE\"} or {\"file\": \"/path\"}",
                    ));
                };
                let secret = match key.as_str() {
                    "env" => Secret::Env(map.next_value()?),
                    "file" => Secret::File(map.next_value()?),
                    other => return Err(de::Error::unknown_field(other, &["env", "file"])),
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(de::Error::custom(format!(
                        "unexpected {extra:?}: give either \"env\" or \"file\", not both"
                    )));
                }
                Ok(secret)
            }
        }

        deserializer.deserialize_any(SecretVisitor)
    }
}
