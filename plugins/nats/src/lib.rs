//! `nats`: a trail sink plugin that publishes audit events to a NATS JetStream stream. Each event goes to a
//! subject made from a template (`audit.{host}.{type}` by default) with `Nats-Msg-Id` set to its `id`, and
//! counts as delivered only once the stream has acknowledged it (an acknowledgement marked duplicate included:
//! the stream already holds it). Up to `max_in_flight` publishes of a batch are awaiting their
//! acknowledgements at once; they are confirmed to trail in order. See README.md for the configuration.
//!
//! This module owns the connection (the official `async-nats` client on a tokio runtime of the plugin's own,
//! shut down in `close`), creating or checking the stream, the window of publishes in flight, and turning the
//! client's errors into the plugin API's error kinds with messages that say what to do.

mod config;
mod subject;
mod window;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::{
    Client, ConnectErrorKind, ConnectOptions, Event, Subscriber,
    jetstream::{self, Context, ErrorCode, context::GetStreamErrorKind, stream},
};
use tokio::runtime::Runtime;
use trail_plugin_api::{Host, Record, Sink, SinkError, WriteError};

use crate::{
    config::{Auth, Retention, Settings, Storage},
    window::{AckError, Stop, Window},
};

/// Room for the headers (`Nats-Msg-Id`, `Nats-Expected-Stream`) and the subject next to a record's line.
pub(crate) const HEADER_ROOM: usize = 512;

struct Nats {
    host: Host,
    settings: Settings,
    /// The plugin's own runtime; taken and shut down in `close`.
    runtime: Option<Runtime>,
    connection: Option<Connection>,
    /// The publishes awaiting acknowledgement, and the tokens of their reply subjects.
    window: Window,
    /// What the client last reported about the connection, when it was bad news (cleared on reconnecting).
    trouble: Arc<Mutex<Option<String>>>,
}

struct Connection {
    client: Client,
    /// The connection's inbox: the stream acknowledges each record to `<inbox>.<token>`.
    inbox: String,
    /// The one subscription of `<inbox>.*` (renewed by the client when it reconnects).
    acks: Subscriber,
}

impl Nats {
    fn new(config_json: &str, host: Host) -> Result<Self, SinkError> {
        let settings = Settings::parse(config_json)?;
        // One worker thread drives the connection between and during writes; the sink's thread runs the
        // writes themselves (block_on).
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("trail-nats")
            .enable_all()
            .build()
            .map_err(|e| SinkError::retryable(format!("cannot start the plugin's runtime: {e}")))?;
        host.info(&format!(
            "publishing to {} as {}{}{}, up to {} awaiting acknowledgement",
            settings.endpoint,
            settings.subject.text(),
            match &settings.stream {
                Some(s) if s.create => format!(" into stream {} (created when missing)", s.name),
                Some(s) => format!(" into stream {}", s.name),
                None => String::new(),
            },
            match (settings.tls_required, &settings.ca_file) {
                (true, Some(_)) => ", over TLS trusting only the CAs of tls.ca_file",
                (true, None) => ", over TLS",
                _ => "",
            },
            settings.max_in_flight,
        ));
        Ok(Self {
            host,
            settings,
            runtime: Some(runtime),
            connection: None,
            window: Window::new(),
            trouble: Arc::default(),
        })
    }

    fn runtime(&self) -> &Runtime {
        self.runtime
            .as_ref()
            .expect("the runtime lives until close")
    }

