//! NATS servers of the test's own: `nats-server` processes with JetStream on free loopback ports, each with its
//! configuration, store and log in a temporary directory; one server alone or three in a cluster. A server can be
//! killed and started again on the same port and store. Killed by process id when dropped. Also a small
//! JetStream consumer that reads back what a stream holds. Used by the plugin's tests and benchmark and by the
//! daemon's end-to-end tests.

#![allow(dead_code)]

use std::{
    fs,
    io::Read,
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use serde_json::{Value, json};

/// Generous: the machine may be busy building.
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// The user and password of servers started with [`Auth::UserPassword`].
pub const USER: &str = "trail";
/// See [`USER`].
pub const PASSWORD: &str = "trail-password";

/// How a server lets clients in.
#[derive(Clone, Default)]
pub enum Auth {
    /// Anyone.
    #[default]
    None,
    /// [`USER`] with [`PASSWORD`].
    UserPassword,
    /// [`USER`] with this password.
    Password(String),
    /// This token.
    Token(String),
}

/// How a server is set up.
#[derive(Clone, Default)]
pub struct Options {
    /// Who may connect.
    pub auth: Auth,
    /// A certificate chain and its key (PEM): the server then requires TLS.
    pub tls: Option<(String, String)>,
}

/// One `nats-server` process (running or not) with its directory.
pub struct Server {
    dir: tempfile::TempDir,
    /// The client port.
    pub port: u16,
    child: Option<Child>,
    name: String,
    cluster: Option<String>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nats_server() -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let path = Path::new(dir).join("nats-server");
        if path.exists() {
            return path;
        }
    }
    panic!("nats-server is not installed: apt-get install nats-server")
}

impl Server {
    /// A running server alone.
    pub fn start(options: Options) -> Self {
        let mut server = Self::prepare(options);
        server.run();
        server
    }

    /// A server set up with its port chosen, not running yet: [`run`](Self::run) starts it.
    pub fn prepare(options: Options) -> Self {
        Self::configure("n1", free_port(), &options, None)
    }

    fn configure(name: &str, port: u16, options: &Options, cluster: Option<String>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("trail-nats")
            .tempdir()
            .unwrap();
        let server = Self {
            dir,
            port,
            child: None,
            name: name.to_owned(),
            cluster,
        };
        server.write_config(options);
        server
    }

    fn write_config(&self, options: &Options) {
        let (d, name, port) = (self.dir.path(), &self.name, self.port);
        let mut conf = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{port}\nlog_file: \"{log}\"\n\
             jetstream {{ store_dir: \"{store}\" }}\nmax_payload: 1MB\n",
            log = d.join("server.log").display(),
            store = d.join("store").display(),
        );
        match &options.auth {
            Auth::None => {}
            Auth::UserPassword => conf.push_str(&format!(
                "authorization {{ user: {USER}, password: \"{PASSWORD}\" }}\n"
            )),
            Auth::Password(password) => conf.push_str(&format!(
                "authorization {{ user: {USER}, password: \"{password}\" }}\n"
            )),
            Auth::Token(token) => {
                conf.push_str(&format!("authorization {{ token: \"{token}\" }}\n"))
            }
        }
        if let Some((cert, key)) = &options.tls {
            fs::write(d.join("cert.pem"), cert).unwrap();
            fs::write(d.join("key.pem"), key).unwrap();
            conf.push_str(&format!(
                "tls {{ cert_file: \"{}\", key_file: \"{}\" }}\n",
                d.join("cert.pem").display(),
                d.join("key.pem").display()
            ));
        }
        if let Some(cluster) = &self.cluster {
            conf.push_str(cluster);
        }
        fs::write(d.join("server.conf"), conf).unwrap();
    }

    /// Writes the configuration anew with `options` and has the running server reload it (SIGHUP).
    pub fn reconfigure(&self, options: &Options) {
        self.write_config(options);
        let child = self.child.as_ref().expect("the server runs");
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGHUP) }, 0);
    }

    /// Stops the server cleanly (SIGTERM) and waits for it to end.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    /// Starts the server and waits until it accepts connections.
    pub fn run(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let child = Command::new(nats_server())
            .arg("-c")
            .arg(self.dir.path().join("server.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nats-server {} exited: {status}\n{}", self.name, self.log());
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            assert!(
                started.elapsed() < READY_DEADLINE,
                "nats-server {} did not start\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL: nothing is flushed or handed over) and waits for it to end.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it runs.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's log.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(self.dir.path().join("server.log")) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three servers in one JetStream cluster on loopback.
pub struct Cluster {
    /// The servers; index them to kill or run one.
    pub servers: Vec<Server>,
}

impl Cluster {
    /// Three running servers; JetStream may still be electing its leader when this returns (the sink retries).
    pub fn start() -> Self {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let servers = (0..3)
            .map(|i| {
                let routes: Vec<String> = ports
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, (_, route))| format!("\"nats-route://127.0.0.1:{route}\""))
                    .collect();
                let cluster = format!(
                    "cluster {{ name: trail-test, listen: 127.0.0.1:{}, routes: [{}] }}\n",
                    ports[i].1,
                    routes.join(", ")
                );
                Server::configure(
                    &format!("n{}", i + 1),
                    ports[i].0,
                    &Options::default(),
                    Some(cluster),
                )
            })
            .collect();
        let mut cluster = Self { servers };
        for server in &mut cluster.servers {
            server.run();
        }
        cluster
    }

    /// Every server's URL.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(Server::url).collect()
    }

    /// Every server's log, for failure messages.
    pub fn logs(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("--- {}\n{}", s.name, s.log()))
            .collect()
    }
}

