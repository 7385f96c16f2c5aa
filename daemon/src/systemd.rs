//! The service manager (systemd): readiness, status, reload and stop notifications, the watchdog, and the sockets
//! that socket activation passes in.
//!
//! Owns the protocols, spoken through the `sd-notify` crate, and when each message is sent. What the status line
//! says and what counts as progress for the watchdog are the daemon's to decide (`lib.rs` hands them in as
//! closures); this module imports nothing else of the daemon. Without `$NOTIFY_SOCKET` (not started by systemd)
//! notifications do nothing; without `$LISTEN_PID` naming this process no socket is inherited.
//!
//! Messages, in order: `STATUS=starting` when [`Service::new`] runs; `READY=1` once the sockets accept and every
//! sink is loaded ([`Service::ready`]); `STATUS=` lines with the current state every [`STATUS_EVERY`];
//! `RELOADING=1` with `MONOTONIC_USEC=` and then `READY=1` around a reload ([`Service::reload`]); `STOPPING=1` at
//! shutdown; `WATCHDOG=1` only while the journal writer makes progress ([`watchdog`]).

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// `FileDescriptorName=` of the submission socket in a socket unit (`LISTEN_FDNAMES`).
pub const SUBMISSION: &str = "submission";
/// `FileDescriptorName=` of the admin socket in a socket unit (`LISTEN_FDNAMES`).
pub const ADMIN: &str = "admin";
/// How often the status line is refreshed.
pub const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Sends `states` to the service manager, if there is one; a failure is logged once, never fatal.
fn send(states: &[NotifyState]) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Err(e) = sd_notify::notify(states)
        && !WARNED.swap(true, Ordering::Relaxed)
    {
        warn!(error = %e, "cannot notify the service manager ($NOTIFY_SOCKET); further failures are not logged");
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting,
    Running,
    Stopping,
}

struct State {
    phase: Phase,
    /// Reloads in progress (SIGHUP and `trail reload` may overlap): `RELOADING=1` on the first, `READY=1` after
    /// the last.
    reloads: u32,
    /// What the first of them reloads.
    reloading: String,
    /// Why the watchdog is not pinged, when it is not.
    stalled: Option<String>,
}

/// The daemon as the service manager sees it.
pub struct Service {
    state: Mutex<State>,
    describe: OnceLock<Box<dyn Fn() -> String + Send + Sync>>,
}

impl Default for Service {
    fn default() -> Self {
        Service::new()
    }
}

