//! Access control and per-uid limits: which peers may submit which event types, how fast, and what was refused.
//!
//! Owns the decisions a client's event passes after its envelope and type are known: the `access:` rules (first
//! matching rule decides; see README.md, "Access control and limits"), the event type's `require_actor` and
//! `actor_from_peer`, the per-uid token bucket (`limits.rate_per_uid`, `limits.rate_burst`); the counters of
//! every refused line ([`Refusals`]) and the aggregation of refusals into `trail_submission_denied` records
//! ([`Denials`]). It never touches sockets, files or the journal and runs no task of its own: `ingest` asks it,
//! `lib.rs` hands what it aggregated to the auditor, `admin` shows its report.
//!
//! What belongs to a configuration generation is a [`Policy`] (part of `ingest::Rules`, rebuilt whole by a
//! reload); what must survive a reload (buckets, counters, pending records, the user cache) is [`Access`].
//! The hot path: an event type that no rule covers, without `require_actor`/`actor_from_peer`, with no rate
//! configured, costs three branches: no allocation, no lock.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::config::Config;
use crate::event_types::{EventType, Registry};
use crate::filter::{Filter, FilterConfig};
use crate::protocol::{Actor, Checked, ErrorCode, Rejection, Violation};

/// How long a user's name and groups are cached: group changes take effect within this time.
pub const IDENTITY_LIFETIME: Duration = Duration::from_secs(60);
/// Most uids whose refusals are counted one by one; beyond it the least recently refused uid is forgotten.
pub const MAX_UIDS: usize = 1024;
/// Most uids with a cached identity or a rate bucket before idle ones are dropped.
const MAX_CACHED: usize = 4096;

/// Who sent a line, as the kernel reported it (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// Effective uid.
    pub uid: u32,
    /// Effective (primary) gid.
    pub gid: u32,
    /// Process id, when known.
    pub pid: Option<i32>,
}

/// Who may submit the types one rule covers: uids (with the users' ids), gids (with the groups' ids).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Allow {
    /// The rule's index in `access.rules`.
    rule: usize,
    uids: Vec<u32>,
    gids: Vec<u32>,
}

/// The per-uid rate: tokens per second and the bucket's size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Events per second.
    pub per_sec: f64,
    /// Events at once.
    pub burst: f64,
}

/// The access rules and the rate of one configuration generation, resolved against its event types.
#[derive(Debug)]
pub struct Policy {
    /// Event types a rule covers, each with the rule that decides it; types not here are open to every peer.
    by_type: HashMap<String, Arc<Allow>>,
    rate: Option<Rate>,
    /// `access.denied_record_interval`.
    denied_interval: Duration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            by_type: HashMap::new(),
            rate: None,
            denied_interval: Duration::from_secs(60),
        }
    }
}

impl Policy {
    /// The policy of `config` for the event types of `registry`; start-up and every reload build it here. The
    /// configuration was checked when it was read (patterns, names resolved), so this cannot fail. The daemon's
    /// own types are left out: every client is refused them before any rule is asked.
    pub fn build(config: &Config, registry: &Registry) -> Policy {
        let rules: Vec<(Filter, Arc<Allow>)> = config
            .access
            .rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let types = FilterConfig {
                    types: r.types.clone(),
                    ..FilterConfig::default()
                };
                let filter = Filter::new(&types).ok()?;
                let mut uids: Vec<u32> = r.uids.iter().chain(&r.user_ids).copied().collect();
                let mut gids: Vec<u32> = r.gids.iter().chain(&r.group_ids).copied().collect();
                uids.sort_unstable();
                uids.dedup();
                gids.sort_unstable();
                gids.dedup();
                Some((
                    filter,
                    Arc::new(Allow {
                        rule: i,
                        uids,
                        gids,
                    }),
                ))
            })
            .collect();
        let mut by_type = HashMap::new();
        for ty in registry.types() {
            if crate::event_types::is_daemon_type(&ty.name) {
                continue;
            }
            if let Some((_, allow)) = rules.iter().find(|(f, _)| f.matches(ty)) {
                by_type.insert(ty.name.clone(), allow.clone());
            }
        }
        let limits = &config.limits;
        let rate = limits.rate_per_uid.map(|per_sec| Rate {
            per_sec,
            burst: limits
                .rate_burst
                .map_or_else(|| per_sec.ceil().max(1.0), f64::from),
        });
        Policy {
            by_type,
            rate,
            denied_interval: config.access.denied_record_interval,
        }
    }

    /// The per-uid rate, when one is configured.
    pub fn rate(&self) -> Option<Rate> {
        self.rate
    }

    /// The index of the rule that decides `event_type`, if any.
    pub fn rule_of(&self, event_type: &str) -> Option<usize> {
        self.by_type.get(event_type).map(|a| a.rule)
    }
}