    /// Connects, and creates or checks the stream when the configuration names one.
    fn connect(&mut self) -> Result<(), String> {
        let settings = &self.settings;
        let host = self.host.clone();
        let trouble = Arc::clone(&self.trouble);
        let connected = self.runtime().block_on(async {
            let mut options = ConnectOptions::new()
                .name(format!("trail {}", host.sink_name()))
                .connection_timeout(settings.connect_timeout)
                .max_reconnects(None)
                // Room for every acknowledgement of a full window, twice over (one may come twice), so that
                // the client never drops one as a slow consumer's.
                .subscription_capacity((2 * settings.max_in_flight).max(65_536))
                .event_callback(move |event| {
                    let (host, trouble) = (host.clone(), Arc::clone(&trouble));
                    async move { on_event(&host, &trouble, event) }
                });
            options = match &settings.auth {
                Auth::None => options,
                Auth::UserPassword(user, password) => {
                    options.user_and_password(user.clone(), password.clone())
                }
                Auth::Token(token) => options.token(token.clone()),
                Auth::Nkey(seed) => options.nkey(seed.clone()),
                Auth::CredsFile(path) => options.credentials_file(path).await.map_err(|e| {
                    format!(
                        "\"creds_file\" {}: {e}: give a .creds file as `nsc` or `nats` writes it",
                        path.display()
                    )
                })?,
            };
            if settings.tls_required {
                options = options.require_tls(true);
            }
            if let Some(ca) = &settings.ca_file {
                options = options.add_root_certificates(ca.clone());
            }
            if let Some((cert, key)) = &settings.client_cert {
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
            let client = options
                .connect(settings.servers.as_slice())
                .await
                .map_err(|e| describe_connect(&e, settings))?;
            // The JetStream API (the stream's lookup or creation) only: records are published with core NATS.
            let jetstream = jetstream::ContextBuilder::new()
                .timeout(settings.ack_timeout)
                .build(client.clone());
            if let Some(stream) = &settings.stream {
                ensure_stream(&jetstream, stream, &self.host).await?;
            }
            let inbox = client.new_inbox();
            let acks = client
                .subscribe(format!("{inbox}.*"))
                .await
                .map_err(|e| format!("subscribing to the inbox of acknowledgements: {e}"))?;
            Ok::<_, String>(Connection {
                client,
                inbox,
                acks,
            })
        });
        let connection =
            connected.map_err(|e| format!("connecting to {}: {e}", settings.endpoint))?;
        let info = connection.client.server_info();
        self.host.info(&format!(
            "connected to {} (server {} {}, {}:{})",
            settings.endpoint, info.server_name, info.version, info.host, info.port
        ));
        self.connection = Some(connection);
        Ok(())
    }

    /// Why `record` was not confirmed, as an error that says what to do.
    fn describe(&self, client: &Client, record: &Record<'_>, error: AckError) -> SinkError {
        let at = format!("event seq {}, id {}", record.seq, record.id);
        match error {
            AckError::TimedOut => {
                let trouble = self
                    .trouble
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                let why = match (client.connection_state(), trouble) {
                    (async_nats::connection::State::Connected, _) => String::new(),
                    (_, Some(t)) => {
                        format!(": not connected to any server ({t}); the client keeps trying")
                    }
                    (_, None) => {
                        ": not connected to any server; the client keeps trying".to_owned()
                    }
                };
                SinkError::retryable(format!(
                    "no acknowledgement from the stream within {:?} (\"ack_timeout\"){why} ({at})",
                    self.settings.ack_timeout
                ))
            }
            AckError::NoStream => {
                let mut subject = String::new();
                self.settings.subject.render(record, &mut subject);
                SinkError::retryable(format!(
                    "no stream captures subject {subject}: create one whose subjects include it (README.md has a definition), or set stream with create: true ({at})"
                ))
            }
            AckError::Lost(why) => SinkError::retryable(format!(
                "the connection was lost before the stream acknowledged: {why} ({at})"
            )),
            AckError::Refused { code, description } => {
                let message = format!("the stream refused the event: {description} ({at})");
                if code == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM.0 {
                    SinkError::permanent(message)
                } else {
                    SinkError::retryable(message)
                }
            }
            AckError::TooLarge { size, max_payload } => SinkError::permanent(format!(
                "the event is {size} bytes, more than the server accepts in one message (max_payload {max_payload}): raise max_payload on the servers ({at})"
            )),
        }
    }

    fn failed(&self, batch: &[Record<'_>], delivered: usize, error: SinkError) -> WriteError {
        // trail logs the error it gets back; this adds where in the write it happened.
        self.host.debug(&format!(
            "{error} (after {delivered} of {} acknowledged)",
            batch.len()
        ));
        WriteError::new(delivered as u64, error)
    }
}

/// The record's fields `Nats-Msg-Id` is made from when the event was submitted with an idempotency key.
#[derive(serde::Deserialize)]
struct Keyed<'a> {
    #[serde(borrow)]
    idempotency_key: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    source: KeyedSource<'a>,
}

#[derive(serde::Deserialize)]
struct KeyedSource<'a> {
    uid: u32,
    #[serde(borrow)]
    host: std::borrow::Cow<'a, str>,
}

/// `Nats-Msg-Id`: the event `id`; for an event submitted with an `idempotency_key`, `<host>/<uid>/<key>`, so
/// that a repeat trail itself could not recognise (a stream-only event's key is forgotten at a restart, an old key
/// by `idempotency.max_keys`) is still dropped by the stream's duplicate window. Keys are scoped by the submitting
/// uid, as trail scopes them, and by host, since many hosts share a stream.
pub(crate) fn message_id(record: &Record<'_>) -> String {
    let line = record.line.as_str();
    if !line.contains("\"idempotency_key\":") {
        return record.id.as_str().to_owned();
    }
    match serde_json::from_str::<Keyed<'_>>(line) {
        Ok(Keyed {
            idempotency_key: Some(key),
            source,
        }) => format!("{}/{}/{key}", source.host, source.uid),
        _ => record.id.as_str().to_owned(),
    }
}

