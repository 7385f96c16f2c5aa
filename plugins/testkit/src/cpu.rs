//! CPU time of the parties of a benchmark, read from Linux's `/proc/<pid>/stat`: the process that hosts the
//! plugin (the benchmark itself, [`own`]) and the server it writes to ([`tree`]: a server that forks a process
//! per connection, as PostgreSQL does, is counted with its live descendants). A [`Meter`] takes a reading of
//! each party before a run and after it and reports the CPU each used per event.
//!
//! The figures have the kernel's resolution (`USER_HZ`, 10 ms on Linux): runs of a few seconds are needed for
//! two significant digits. A descendant that exits during a run takes its time with it (the kernel adds it to
//! its parent only once the parent waits for it), so a meter over a server must be read while its connections
//! are open.

use std::{
    collections::HashMap,
    fmt, fs, io,
    time::{Duration, Instant},
};

/// User and system CPU time used so far by process `pid`, all its threads included (its children not).
pub fn process(pid: u32) -> io::Result<Duration> {
    let stat = Stat::read(pid)?;
    Ok(ticks(stat.utime + stat.stime))
}

/// User and system CPU time used so far by this process: the plugin and the host side of the test kit.
pub fn own() -> Duration {
    process(std::process::id()).expect("reading /proc/self/stat")
}

/// User and system CPU time used so far by process `pid` and every descendant of it that is alive now.
pub fn tree(pid: u32) -> io::Result<Duration> {
    let root = Stat::read(pid)?;
    let mut children: HashMap<u32, Vec<(u32, u64)>> = HashMap::new();
    for entry in fs::read_dir("/proc")? {
        let Some(other) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may end between listing and reading: it is not counted.
        if let Ok(stat) = Stat::read(other) {
            children
                .entry(stat.ppid)
                .or_default()
                .push((other, stat.utime + stat.stime));
        }
    }
    let mut total = root.utime + root.stime;
    let mut stack = vec![pid];
    while let Some(parent) = stack.pop() {
        for &(child, used) in children.get(&parent).map(Vec::as_slice).unwrap_or_default() {
            total += used;
            stack.push(child);
        }
    }
    Ok(ticks(total))
}

/// The fields of `/proc/<pid>/stat` a meter needs.
struct Stat {
    ppid: u32,
    utime: u64,
    stime: u64,
}

impl Stat {
    fn read(pid: u32) -> io::Result<Self> {
        let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
        Self::parse(&text).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("/proc/{pid}/stat: unexpected contents {text:?}"),
            )
        })
    }

    /// `pid (comm) state ppid …`: the command name may hold spaces and parentheses, so fields are counted
    /// from its last `)`. After it come field 3 (state), 4 (ppid), …, 14 (utime), 15 (stime).
    fn parse(text: &str) -> Option<Self> {
        let rest = &text[text.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(Self {
            ppid: u32::try_from(field(4)?).ok()?,
            utime: field(14)?,
            stime: field(15)?,
        })
    }
}

fn ticks(n: u64) -> Duration {
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&hz| hz > 0).unwrap_or(100);
    Duration::from_nanos(n.saturating_mul(1_000_000_000) / hz)
}

/// How one party is read.
#[derive(Clone, Copy, Debug)]
pub enum Party {
    /// This process (the plugin, loaded in it): [`own`].
    Own,
    /// A process and its live descendants: [`tree`].
    Tree(u32),
}

impl Party {
    fn read(self) -> io::Result<Duration> {
        match self {
            Self::Own => Ok(own()),
            Self::Tree(pid) => tree(pid),
        }
    }
}

/// Readings of several parties' CPU time from the start of a run.
pub struct Meter {
    parties: Vec<(String, Party, Duration)>,
    started: Instant,
}

impl Meter {
    /// Takes the first reading of each named party.
    pub fn start(parties: &[(&str, Party)]) -> Self {
        let parties = parties
            .iter()
            .map(|&(name, party)| {
                let at = party
                    .read()
                    .unwrap_or_else(|e| panic!("reading the CPU time of {name}: {e}"));
                (name.to_owned(), party, at)
            })
            .collect();
        Self {
            parties,
            started: Instant::now(),
        }
    }

    /// Takes the second reading: what each party used since [`Meter::start`], for `events` events.
    pub fn stop(&self, events: u64) -> Usage {
        let elapsed = self.started.elapsed();
        let parties = self
            .parties
            .iter()
            .map(|(name, party, at)| {
                let now = party
                    .read()
                    .unwrap_or_else(|e| panic!("reading the CPU time of {name}: {e}"));
                (name.clone(), now.saturating_sub(*at))
            })
            .collect();
        Usage {
            elapsed,
            events,
            parties,
        }
    }
}

/// What a run used: wall time and each party's CPU time.
#[derive(Clone, Debug)]
pub struct Usage {
    /// Wall-clock time of the run.
    pub elapsed: Duration,
    /// Events the run handled.
    pub events: u64,
    /// Each party's name and CPU time in the run.
    pub parties: Vec<(String, Duration)>,
}

impl Usage {
    /// Events per second of wall time.
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    /// CPU time of party `name` per event, in microseconds.
    pub fn micros_per_event(&self, name: &str) -> Option<f64> {
        let (_, used) = self.parties.iter().find(|(n, _)| n == name)?;
        Some(used.as_secs_f64() * 1e6 / self.events.max(1) as f64)
    }
}

/// `plugin 3.10 s CPU per 100k events (31.0 µs/event, 0.62 of a core), server …`.
impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, used)) in self.parties.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            let per_event = used.as_secs_f64() * 1e6 / self.events.max(1) as f64;
            write!(
                f,
                "{name} {:.2} s CPU per 100k events ({per_event:.1} µs/event, {:.2} of a core)",
                per_event / 10.0,
                used.as_secs_f64() / self.elapsed.as_secs_f64()
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: Option<(u32, u64, u64)>) {
        let parsed = Stat::parse(text).map(|s| (s.ppid, s.utime, s.stime));
        assert_eq!(parsed, expected, "{text:?}");
    }

    #[test]
    fn stat_lines() {
        let tail = "S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18";
        check(&format!("42 (cat) {tail}"), Some((1, 11, 12)));
        check(&format!("42 (a b) (c)) {tail}"), Some((1, 11, 12)));
        check("42 (cat) S 1 2", None);
        check("42 cat S 1 2 3 4 5 6 7 8 9 10 11 12 13", None);
        check(&format!("42 (cat) S x {}", &tail[4..]), None);
    }

    #[test]
    fn own_time_grows_with_work_and_a_tree_holds_its_children() {
        let before = own();
        let mut x = 0u64;
        let deadline = Instant::now() + Duration::from_secs(60);
        // Busy until the kernel has counted at least one more tick for this process.
        while own() <= before && Instant::now() < deadline {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        assert!(own() > before, "{x}");
        let me = std::process::id();
        assert!(tree(me).unwrap() >= process(me).unwrap());
        assert!(process(u32::MAX).is_err());
    }
}
