//! Building request objects.

use serde_json::{Map, Value};

/// How the action an event records ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `success`
    Success,
    /// `failure`
    Failure,
    /// `denied`
    Denied,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Denied => "denied",
        }
    }
}

/// One request: an event to submit. Built field by field, or from any JSON object with [`Event::from_json`].
///
/// ```
/// use trail_client::{Event, Outcome};
/// let event = Event::new("project_deleted")
///     .actor("u-42")
///     .actor_field("name", "alice")
///     .target("project", "p-9")
///     .message("deleted project p-9")
///     .outcome(Outcome::Success);
/// assert_eq!(
///     event.to_json().to_string(),
///     r#"{"type":"project_deleted","actor":{"id":"u-42","name":"alice"},"target":{"type":"project","id":"p-9"},"message":"deleted project p-9","outcome":"success"}"#
/// );
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    fields: Map<String, Value>,
}

impl Event {
    /// An event of type `event_type` with no other field.
    pub fn new(event_type: impl Into<String>) -> Event {
        let mut fields = Map::new();
        fields.insert("type".into(), Value::String(event_type.into()));
        Event { fields }
    }

    /// A request object as it is (the daemon checks it; nothing is checked here).
    pub fn from_json(object: Map<String, Value>) -> Event {
        Event { fields: object }
    }

    /// The request object.
    pub fn to_json(&self) -> Value {
        Value::Object(self.fields.clone())
    }

    /// Sets `actor.id`.
    pub fn actor(self, id: impl Into<String>) -> Event {
        self.nested("actor", "id", Value::String(id.into()))
    }

    /// Sets another field of `actor` (`name`, `type`, `ip`, ...).
    pub fn actor_field(self, key: &str, value: impl Into<Value>) -> Event {
        self.nested("actor", key, value.into())
    }

    /// Sets `target.type` and `target.id`.
    pub fn target(self, target_type: impl Into<String>, id: impl Into<String>) -> Event {
        self.nested("target", "type", Value::String(target_type.into()))
            .nested("target", "id", Value::String(id.into()))
    }

    /// Sets another field of `target` (`name`, ...).
    pub fn target_field(self, key: &str, value: impl Into<Value>) -> Event {
        self.nested("target", key, value.into())
    }

    /// Sets `message`.
    pub fn message(self, message: impl Into<String>) -> Event {
        self.field("message", Value::String(message.into()))
    }

    /// Sets `outcome`.
    pub fn outcome(self, outcome: Outcome) -> Event {
        self.field("outcome", Value::String(outcome.as_str().into()))
    }

    /// Sets `payload` (a JSON object, checked by the daemon against the type's payload schema).
    pub fn payload(self, payload: Value) -> Event {
        self.field("payload", payload)
    }

    /// Sets `occurred_at` (RFC 3339; the daemon uses its receive time when it is absent).
    pub fn occurred_at(self, time: impl Into<String>) -> Event {
        self.field("occurred_at", Value::String(time.into()))
    }

    /// Sets `idempotency_key` (at most 128 bytes): a repeat with the same key from the same user is answered with
    /// the first request's `id` and `seq` and not stored again.
    pub fn idempotency_key(self, key: impl Into<String>) -> Event {
        self.field("idempotency_key", Value::String(key.into()))
    }

    /// The event's `idempotency_key`, when it has one.
    pub fn key(&self) -> Option<&str> {
        self.fields.get("idempotency_key").and_then(Value::as_str)
    }

    /// Sets any top-level field.
    pub fn field(mut self, key: &str, value: Value) -> Event {
        self.fields.insert(key.to_owned(), value);
        self
    }

    fn nested(mut self, object: &str, key: &str, value: Value) -> Event {
        let entry = self
            .fields
            .entry(object.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        entry
            .as_object_mut()
            .expect("an object")
            .insert(key.to_owned(), value);
        self
    }

    /// The event with an `idempotency_key`: its own, or a new random one (a UUID v4).
    pub(crate) fn with_key(self) -> Event {
        if self.key().is_some() {
            self
        } else {
            let key = uuid::Uuid::new_v4().to_string();
            self.idempotency_key(key)
        }
    }

    /// Appends the request line (JSON and a newline) to `out`.
    pub(crate) fn write_line(&self, out: &mut Vec<u8>) {
        serde_json::to_writer(&mut *out, &self.fields).expect("a JSON map serializes");
        out.push(b'\n');
    }
}

impl From<Map<String, Value>> for Event {
    fn from(object: Map<String, Value>) -> Event {
        Event::from_json(object)
    }
}