/// Creates the stream when it is missing (and the configuration says to), or checks the settings the
/// configuration writes out against the existing one.
async fn ensure_stream(
    jetstream: &Context,
    wanted: &config::Stream,
    host: &Host,
) -> Result<(), String> {
    match jetstream.get_stream(&wanted.name).await {
        Ok(mut existing) => {
            let info = existing
                .info()
                .await
                .map_err(|e| format!("reading stream {}: {e}", wanted.name))?;
            check_stream(wanted, &info.config)
        }
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(js) if js.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                if !wanted.create {
                    return Err(format!(
                        "stream {} does not exist: create it (README.md has a definition), or set stream.create: true",
                        wanted.name
                    ));
                }
                let config = stream::Config {
                    name: wanted.name.clone(),
                    subjects: wanted.subjects.value.clone(),
                    retention: match wanted.retention.value {
                        Retention::Limits => stream::RetentionPolicy::Limits,
                        Retention::Interest => stream::RetentionPolicy::Interest,
                        Retention::Workqueue => stream::RetentionPolicy::WorkQueue,
                    },
                    max_age: wanted.max_age.value,
                    num_replicas: wanted.replicas.value,
                    duplicate_window: wanted.duplicate_window.value,
                    storage: match wanted.storage.value {
                        Storage::File => stream::StorageType::File,
                        Storage::Memory => stream::StorageType::Memory,
                    },
                    ..Default::default()
                };
                jetstream
                    .create_stream(config)
                    .await
                    .map_err(|e| format!("creating stream {}: {e}", wanted.name))?;
                host.info(&format!(
                    "created stream {} (subjects {}, {} replicas)",
                    wanted.name,
                    wanted.subjects.value.join(" "),
                    wanted.replicas.value
                ));
                Ok(())
            }
            GetStreamErrorKind::Request => Err(format!(
                "looking up stream {}: {e}: is JetStream enabled on the servers?",
                wanted.name
            )),
            _ => Err(format!("looking up stream {}: {e}", wanted.name)),
        },
    }
}

/// The differences between what the configuration writes out and the existing stream, as an error.
fn check_stream(wanted: &config::Stream, actual: &stream::Config) -> Result<(), String> {
    let mut differences = Vec::new();
    let mut differ = |setting: &str, want: String, have: String| {
        differences.push(format!(
            "{setting} is {have}, the configuration says {want}"
        ));
    };
    if wanted.subjects.explicit {
        let (mut want, mut have) = (wanted.subjects.value.clone(), actual.subjects.clone());
        want.sort();
        have.sort();
        if want != have {
            differ("subjects", want.join(" "), have.join(" "));
        }
    }
    let retention = match actual.retention {
        stream::RetentionPolicy::Limits => Retention::Limits,
        stream::RetentionPolicy::Interest => Retention::Interest,
        stream::RetentionPolicy::WorkQueue => Retention::Workqueue,
    };
    if wanted.retention.explicit && wanted.retention.value != retention {
        differ(
            "retention",
            format!("{:?}", wanted.retention.value).to_lowercase(),
            format!("{retention:?}").to_lowercase(),
        );
    }
    if wanted.max_age.explicit && wanted.max_age.value != actual.max_age {
        differ(
            "max_age",
            format!("{:?}", wanted.max_age.value),
            format!("{:?}", actual.max_age),
        );
    }
    if wanted.replicas.explicit && wanted.replicas.value != actual.num_replicas.max(1) {
        differ(
            "replicas",
            wanted.replicas.value.to_string(),
            actual.num_replicas.to_string(),
        );
    }
    if wanted.duplicate_window.explicit && wanted.duplicate_window.value != actual.duplicate_window
    {
        differ(
            "duplicate_window",
            format!("{:?}", wanted.duplicate_window.value),
            format!("{:?}", actual.duplicate_window),
        );
    }
    let storage = match actual.storage {
        stream::StorageType::File => Storage::File,
        stream::StorageType::Memory => Storage::Memory,
    };
    if wanted.storage.explicit && wanted.storage.value != storage {
        differ(
            "storage",
            format!("{:?}", wanted.storage.value).to_lowercase(),
            format!("{storage:?}").to_lowercase(),
        );
    }
    if differences.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "stream {} differs from the configuration: {}: change the stream (nats stream edit) or the configuration",
            wanted.name,
            differences.join("; ")
        ))
    }
}