/// What survives reloads: the users' identities, the rate buckets, the refusal counters and the refusals still
/// to be recorded.
pub struct Access {
    identities: Arc<Identities>,
    buckets: Mutex<HashMap<u32, Arc<Bucket>>>,
    /// Every refused line, by code and per uid.
    pub refusals: Refusals,
    /// Refusals waiting to be recorded as `trail_submission_denied`.
    pub denials: Denials,
}

impl Default for Access {
    fn default() -> Access {
        Access::new()
    }
}

impl Access {
    /// Empty counters and caches.
    pub fn new() -> Access {
        let identities = Arc::new(Identities::new(IDENTITY_LIFETIME));
        Access {
            identities: identities.clone(),
            buckets: Mutex::new(HashMap::new()),
            refusals: Refusals::new(identities.clone()),
            denials: Denials::new(identities),
        }
    }

    /// The checks of `policy` and `ty` for a client's event, in this order: the rule that covers the type (a peer
    /// it does not allow is refused `forbidden`); `actor_from_peer` (the peer's user name becomes `actor.id`;
    /// another id is `forbidden`); `require_actor` (no `actor.id` is `invalid_event`). Refusals of the kind
    /// `forbidden` are noted for `trail_submission_denied`.
    pub fn admit(
        &self,
        policy: &Policy,
        ty: &EventType,
        event: &mut Checked,
        who: Credentials,
    ) -> Result<(), Rejection> {
        if !policy.by_type.is_empty()
            && let Some(allow) = policy.by_type.get(&ty.name)
            && !self.allows(allow, who)
        {
            let reason = format!(
                "uid {}{} may not submit event type {:?} (access.rules[{}] allows {})",
                who.uid,
                self.identities.named(who.uid),
                ty.name,
                allow.rule,
                describe(allow)
            );
            return Err(self.deny(policy, ty, who, ErrorCode::Forbidden, reason, None));
        }
        if ty.actor_from_peer {
            let identity = self.identities.get(who.uid);
            let Some(name) = identity.name.as_deref() else {
                let reason = format!(
                    "event type {:?} takes actor.id from the submitting user's name (actor_from_peer), and uid {} \
                     has no user name on this host",
                    ty.name, who.uid
                );
                return Err(self.deny(policy, ty, who, ErrorCode::Forbidden, reason, None));
            };
            if let Some(actor) = &event.request.actor
                && actor.id.as_str() != name
            {
                let reason = format!(
                    "actor.id {:?} is not the submitting user's name {name:?}: event type {:?} takes actor.id \
                     from the peer (actor_from_peer); send actor.id {name:?} or none",
                    actor.id, ty.name
                );
                let details = vec![Violation {
                    path: "/actor/id".into(),
                    message: reason.clone(),
                }];
                return Err(self.deny(
                    policy,
                    ty,
                    who,
                    ErrorCode::Forbidden,
                    reason,
                    Some(details),
                ));
            }
            if event.request.actor.is_none() {
                event.request.actor = Some(Actor {
                    id: name.to_owned().into(),
                    name: None,
                    kind: None,
                    ip: None,
                });
            }
        }
        if ty.require_actor && event.request.actor.is_none() {
            let message = format!(
                "invalid event: /actor/id: event type {:?} requires actor.id (require_actor); say who did it",
                ty.name
            );
            return Err(Rejection::with_details(
                ErrorCode::InvalidEvent,
                message,
                vec![Violation {
                    path: "/actor/id".into(),
                    message: "is required by the event type (require_actor)".into(),
                }],
            ));
        }
        Ok(())
    }

