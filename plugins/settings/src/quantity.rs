//! The one grammar of durations and sizes, read by the daemon's configuration and by the first-party plugins'
//! settings alike (README.md, "Durations and sizes").
//!
//! A quantity is a number, then optionally spaces and a unit. Durations: `ms`, `s`, `m`, `h`, `d`; a number
//! alone is seconds; the number may have a decimal fraction (`1.5s`, `0.5`). Sizes: `B`, `KiB`, `MiB`, `GiB`
//! (powers of 1024), `KB`, `MB`, `GB` (powers of 1000); a number alone is bytes; whole numbers only. Where a
//! value is read from YAML or JSON, a plain number works too: seconds (a fraction allowed) or bytes.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};

/// What is read: a duration (base unit: nanoseconds) or a size (base unit: bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Duration,
    Size,
}

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Each unit and how many base units it is.
const DURATION_UNITS: &[(&str, u128)] = &[
    ("ms", 1_000_000),
    ("", NANOS_PER_SEC),
    ("s", NANOS_PER_SEC),
    ("m", 60 * NANOS_PER_SEC),
    ("h", 3_600 * NANOS_PER_SEC),
    ("d", 86_400 * NANOS_PER_SEC),
];

const SIZE_UNITS: &[(&str, u128)] = &[
    ("", 1),
    ("B", 1),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
];

/// Digits of a fraction that count; further ones are below a nanosecond of any unit.
const FRACTION_DIGITS: usize = 18;

impl Kind {
    fn units(self) -> &'static [(&'static str, u128)] {
        match self {
            Kind::Duration => DURATION_UNITS,
            Kind::Size => SIZE_UNITS,
        }
    }

    /// What a value should look like, for error messages.
    fn expected(self) -> &'static str {
        match self {
            Kind::Duration => "a duration: use seconds or a unit such as 500ms, 10s, 5m, 2h, 7d",
            Kind::Size => "a size: use bytes or a unit such as 64KiB, 16MiB, 1GiB",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::Duration => "duration",
            Kind::Size => "size",
        }
    }

    /// The largest value in base units.
    fn max(self) -> u128 {
        match self {
            Kind::Duration => u128::from(u64::MAX) * NANOS_PER_SEC + (NANOS_PER_SEC - 1),
            Kind::Size => u128::from(u64::MAX),
        }
    }

    /// Parses `<number>[ ]<unit>` into base units.
    fn parse(self, text: &str) -> Result<u128, String> {
        let not = |why: &str| format!("{text:?} is not {}{why}", self.expected());
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if (whole.is_empty() && fraction.is_empty()) || !digits(fraction) {
            return Err(not(""));
        }
        if !fraction.is_empty() && self == Kind::Size {
            return Err(not(" (whole numbers only)"));
        }
        let unit = unit.trim();
        let factor = self
            .units()
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, f)| *f)
            .ok_or_else(|| not(&format!(" (unknown unit {unit:?})")))?;
        let too_large = || format!("{text:?} is too large");
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| too_large())?
        };
        let fraction = &fraction[..fraction.len().min(FRACTION_DIGITS)];
        let part = match fraction {
            "" => 0,
            f => {
                let n: u128 = f.parse().expect("at most 18 digits");
                n * factor / 10u128.pow(f.len() as u32)
            }
        };
        whole
            .checked_mul(factor)
            .and_then(|v| v.checked_add(part))
            .filter(|v| *v <= self.max())
            .ok_or_else(too_large)
    }

    /// A value of the wrong kind (a boolean, a list, a mapping), described as `what`.
    fn wrong<E: de::Error>(self, what: impl fmt::Display) -> E {
        E::custom(format!(
            "{what} is not {} (expected a {} written as a number or a text)",
            self.expected(),
            self.noun()
        ))
    }
}

fn duration_of(nanos: u128) -> Duration {
    Duration::new(
        (nanos / NANOS_PER_SEC) as u64,
        (nanos % NANOS_PER_SEC) as u32,
    )
}

/// Parses a duration such as `500ms`, `1.5s`, `10s`, `5m`, `2h`, `7d`; a number alone means seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    Kind::Duration.parse(text).map(duration_of)
}

/// Parses a size such as `512`, `64KiB`, `16MiB`, `1GiB` (also `KB`, `MB`, `GB`, as powers of 1000).
pub fn parse_size(text: &str) -> Result<u64, String> {
    Kind::Size.parse(text).map(|b| b as u64)
}

/// Reads a duration from a number of seconds or a text that [`parse_duration`] reads; anything else is refused
/// saying what was written.
pub fn deserialize_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(Kind::Duration).map(duration_of)
}

/// Reads a size from a number of bytes or a text that [`parse_size`] reads; anything else is refused saying what
/// was written.
pub fn deserialize_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(Kind::Size).map(|b| b as u64)
}