/// Keeps the client's bad news for error messages, and logs connection changes.
fn on_event(host: &Host, trouble: &Mutex<Option<String>>, event: Event) {
    let mut trouble = trouble.lock().unwrap_or_else(|p| p.into_inner());
    match event {
        Event::Connected => {
            if trouble.take().is_some() {
                host.info("connected again");
            }
        }
        Event::Disconnected => {
            host.warn("disconnected from the server: reconnecting");
            trouble.get_or_insert_with(|| "disconnected".to_owned());
        }
        Event::ServerError(e) => {
            let text = format!("the server said: {e}");
            if trouble.as_deref() != Some(&text) {
                host.warn(&text);
            }
            *trouble = Some(text);
        }
        Event::ClientError(e) => {
            let text = format!("client error: {e}");
            if trouble.as_deref() != Some(&text) {
                host.warn(&text);
            }
            *trouble = Some(text);
        }
        Event::LameDuckMode => {
            host.info("the server is shutting down (lame duck mode): moving to another")
        }
        Event::SlowConsumer(_) | Event::Draining | Event::Closed => {}
    }
}

/// A connection error as a message that says what to do.
fn describe_connect(error: &async_nats::ConnectError, settings: &Settings) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        let cause = e.to_string();
        if !text.contains(&cause) {
            text.push_str(&format!(": {cause}"));
        }
        source = e.source();
    }
    let advice = match error.kind() {
        ConnectErrorKind::AuthorizationViolation => match settings.auth {
            Auth::None => {
                ": the server wants credentials: give user and password, token, nkey or creds_file"
            }
            Auth::UserPassword(..) => {
                ": check \"user\" and \"password\" against the server's authorization"
            }
            Auth::Token(_) => ": check \"token\" against the server's authorization",
            Auth::Nkey(_) => ": check that the server lists the public key of \"nkey\"",
            Auth::CredsFile(_) => {
                ": check that \"creds_file\" holds a user of the server's operator and account"
            }
        },
        _ if error.kind() == ConnectErrorKind::Tls || text.contains("peer certificate") => {
            if text.contains("UnknownIssuer") || text.contains("unknown issuer") {
                if settings.ca_file.is_some() {
                    ": the server's certificate is not trusted: give the CA that signed it in \"tls.ca_file\" (the one given did not sign it)"
                } else {
                    ": the server's certificate is not trusted: give the CA that signed it in \"tls.ca_file\""
                }
            } else if text.contains("NotValidForName") {
                ": the server's certificate is not for this host name: connect with a name (or address) the certificate names"
            } else {
                ": check the servers' TLS settings and \"tls\""
            }
        }
        ConnectErrorKind::Io | ConnectErrorKind::TimedOut => {
            ": is nats-server running there, and listening on that address?"
        }
        ConnectErrorKind::ServerParse => ": write nats://host:port",
        _ => "",
    };
    text.push_str(advice);
    text
}

impl Sink for Nats {
    fn write(&mut self, batch: &[Record<'_>]) -> Result<(), WriteError> {
        if batch.is_empty() {
            return Ok(());
        }
        if self.connection.is_none()
            && let Err(message) = self.connect()
        {
            return Err(self.failed(batch, 0, SinkError::retryable(message)));
        }
        let connection = self.connection.as_mut().expect("connected above");
        let runtime = self
            .runtime
            .as_ref()
            .expect("the runtime lives until close");
        let published = runtime.block_on(self.window.publish(
            &self.settings,
            &connection.client,
            &connection.inbox,
            &mut connection.acks,
            batch,
        ));
        match published {
            Ok(()) => Ok(()),
            Err(Stop { index, error }) => {
                let client = connection.client.clone();
                let error = self.describe(&client, &batch[index], error);
                Err(self.failed(batch, index, error))
            }
        }
    }

    fn close(&mut self) -> Result<(), SinkError> {
        if let Some(runtime) = &self.runtime {
            // The inbox's subscription unsubscribes on a task of the runtime when dropped.
            let _inside = runtime.enter();
            self.connection = None;
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
        Ok(())
    }
}

impl Drop for Nats {
    /// Closes like `close` when the instance goes without it: the connection first, inside its runtime.
    fn drop(&mut self) {
        _ = Sink::close(self);
    }
}

trail_plugin_api::export_sink!(
    name: "nats",
    version: env!("CARGO_PKG_VERSION"),
    new: Nats::new,
);