/// A message read back from a stream.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    /// The stream's sequence number.
    pub stream_seq: u64,
    /// Its subject.
    pub subject: String,
    /// Its `Nats-Msg-Id` header.
    pub msg_id: Option<String>,
    /// The payload as JSON.
    pub record: Value,
}

/// A client of the test's own for looking at JetStream (a runtime of its own; blocking calls).
pub struct Reader {
    runtime: tokio::runtime::Runtime,
    jetstream: async_nats::jetstream::Context,
}

impl Reader {
    /// Connects to `urls` (user and password when given). A server that was just started or reconfigured may
    /// refuse for a moment (a reload is applied after the signal returns): refusals are retried for 30 s.
    pub fn connect(urls: &[String], credentials: Option<(&str, &str)>) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let addrs: Vec<async_nats::ServerAddr> = urls.iter().map(|u| u.parse().unwrap()).collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let jetstream = runtime.block_on(async {
            loop {
                let mut options = async_nats::ConnectOptions::new();
                if let Some((user, password)) = credentials {
                    options = options.user_and_password(user.into(), password.into());
                }
                match options.connect(addrs.clone()).await {
                    Ok(client) => break async_nats::jetstream::new(client),
                    Err(_) if std::time::Instant::now() < deadline => {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                    Err(e) => panic!("cannot connect to {urls:?}: {e}"),
                }
            }
        });
        Self { runtime, jetstream }
    }

    /// How many messages stream `name` holds; `None` while it does not exist or cannot answer.
    pub fn count(&self, name: &str) -> Option<u64> {
        self.runtime.block_on(async {
            let mut stream = self.jetstream.get_stream(name).await.ok()?;
            Some(stream.info().await.ok()?.state.messages)
        })
    }

    /// The stream's configuration as JSON (replicas, subjects…), as the server reports it.
    pub fn config(&self, name: &str) -> Value {
        self.runtime.block_on(async {
            let mut stream = self.jetstream.get_stream(name).await.unwrap();
            let info = stream.info().await.unwrap();
            json!({
                "subjects": info.config.subjects,
                "replicas": info.config.num_replicas,
                "duplicate_window_s": info.config.duplicate_window.as_secs(),
                "max_age_s": info.config.max_age.as_secs(),
            })
        })
    }