    /// Takes one event from the bucket of `who`'s uid (fetched once per connection into `slot`); refuses
    /// `rate_limited`, with the milliseconds until the next token, when it is empty.
    pub fn take(
        &self,
        policy: &Policy,
        rate: Rate,
        ty: &EventType,
        who: Credentials,
        slot: &OnceLock<Arc<Bucket>>,
    ) -> Result<(), Rejection> {
        let bucket = slot.get_or_init(|| self.bucket(who.uid));
        let Err(wait) = bucket.take(rate, Instant::now()) else {
            return Ok(());
        };
        let reason = format!(
            "uid {}{} submits more than limits.rate_per_uid allows ({} events/s, bursts of {}); try again in {wait} ms",
            who.uid,
            self.identities.named(who.uid),
            rate.per_sec,
            rate.burst
        );
        let mut r = self.deny(policy, ty, who, ErrorCode::RateLimited, reason, None);
        r.retry_after_ms = Some(wait);
        Err(r)
    }

    /// Gives back the token [`Access::take`] took for an event that is not decided yet (it waits for another
    /// submission with its idempotency key and is checked again, taking a token then).
    pub fn give_back(&self, rate: Rate, slot: &OnceLock<Arc<Bucket>>) {
        if let Some(bucket) = slot.get() {
            bucket.give_back(rate);
        }
    }

    fn deny(
        &self,
        policy: &Policy,
        ty: &EventType,
        who: Credentials,
        code: ErrorCode,
        reason: String,
        details: Option<Vec<Violation>>,
    ) -> Rejection {
        self.denials
            .note(who, &ty.name, code, &reason, policy.denied_interval);
        Rejection::with_details(code, reason, details.unwrap_or_default())
    }

    fn allows(&self, allow: &Allow, who: Credentials) -> bool {
        if allow.uids.contains(&who.uid) || allow.gids.contains(&who.gid) {
            return true;
        }
        !allow.gids.is_empty()
            && self
                .identities
                .get(who.uid)
                .groups
                .iter()
                .any(|g| allow.gids.contains(g))
    }

    /// The bucket of `uid`, shared by all its connections; made full when the uid has none.
    fn bucket(&self, uid: u32) -> Arc<Bucket> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_CACHED && !buckets.contains_key(&uid) {
            // A bucket that no connection holds and that has filled up again is the same as a new one.
            let now = Instant::now();
            buckets.retain(|_, b| Arc::strong_count(b) > 1 || !b.is_full(now));
        }
        buckets.entry(uid).or_default().clone()
    }
}

fn describe(allow: &Allow) -> String {
    let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
    match (allow.uids.is_empty(), allow.gids.is_empty()) {
        (true, true) => "nobody".into(),
        (false, true) => format!("uids {}", list(&allow.uids)),
        (true, false) => format!("gids {}", list(&allow.gids)),
        (false, false) => format!("uids {} and gids {}", list(&allow.uids), list(&allow.gids)),
    }
}

/// A uid's token bucket.
#[derive(Debug)]
pub struct Bucket(Mutex<BucketState>);

#[derive(Debug)]
struct BucketState {
    tokens: f64,
    at: Instant,
    /// When the bucket is full again if nothing more is taken.
    full_at: Instant,
}

impl Default for Bucket {
    fn default() -> Bucket {
        let now = Instant::now();
        Bucket(Mutex::new(BucketState {
            // Full: capped to the burst at the first take.
            tokens: f64::INFINITY,
            at: now,
            full_at: now,
        }))
    }
}

impl Bucket {
    /// Takes one token at `now`; `Err(milliseconds until one is there)` when the bucket is empty.
    pub fn take(&self, rate: Rate, now: Instant) -> Result<(), u64> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(s.at).as_secs_f64();
        s.tokens = (s.tokens + elapsed * rate.per_sec).min(rate.burst);
        s.at = now;
        let taken = s.tokens >= 1.0;
        if taken {
            s.tokens -= 1.0;
        }
        s.full_at =
            now + Duration::from_secs_f64(((rate.burst - s.tokens) / rate.per_sec).max(0.0));
        if taken {
            Ok(())
        } else {
            Err((((1.0 - s.tokens) / rate.per_sec) * 1000.0).ceil().max(1.0) as u64)
        }
    }

    /// Puts one token back (at most up to the burst).
    pub fn give_back(&self, rate: Rate) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.tokens = (s.tokens + 1.0).min(rate.burst);
    }

    fn is_full(&self, now: Instant) -> bool {
        now >= self.0.lock().unwrap_or_else(|e| e.into_inner()).full_at
    }
}