/// Reads a quantity in base units from a number or a text.
impl<'de> Visitor<'de> for Kind {
    type Value = u128;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expected())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u128, E> {
        Ok(match self {
            Kind::Size => u128::from(v),
            Kind::Duration => u128::from(v) * NANOS_PER_SEC,
        })
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u128, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::custom(format!("{v} is not {}", self.expected()))),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u128, E> {
        match self {
            Kind::Duration if v >= 0.0 => Duration::try_from_secs_f64(v)
                .map(|d| d.as_nanos())
                .map_err(|_| E::custom(format!("{v} is too large"))),
            _ => Err(E::custom(format!("{v} is not {}", self.expected()))),
        }
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<u128, E> {
        Err(self.wrong(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u128, E> {
        self.parse(v).map_err(E::custom)
    }

    fn visit_unit<E: de::Error>(self) -> Result<u128, E> {
        Err(E::custom(format!(
            "an empty value is not {}; or leave the key out",
            self.expected()
        )))
    }

    fn visit_none<E: de::Error>(self) -> Result<u128, E> {
        self.visit_unit()
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<u128, A::Error> {
        Err(self.wrong("a list"))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<u128, A::Error> {
        Err(self.wrong("a mapping"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let check = |text: &str, nanos: Option<u128>| {
            assert_eq!(
                parse_duration(text).ok().map(|d| d.as_nanos()),
                nanos,
                "{text}"
            );
        };
        let ms = |n: u128| Some(n * 1_000_000);
        check("500ms", ms(500));
        check("10s", ms(10_000));
        check("10", ms(10_000));
        check("1.5s", ms(1_500));
        check("1.5", ms(1_500));
        check(".5s", ms(500));
        check("0.25ms", Some(250_000));
        check("2m", ms(120_000));
        check("5m", ms(300_000));
        check("1h", ms(3_600_000));
        check("2h", ms(7_200_000));
        check("7d", ms(604_800_000));
        check("1.5d", ms(129_600_000));
        check(" 3 s ", ms(3_000));
        check("0s", Some(0));
        check("", None);
        check(".", None);
        check("s", None);
        check("1.2.3s", None);
        check("1y", None);
        check("-1s", None);
        check("1 fortnight", None);
        check("99999999999999999999999d", None);
    }

    #[test]
    fn sizes() {
        let check = |text: &str, bytes: Option<u64>| {
            assert_eq!(parse_size(text).ok(), bytes, "{text}");
        };
        check("4096", Some(4096));
        check("10B", Some(10));
        check("64KiB", Some(65536));
        check("16MiB", Some(16 << 20));
        check("1GiB", Some(1 << 30));
        check("2 MB", Some(2_000_000));
        check("3KB", Some(3_000));
        check("1.5KiB", None);
        check("1TiB", None);
        check("MiB", None);
        check("99999999999GiB", None);
    }

    #[test]
    fn messages_say_what_was_written_and_what_is_expected() {
        let check = |result: Result<u128, String>, expected: &str| {
            assert_eq!(result.unwrap_err(), expected);
        };
        check(
            Kind::Duration.parse("3 parsecs"),
            "\"3 parsecs\" is not a duration: use seconds or a unit such as 500ms, 10s, 5m, 2h, 7d \
             (unknown unit \"parsecs\")",
        );
        check(
            Kind::Size.parse("1.5MiB"),
            "\"1.5MiB\" is not a size: use bytes or a unit such as 64KiB, 16MiB, 1GiB (whole numbers only)",
        );
        check(
            Kind::Size.parse("99999999999GiB"),
            "\"99999999999GiB\" is too large",
        );
        let json = |kind: Kind, text: &str| {
            let mut d = serde_json::Deserializer::from_str(text);
            d.deserialize_any(kind).map_err(|e| e.to_string())
        };
        assert_eq!(json(Kind::Duration, "2.5"), Ok(2_500_000_000));
        assert_eq!(json(Kind::Size, "7"), Ok(7));
        let err = json(Kind::Size, "2.5").unwrap_err();
        assert!(err.starts_with("2.5 is not a size: use bytes"), "{err}");
        let err = json(Kind::Duration, "-2").unwrap_err();
        assert!(
            err.starts_with("-2 is not a duration: use seconds"),
            "{err}"
        );
        let err = json(Kind::Duration, "[1]").unwrap_err();
        assert!(
            err.starts_with(
                "a list is not a duration: use seconds or a unit such as 500ms, 10s, 5m, 2h, 7d \
                 (expected a duration written as a number or a text)"
            ),
            "{err}"
        );
        let err = json(Kind::Size, "null").unwrap_err();
        assert!(err.starts_with("an empty value is not a size"), "{err}");
    }
}