impl Service {
    /// A daemon that is starting (`STATUS=starting`).
    pub fn new() -> Service {
        send(&[NotifyState::Status(
            "starting: checking the configuration, opening the log, loading sinks",
        )]);
        Service {
            state: Mutex::new(State {
                phase: Phase::Starting,
                reloads: 0,
                reloading: String::new(),
                stalled: None,
            }),
            describe: OnceLock::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What `describe` says now; asked before the state's lock is taken (it may wait for the sinks' table).
    fn describe(&self) -> String {
        self.describe.get().map(|d| d()).unwrap_or_default()
    }

    fn line(described: String, state: &State) -> String {
        let mut line = described;
        if state.reloads > 0 {
            line = format!("reloading {}; {line}", state.reloading);
        }
        if let Some(stalled) = &state.stalled {
            line = format!("{line}; {stalled}");
        }
        line
    }

    /// The sockets accept and every sink is loaded: `READY=1`, and from now on `describe` makes the status line.
    pub fn ready(&self, describe: Box<dyn Fn() -> String + Send + Sync>) {
        let _ = self.describe.set(describe);
        let described = self.describe();
        let mut state = self.lock();
        state.phase = Phase::Running;
        let line = Service::line(described, &state);
        send(&[NotifyState::Ready, NotifyState::Status(&line)]);
    }

    /// Sends the current status line (while running).
    pub fn refresh(&self) {
        let described = self.describe();
        let state = self.lock();
        if state.phase == Phase::Running {
            let line = Service::line(described, &state);
            send(&[NotifyState::Status(&line)]);
        }
    }

    /// Runs `reload` between `RELOADING=1` (with `MONOTONIC_USEC`) and `READY=1`. Before `READY=1` was first sent
    /// and once stopping, nothing is sent: the start's own `READY=1`, or the stop, is what the manager waits for.
    pub fn reload<T>(&self, what: &str, reload: impl FnOnce() -> T) -> T {
        {
            let described = self.describe();
            let mut state = self.lock();
            state.reloads += 1;
            if state.reloads == 1 {
                state.reloading = what.to_owned();
            }
            if state.phase == Phase::Running && state.reloads == 1 {
                let status = Service::line(described, &state);
                let mut states = vec![NotifyState::Reloading, NotifyState::Status(&status)];
                if let Ok(now) = NotifyState::monotonic_usec_now() {
                    states.insert(1, now);
                }
                send(&states);
            }
        }
        let result = reload();
        let described = self.describe();
        let mut state = self.lock();
        state.reloads -= 1;
        if state.phase == Phase::Running && state.reloads == 0 {
            let line = Service::line(described, &state);
            send(&[NotifyState::Ready, NotifyState::Status(&line)]);
        }
        result
    }

    /// The daemon is stopping: `STOPPING=1`.
    pub fn stopping(&self) {
        let mut state = self.lock();
        if state.phase == Phase::Stopping {
            return;
        }
        state.phase = Phase::Stopping;
        send(&[
            NotifyState::Stopping,
            NotifyState::Status(
                "stopping: answering what was read, syncing the log, closing sinks",
            ),
        ]);
    }

    fn set_stalled(&self, stalled: Option<String>) {
        if self.lock().stalled == stalled {
            return;
        }
        let described = self.describe();
        let mut state = self.lock();
        state.stalled = stalled;
        if state.phase == Phase::Running {
            let line = Service::line(described, &state);
            send(&[NotifyState::Status(&line)]);
        }
    }
}

/// The watchdog interval the service manager asked for (`WatchdogSec=`, as `WATCHDOG_USEC` for this process).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// What the watchdog looks at: the journal writer's heartbeat (advances as it stores) and whether anything
/// waits for it.
pub struct Writer {
    /// The heartbeat's current value.
    pub heartbeat: Box<dyn Fn() -> u64 + Send>,
    /// Whether submissions wait for the writer.
    pub waiting: Box<dyn Fn() -> bool + Send>,
}

/// Pings the watchdog (`WATCHDOG=1`) at every look while the writer is healthy, looking every quarter of
/// `interval` (at most every second), until `stop`; runs on a thread of its own. Healthy means its heartbeat
/// changed since the last look, or nothing waits for it: a writer that is stuck, or fails to store what keeps
/// arriving, stops the pings, systemd's watchdog fires and the service is restarted. After half the interval
/// without a ping the status line says so.
pub fn watchdog(
    service: std::sync::Arc<Service>,
    interval: Duration,
    writer: Writer,
    stop: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let look = (interval / 4).min(Duration::from_secs(1));
    if interval < Duration::from_secs(2) {
        warn!(
            ?interval,
            "WatchdogSec= is short: the log writer notices that it is idle only after a second; use 10s or more"
        );
    }
    info!(
        ?interval,
        "pinging the service manager's watchdog while the log writer makes progress"
    );
    std::thread::Builder::new()
        .name("trail-watchdog".into())
        .spawn(move || {
            let mut seen = (writer.heartbeat)();
            let mut last_progress = Instant::now();
            send(&[NotifyState::Watchdog]);
            while !stop.is_cancelled() {
                std::thread::sleep(look);
                let now = (writer.heartbeat)();
                if now != seen || !(writer.waiting)() {
                    seen = now;
                    last_progress = Instant::now();
                    service.set_stalled(None);
                    send(&[NotifyState::Watchdog]);
                } else if last_progress.elapsed() >= interval / 2 && service.lock().stalled.is_none() {
                    warn!(
                        stalled = ?last_progress.elapsed(),
                        "the log writer makes no progress with events waiting; the watchdog is not pinged"
                    );
                    service.set_stalled(Some(
                        "the log writer makes no progress with events waiting: the watchdog is not pinged"
                            .to_owned(),
                    ));
                }
            }
        })
}

/// Sockets passed by the service manager (`LISTEN_FDS`, `LISTEN_FDNAMES`), by name.
#[derive(Debug, Default)]
pub struct Inherited {
    /// The socket named [`SUBMISSION`] (or the only socket, when none is named).
    pub submission: Option<UnixListener>,
    /// The socket named [`ADMIN`].
    pub admin: Option<UnixListener>,
}

/// A passed socket that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("sockets passed by the service manager (LISTEN_FDS): {0}")]
pub struct InheritError(String);

impl Inherited {
    /// Takes the sockets passed to this process, if any (once: the descriptors are owned from then on; those not
    /// used are closed). Names other than [`SUBMISSION`] and [`ADMIN`] are refused, and so is a name given twice;
    /// a single socket without a name (`LISTEN_FDNAMES` unset) is the submission socket. What each socket is
    /// (type, state, address, file) is checked where it is used, by `ingest::adopt`.
    pub fn take() -> Result<Inherited, InheritError> {
        let fds = sd_notify::listen_fds_with_names().map_err(|e| InheritError(e.to_string()))?;
        let named = std::env::var_os("LISTEN_FDNAMES").is_some();
        // SAFETY: the descriptors from `SD_LISTEN_FDS_START` on were passed to this process for it to own
        // (`LISTEN_PID` names it), and nothing else in the process uses them.
        let fds: Vec<(OwnedFd, String)> = fds
            .map(|(fd, name)| (unsafe { OwnedFd::from_raw_fd(fd) }, name))
            .collect();
        let mut inherited = Inherited::default();
        let count = fds.len();
        for (fd, name) in fds {
            let name = if !named && count == 1 {
                SUBMISSION.to_owned()
            } else {
                name
            };
            let slot = match name.as_str() {
                SUBMISSION => &mut inherited.submission,
                ADMIN => &mut inherited.admin,
                other => {
                    return Err(InheritError(format!(
                        "a socket is named {other:?}; name the submission socket {SUBMISSION:?} and the admin \
                         socket {ADMIN:?} (FileDescriptorName= in their socket units)"
                    )));
                }
            };
            if slot.is_some() {
                return Err(InheritError(format!(
                    "two sockets are named {name:?}; give each socket unit its own FileDescriptorName="
                )));
            }
            *slot = Some(UnixListener::from(fd));
        }
        if count > 0 {
            info!(
                submission = inherited.submission.is_some(),
                admin = inherited.admin.is_some(),
                "sockets passed by the service manager"
            );
        }
        Ok(inherited)
    }
}