/// A user as the user database has it: name and groups (the primary one included).
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// The user name of the uid, if it has one.
    pub name: Option<String>,
    /// The user's groups (`getgrouplist`), for group rules.
    pub groups: Vec<u32>,
}

/// Users' names and groups by uid, each looked up at most once per lifetime (so that group changes take effect
/// within it), at most [`MAX_CACHED`] uids.
pub struct Identities {
    lifetime: Duration,
    by_uid: Mutex<HashMap<u32, (Instant, Arc<Identity>)>>,
}

impl Identities {
    fn new(lifetime: Duration) -> Identities {
        Identities {
            lifetime,
            by_uid: Mutex::new(HashMap::new()),
        }
    }

    /// The identity of `uid`, from the cache or looked up now (outside the cache's lock).
    pub fn get(&self, uid: u32) -> Arc<Identity> {
        let now = Instant::now();
        if let Some((at, id)) = self.lock().get(&uid)
            && now.duration_since(*at) < self.lifetime
        {
            return id.clone();
        }
        let id = Arc::new(look_up(uid));
        let mut cache = self.lock();
        if cache.len() >= MAX_CACHED {
            let lifetime = self.lifetime;
            cache.retain(|_, (at, _)| now.duration_since(*at) < lifetime);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(uid, (now, id.clone()));
        id
    }

    /// ` (name)` for messages, or nothing when the uid has no name.
    fn named(&self, uid: u32) -> String {
        self.get(uid)
            .name
            .as_ref()
            .map_or_else(String::new, |n| format!(" ({n})"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, (Instant, Arc<Identity>)>> {
        self.by_uid.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The user database's answer for `uid`: its name and every group it belongs to (`getgrouplist`).
fn look_up(uid: u32) -> Identity {
    let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) else {
        return Identity::default();
    };
    let groups = CString::new(user.name.as_bytes())
        .ok()
        .and_then(|name| nix::unistd::getgrouplist(&name, user.gid).ok())
        .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_else(|| vec![user.gid.as_raw()]);
    Identity {
        name: Some(user.name),
        groups,
    }
}

/// Every refused line counted by code, and per uid for `forbidden`, `rate_limited` and `too_large`; connections
/// turned away by `limits.max_connections` count under `too_many_connections`.
pub struct Refusals {
    by_code: [AtomicU64; ErrorCode::ALL.len()],
    per_uid: Mutex<PerUid>,
    identities: Arc<Identities>,
}

#[derive(Default)]
struct PerUid {
    by_uid: HashMap<u32, UidCounts>,
    evicted: u64,
    /// Counts refusals: the order in which uids were last refused.
    clock: u64,
}

#[derive(Debug, Clone, Copy)]
struct UidCounts {
    forbidden: u64,
    rate_limited: u64,
    too_large: u64,
    last: SystemTime,
    /// [`PerUid::clock`] at the last refusal.
    order: u64,
}

/// The `refusals` object of `trail status`.
#[derive(Debug, Clone, Serialize)]
pub struct RefusalsReport {
    /// Refused lines (and connections) since start, by code, every code listed.
    pub by_code: ByCode,
    /// Per uid, the least recently refused first out when more than `max_uids` were refused.
    pub per_uid: Vec<UidReport>,
    /// Uids whose counts were forgotten to keep the table within `max_uids`.
    pub uids_evicted: u64,
    /// Most uids counted one by one.
    pub max_uids: usize,
}

/// Counts by error code, serialized as an object in the order of [`ErrorCode::ALL`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByCode(pub [u64; ErrorCode::ALL.len()]);

impl ByCode {
    /// The count of `code`.
    pub fn get(&self, code: ErrorCode) -> u64 {
        self.0[code.index()]
    }
}

impl Serialize for ByCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for code in ErrorCode::ALL {
            map.serialize_entry(code.as_str(), &self.0[code.index()])?;
        }
        map.end()
    }
}

/// One uid's refusals.
#[derive(Debug, Clone, Serialize)]
pub struct UidReport {
    /// The uid.
    pub uid: u32,
    /// Its user name, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Lines refused `forbidden`.
    pub forbidden: u64,
    /// Lines refused `rate_limited`.
    pub rate_limited: u64,
    /// Lines refused `too_large`.
    pub too_large: u64,
    /// The last refusal (RFC 3339, UTC).
    pub last_at: String,
}

impl Refusals {
    fn new(identities: Arc<Identities>) -> Refusals {
        Refusals {
            by_code: std::array::from_fn(|_| AtomicU64::new(0)),
            per_uid: Mutex::new(PerUid::default()),
            identities,
        }
    }

    /// Counts one refusal with `code`, of a line (or connection) of `uid` when known.
    pub fn count(&self, code: ErrorCode, uid: Option<u32>) {
        self.by_code[code.index()].fetch_add(1, Ordering::Relaxed);
        let Some(uid) = uid else { return };
        if !matches!(
            code,
            ErrorCode::Forbidden | ErrorCode::RateLimited | ErrorCode::TooLarge
        ) {
            return;
        }
        let now = crate::clock::now();
        let mut table = self.per_uid.lock().unwrap_or_else(|e| e.into_inner());
        if table.by_uid.len() >= MAX_UIDS && !table.by_uid.contains_key(&uid) {
            let oldest = table
                .by_uid
                .iter()
                .min_by_key(|(_, c)| c.order)
                .map(|(u, _)| *u);
            if let Some(oldest) = oldest {
                table.by_uid.remove(&oldest);
                table.evicted += 1;
            }
        }
        table.clock += 1;
        let order = table.clock;
        let counts = table.by_uid.entry(uid).or_insert(UidCounts {
            forbidden: 0,
            rate_limited: 0,
            too_large: 0,
            last: now,
            order,
        });
        (counts.last, counts.order) = (now, order);
        match code {
            ErrorCode::Forbidden => counts.forbidden += 1,
            ErrorCode::RateLimited => counts.rate_limited += 1,
            _ => counts.too_large += 1,
        }
    }

    /// How many uids had a line refused (`forbidden`, `rate_limited`, `too_large`) within `window` of now.
    pub fn uids_refused_within(&self, window: std::time::Duration) -> usize {
        let since = crate::clock::now() - window;
        let table = self.per_uid.lock().unwrap_or_else(|e| e.into_inner());
        table.by_uid.values().filter(|c| c.last >= since).count()
    }

    /// Every code's count.
    pub fn by_code(&self) -> ByCode {
        ByCode(std::array::from_fn(|i| {
            self.by_code[i].load(Ordering::Relaxed)
        }))
    }

    /// A snapshot: every code's count, and per uid (most recently refused first) with the user's name.
    pub fn report(&self) -> RefusalsReport {
        let by_code = self.by_code();
        let (mut uids, evicted): (Vec<(u32, UidCounts)>, u64) = {
            let table = self.per_uid.lock().unwrap_or_else(|e| e.into_inner());
            (
                table.by_uid.iter().map(|(u, c)| (*u, *c)).collect(),
                table.evicted,
            )
        };
        uids.sort_by_key(|u| std::cmp::Reverse(u.1.order));
        RefusalsReport {
            by_code,
            per_uid: uids
                .into_iter()
                .map(|(uid, c)| UidReport {
                    uid,
                    user: self.identities.get(uid).name.clone(),
                    forbidden: c.forbidden,
                    rate_limited: c.rate_limited,
                    too_large: c.too_large,
                    last_at: rfc3339(c.last),
                })
                .collect(),
            uids_evicted: evicted,
            max_uids: MAX_UIDS,
        }
    }
}

/// One `trail_submission_denied` record: the refusals of one uid, type and code it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// The event type that was refused.
    pub event_type: String,
    /// The peer's uid.
    pub uid: u32,
    /// Its user name, when it has one.
    pub user: Option<String>,
    /// The peer's gid at the first of these refusals.
    pub gid: u32,
    /// The peer's pid at the first of these refusals.
    pub pid: Option<i32>,
    /// `forbidden` or `rate_limited`.
    pub code: ErrorCode,
    /// How many refusals this record stands for (at least 1).
    pub count: u64,
    /// The first of them (RFC 3339, UTC).
    pub first_at: String,
    /// The last of them.
    pub last_at: String,
    /// `access.denied_record_interval`, in seconds.
    pub interval_secs: u64,
    /// The first one's answer.
    pub reason: String,
}

/// Refusals waiting to be recorded, aggregated per (uid, code, type): a key's first refusal opens an interval of
/// `access.denied_record_interval`; it and every refusal of the key until the interval ends are recorded together,
/// as one record with their count, when it ends; the next refusal opens the next interval. So a burst of refusals
/// is one record, there is at most one record per key per interval, and [`Denials::drain`] hands over what is
/// pending at a stop: none is lost.
pub struct Denials {
    open: Mutex<HashMap<(u32, ErrorCode), HashMap<String, Window>>>,
    wake: OnceLock<Box<dyn Fn() + Send + Sync>>,
    identities: Arc<Identities>,
}

#[derive(Debug)]
struct Window {
    /// When the interval ends.
    ends: Instant,
    interval: Duration,
    /// Refusals not recorded yet.
    count: u64,
    gid: u32,
    pid: Option<i32>,
    first_at: SystemTime,
    last_at: SystemTime,
    reason: String,
}

impl Denials {
    fn new(identities: Arc<Identities>) -> Denials {
        Denials {
            open: Mutex::new(HashMap::new()),
            wake: OnceLock::new(),
            identities,
        }
    }

    /// Sets what to call when a key's interval opens (the task that hands records to the auditor then waits for
    /// its end).
    pub fn on_due(&self, wake: impl Fn() + Send + Sync + 'static) {
        let _ = self.wake.set(Box::new(wake));
    }

    /// Notes one refusal; never blocks for long (one lock, a hash lookup).
    pub fn note(
        &self,
        who: Credentials,
        event_type: &str,
        code: ErrorCode,
        reason: &str,
        interval: Duration,
    ) {
        let now = (Instant::now(), crate::clock::now());
        let mut open = self.lock();
        let types = open.entry((who.uid, code)).or_default();
        if let Some(w) = types.get_mut(event_type) {
            w.count += 1;
            w.last_at = now.1;
            return;
        }
        types.insert(
            event_type.to_owned(),
            Window {
                ends: now.0 + interval,
                interval,
                count: 1,
                gid: who.gid,
                pid: who.pid,
                first_at: now.1,
                last_at: now.1,
                reason: reason.to_owned(),
            },
        );
        drop(open);
        if let Some(wake) = self.wake.get() {
            wake();
        }
    }

    /// The records of the intervals that ended by `now`; their keys are closed.
    pub fn due(&self, now: Instant) -> Vec<Denied> {
        let mut out = Vec::new();
        let mut open = self.lock();
        for (&(uid, code), types) in open.iter_mut() {
            types.retain(|ty, w| {
                if now < w.ends {
                    return true;
                }
                out.push(self.record(uid, code, ty, w));
                false
            });
        }
        open.retain(|_, types| !types.is_empty());
        out
    }

    /// When the next interval ends (`None`: none is open).
    pub fn next_due(&self) -> Option<Instant> {
        self.lock()
            .values()
            .flat_map(|t| t.values())
            .map(|w| w.ends)
            .min()
    }

    /// Every refusal not recorded yet, as records; nothing stays open (a clean stop).
    pub fn drain(&self) -> Vec<Denied> {
        let mut open = self.lock();
        let mut out = Vec::new();
        for ((uid, code), types) in open.drain() {
            for (ty, mut w) in types {
                if w.count > 0 {
                    out.push(self.record(uid, code, &ty, &mut w));
                }
            }
        }
        out
    }

    fn record(&self, uid: u32, code: ErrorCode, ty: &str, w: &mut Window) -> Denied {
        let count = std::mem::take(&mut w.count);
        Denied {
            event_type: ty.to_owned(),
            uid,
            user: self.identities.get(uid).name.clone(),
            gid: w.gid,
            pid: w.pid,
            code,
            count,
            first_at: rfc3339(w.first_at),
            last_at: rfc3339(w.last_at),
            interval_secs: w.interval.as_secs().max(1),
            reason: w.reason.clone(),
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(u32, ErrorCode), HashMap<String, Window>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn rfc3339(t: SystemTime) -> String {
    let mut out = Vec::new();
    crate::record::write_rfc3339(&mut out, t);
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn registry() -> Registry {
        let def = |name: &str| {
            (
                PathBuf::from(format!("{name}.yml")),
                format!("name: {name}\ndescription: d\nsaved_to_database: true\nstreamed: false\n"),
            )
        };
        Registry::from_sources(
            [
                "user_login",
                "user_logout",
                "project.deleted",
                "role_granted",
            ]
            .into_iter()
            .map(def)
            .collect(),
        )
        .unwrap()
    }

    fn policy(access: &str) -> Policy {
        let text = format!(
            "socket: {{path: /run/t.sock}}\nevent_types: t\nlog: {{dir: /l}}\naccess: {access}\n"
        );
        let config = Config::parse(&text, Path::new("trail.yaml"), Path::new("/")).unwrap();
        Policy::build(&config, &registry())
    }

    #[test]
    fn the_first_matching_rule_decides_and_unmatched_types_are_open() {
        let access = Access::new();
        let check = |rules: &str, ty: &str, (uid, gid): (u32, u32), expected: &str| {
            let policy = policy(&format!("{{rules: {rules}}}"));
            let registry = registry();
            let ty = registry.get(ty).unwrap();
            let line = format!(r#"{{"type":"{}"}}"#, ty.name);
            let mut event = crate::protocol::parse(line.as_bytes()).unwrap();
            let who = Credentials {
                uid,
                gid,
                pid: None,
            };
            let got = match access.admit(&policy, ty, &mut event, who) {
                Ok(()) => "ok".to_owned(),
                Err(r) => format!("{} rule {:?}", r.code.as_str(), policy.rule_of(&ty.name)),
            };
            assert_eq!(got, expected, "{rules} {} {uid}:{gid}", ty.name);
        };
        let rules = "[{types: ['user_*'], uids: [1000]}, {types: ['*'], gids: [50]}]";
        check(rules, "user_login", (1000, 1000), "ok");
        check(rules, "user_login", (1001, 50), "forbidden rule Some(0)");
        check(rules, "role_granted", (1001, 50), "ok");
        check(
            rules,
            "role_granted",
            (1000, 1000),
            "forbidden rule Some(1)",
        );
        check(
            "[{types: ['project:*'], uids: [0]}]",
            "project.deleted",
            (0, 0),
            "ok",
        );
        check(
            "[{types: ['project:*'], uids: [0]}]",
            "project.deleted",
            (7, 7),
            "forbidden rule Some(0)",
        );
        // Types no rule covers are open to everyone; excluded ones fall through to the next rule.
        check(
            "[{types: ['project.*'], uids: [0]}]",
            "user_login",
            (7, 7),
            "ok",
        );
        check(
            "[{types: ['*', '!user_*'], uids: [0]}, {types: ['user_login'], uids: [7]}]",
            "user_login",
            (7, 7),
            "ok",
        );
        check(
            "[{types: ['*', '!user_*'], uids: [0]}, {types: ['user_login'], uids: [7]}]",
            "user_logout",
            (7, 7),
            "ok",
        );
        check(
            "[{types: ['*', '!user_*'], uids: [0]}]",
            "role_granted",
            (7, 7),
            "forbidden rule Some(0)",
        );
        // A rule that names nobody reserves its types.
        check(
            "[{types: [role_granted]}]",
            "role_granted",
            (0, 0),
            "forbidden rule Some(0)",
        );
        check("[]", "role_granted", (7, 7), "ok");
        // Root's user name: resolved to uid 0 at load.
        check(
            "[{types: ['*'], users: [root]}]",
            "user_login",
            (0, 5),
            "ok",
        );
        check(
            "[{types: ['*'], groups: [root]}]",
            "user_login",
            (5, 0),
            "ok",
        );
    }

    #[test]
    fn membership_comes_from_the_user_database() {
        // Root is a member of group root (gid 0) by its passwd entry, whatever gid its process runs with.
        let access = Access::new();
        let allow = Allow {
            rule: 0,
            uids: vec![],
            gids: vec![0],
        };
        assert!(access.allows(
            &allow,
            Credentials {
                uid: 0,
                gid: 12345,
                pid: None
            }
        ));
        // A uid without a passwd entry is a member of nothing but its primary gid.
        assert!(!access.allows(
            &allow,
            Credentials {
                uid: 4_000_000_001,
                gid: 12345,
                pid: None
            }
        ));
        assert!(access.allows(
            &allow,
            Credentials {
                uid: 4_000_000_001,
                gid: 0,
                pid: None
            }
        ));
    }

    #[test]
    fn buckets() {
        let rate = Rate {
            per_sec: 10.0,
            burst: 3.0,
        };
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let bucket = Bucket::default();
        let check = |ms: u64, expected: Result<(), u64>| {
            assert_eq!(bucket.take(rate, at(ms)), expected, "at {ms} ms");
        };
        check(0, Ok(()));
        check(0, Ok(()));
        check(0, Ok(()));
        check(0, Err(100));
        check(50, Err(50));
        check(100, Ok(()));
        check(100, Err(100));
        // Refilled to the burst, never beyond.
        check(10_000, Ok(()));
        check(10_000, Ok(()));
        check(10_000, Ok(()));
        check(10_000, Err(100));
        bucket.give_back(rate);
        check(10_000, Ok(()));
        check(10_000, Err(100));
        assert!(!bucket.is_full(at(10_000)));
        assert!(bucket.is_full(at(10_300)));
    }

    #[test]
    fn refusals_are_aggregated_per_uid_type_and_code() {
        let denials = Denials::new(Arc::new(Identities::new(IDENTITY_LIFETIME)));
        let who = |uid| Credentials {
            uid,
            gid: 5,
            pid: Some(9),
        };
        let interval = Duration::from_secs(60);
        let t0 = Instant::now();
        let note = |uid, ty: &str, code| denials.note(who(uid), ty, code, "no", interval);
        let summary = |records: Vec<Denied>| {
            let mut v: Vec<String> = records
                .iter()
                .map(|d| format!("{} {} {} {}", d.uid, d.event_type, d.code.as_str(), d.count))
                .collect();
            v.sort();
            v
        };
        for _ in 0..5 {
            note(1, "a", ErrorCode::Forbidden);
        }
        note(1, "b", ErrorCode::Forbidden);
        note(1, "a", ErrorCode::RateLimited);
        note(2, "a", ErrorCode::Forbidden);
        // Nothing before the intervals end; then one record per key with its count.
        assert!(denials.due(t0).is_empty());
        let due = denials.next_due().unwrap();
        assert!(due > t0 && due <= Instant::now() + interval, "{due:?}");
        let end = Instant::now() + interval;
        assert_eq!(
            summary(denials.due(end)),
            [
                "1 a forbidden 5",
                "1 a rate_limited 1",
                "1 b forbidden 1",
                "2 a forbidden 1"
            ]
        );
        assert!(denials.due(end).is_empty());
        assert!(denials.next_due().is_none());
        // The next refusal opens the next interval.
        note(1, "a", ErrorCode::Forbidden);
        note(1, "a", ErrorCode::Forbidden);
        assert!(denials.due(end - Duration::from_secs(1)).is_empty());
        // A stop takes what is pending, whenever its interval would end.
        assert_eq!(summary(denials.drain()), ["1 a forbidden 2"]);
        assert!(denials.next_due().is_none());
        assert!(denials.drain().is_empty());
    }

    #[test]
    fn refusals_are_counted_by_code_and_per_uid_within_a_bound() {
        let refusals = Refusals::new(Arc::new(Identities::new(IDENTITY_LIFETIME)));
        refusals.count(ErrorCode::Forbidden, Some(7));
        refusals.count(ErrorCode::TooLarge, Some(7));
        refusals.count(ErrorCode::InvalidJson, Some(7));
        refusals.count(ErrorCode::TooManyConnections, None);
        for uid in 0..(MAX_UIDS as u32 + 5) {
            refusals.count(ErrorCode::RateLimited, Some(10_000 + uid));
        }
        let report = refusals.report();
        assert_eq!(report.by_code.get(ErrorCode::Forbidden), 1);
        assert_eq!(report.by_code.get(ErrorCode::InvalidJson), 1);
        assert_eq!(report.by_code.get(ErrorCode::TooManyConnections), 1);
        assert_eq!(
            report.by_code.get(ErrorCode::RateLimited),
            MAX_UIDS as u64 + 5
        );
        assert_eq!(report.per_uid.len(), MAX_UIDS);
        assert_eq!(report.uids_evicted, 6);
        // uid 7 was refused first: the first to go.
        assert!(report.per_uid.iter().all(|u| u.uid != 7));
        let json = serde_json::to_string(&report.by_code).unwrap();
        assert!(
            json.starts_with(r#"{"invalid_json":1,"invalid_event":0,"#),
            "{json}"
        );
    }
}
