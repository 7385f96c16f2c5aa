//! Request signatures: `Trail-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>`.
//!
//! The MAC covers the decimal timestamp, a full stop, and the exact body bytes
//! (`"<t>.<body>"`), so a receiver that checks both the MAC and the age of `t` rejects forged,
//! altered and replayed requests. README.md has the receiver's recipe; a test keeps its worked
//! example true.

use ring::hmac;

/// Signs request bodies with one key.
pub struct Signer {
    key: hmac::Key,
}

impl Signer {
    /// A signer with the shared secret `secret`.
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// The header value for `body` sent at `timestamp` (Unix seconds).
    pub fn header_value(&self, timestamp: u64, body: &[u8]) -> String {
        let mut context = hmac::Context::with_key(&self.key);
        context.update(timestamp.to_string().as_bytes());
        context.update(b".");
        context.update(body);
        let tag = context.sign();
        let mut value = format!("t={timestamp},v1=");
        for byte in tag.as_ref() {
            value.push(HEX[(byte >> 4) as usize] as char);
            value.push(HEX[(byte & 0xf) as usize] as char);
        }
        value
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of README.md ("Verifying requests").
    const SECRET: &str = "whsec_5f2b8c1e9d4a7f3b6e0c2d8a1f4b7e9c";
    const TIMESTAMP: u64 = 1_795_451_241;
    const BODY: &str =
        r#"[{"seq":1,"id":"019ab2c4-5d6e-7f80-9a1b-000000000001","type":"user_login"}]"#;

    #[test]
    fn the_readme_example_is_right() {
        let value = Signer::new(SECRET.as_bytes()).header_value(TIMESTAMP, BODY.as_bytes());
        let readme = include_str!("../README.md");
        for part in [SECRET, &TIMESTAMP.to_string(), BODY, &value] {
            assert!(readme.contains(part), "README.md lacks {part}");
        }
    }

    #[test]
    fn the_mac_covers_timestamp_dot_body() {
        let signer = Signer::new(b"Jefe");
        let value = signer.header_value(1, b"x");
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, b"Jefe"), b"1.x");
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(value, format!("t=1,v1={hex}"));
        assert_eq!(value.len(), "t=1,v1=".len() + 64);
    }
}