    /// Creates stream `name` capturing `subjects` with `replicas`.
    pub fn create_stream(&self, name: &str, subjects: &[&str], replicas: usize) {
        self.runtime.block_on(async {
            self.jetstream
                .create_stream(async_nats::jetstream::stream::Config {
                    name: name.into(),
                    subjects: subjects.iter().map(|s| s.to_string()).collect(),
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .unwrap();
        });
    }

    /// Everything stream `name` holds, in stream order, read by an ephemeral pull consumer from the start.
    pub fn read_all(&self, name: &str) -> Vec<Stored> {
        self.runtime.block_on(async {
            let mut stream = self.jetstream.get_stream(name).await.unwrap();
            let total = stream.info().await.unwrap().state.messages;
            let consumer = stream
                .create_consumer(async_nats::jetstream::consumer::pull::Config {
                    deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
                    ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
                    ..Default::default()
                })
                .await
                .unwrap();
            let mut out = Vec::with_capacity(total as usize);
            let deadline = Instant::now() + READY_DEADLINE;
            while (out.len() as u64) < total {
                assert!(Instant::now() < deadline, "read {} of {total}", out.len());
                let mut batch = consumer
                    .batch()
                    .max_messages(1000)
                    .expires(Duration::from_secs(1))
                    .messages()
                    .await
                    .unwrap();
                while let Some(message) = batch.next().await {
                    out.push(stored(message.unwrap()));
                }
            }
            out
        })
    }

    /// What a consumer with `config` (the JetStream API's consumer configuration, as README.md writes them)
    /// receives from stream `name`: created through `$JS.API.CONSUMER.CREATE`, read until nothing is pending.
    pub fn consume(&self, name: &str, config: Value) -> Vec<Stored> {
        self.runtime.block_on(async {
            let created: Value = self
                .jetstream
                .request(
                    format!("CONSUMER.CREATE.{name}"),
                    &json!({"stream_name": name, "config": config}),
                )
                .await
                .unwrap();
            assert!(created.get("error").is_none(), "{created}");
            let pending = created["num_pending"].as_u64().unwrap();
            let consumer: async_nats::jetstream::consumer::PullConsumer = self
                .jetstream
                .get_consumer_from_stream(created["name"].as_str().unwrap(), name)
                .await
                .unwrap();
            let mut out = Vec::new();
            let deadline = Instant::now() + READY_DEADLINE;
            while (out.len() as u64) < pending {
                assert!(Instant::now() < deadline, "read {} of {pending}", out.len());
                let mut batch = consumer
                    .batch()
                    .max_messages(1000)
                    .expires(Duration::from_secs(1))
                    .messages()
                    .await
                    .unwrap();
                while let Some(message) = batch.next().await {
                    out.push(stored(message.unwrap()));
                }
            }
            out
        })
    }
}

fn stored(message: async_nats::jetstream::Message) -> Stored {
    let info = message.info().unwrap();
    Stored {
        stream_seq: info.stream_sequence,
        subject: message.subject.to_string(),
        msg_id: message
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.as_str().to_owned()),
        record: serde_json::from_slice(&message.payload).unwrap(),
    }
}

/// A message a [`Responder`] received: its subject, its reply subject and its `Nats-Msg-Id`.
#[derive(Clone, Debug)]
pub struct Request {
    pub subject: String,
    pub reply: String,
    pub msg_id: Option<String>,
}

/// A core-NATS subscriber of the test's own that answers publishes in JetStream's stead, so that a test can
/// send acknowledgements out of order, twice, late or not at all (a stream answers each once, in order).
/// Its script runs on a thread of its own with a blocking [`Peer`]; [`Responder::join`] returns what the script
/// returns.
pub struct Responder<T> {
    thread: Option<std::thread::JoinHandle<T>>,
}

/// The responder's side of the connection, for its script.
pub struct Peer {
    runtime: tokio::runtime::Runtime,
    client: async_nats::Client,
    /// Taken when dropped: it unsubscribes on a task of the runtime.
    messages: Option<async_nats::Subscriber>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _inside = self.runtime.enter();
        self.messages = None;
    }
}

impl<T: Send + 'static> Responder<T> {
    /// Subscribes to `subjects` on the server at `url`, and once the server has the subscription (returned
    /// then), runs `script`.
    pub fn start(
        url: &str,
        subjects: &str,
        script: impl FnOnce(&mut Peer) -> T + Send + 'static,
    ) -> Self {
        let (url, subjects) = (url.to_owned(), subjects.to_owned());
        let (ready, subscribed) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let (client, messages) = runtime.block_on(async {
                let client = async_nats::connect(url).await.unwrap();
                let messages = client.subscribe(subjects).await.unwrap();
                client.flush().await.unwrap();
                (client, messages)
            });
            ready.send(()).unwrap();
            script(&mut Peer {
                runtime,
                client,
                messages: Some(messages),
            })
        });
        subscribed
            .recv_timeout(READY_DEADLINE)
            .expect("the responder subscribed");
        Self {
            thread: Some(thread),
        }
    }

    /// Waits for the script to end, and returns what it returned.
    pub fn join(mut self) -> T {
        self.thread
            .take()
            .unwrap()
            .join()
            .expect("the responder's script")
    }
}

impl Peer {
    /// The next message, waiting up to `wait`.
    pub fn next_within(&mut self, wait: Duration) -> Option<Request> {
        self.runtime.block_on(async {
            let messages = self.messages.as_mut().expect("subscribed until dropped");
            let message = tokio::time::timeout(wait, messages.next()).await.ok()??;
            Some(Request {
                subject: message.subject.to_string(),
                reply: message.reply.map(|r| r.to_string()).unwrap_or_default(),
                msg_id: message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                    .map(|v| v.as_str().to_owned()),
            })
        })
    }

    /// The next `n` messages, each within a generous deadline.
    pub fn take(&mut self, n: usize) -> Vec<Request> {
        (0..n)
            .map(|i| {
                self.next_within(READY_DEADLINE)
                    .unwrap_or_else(|| panic!("message {i} of {n} did not come"))
            })
            .collect()
    }

    /// Answers on `reply` with `payload`, and waits until the server has it.
    pub fn answer(&self, reply: &str, payload: &str) {
        self.runtime.block_on(async {
            self.client
                .publish(reply.to_owned(), payload.to_owned().into())
                .await
                .unwrap();
            self.client.flush().await.unwrap();
        });
    }
}
