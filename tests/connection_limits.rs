//! Bounds across connections: how many may be open, how long one may sit idle, how many bytes of unfinished lines
//! all of them together may hold, and what happens when the daemon runs out of file descriptors.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::{Daemon, Setup, login, trail, wait_until};

fn with_limits(limits: &str) -> Daemon {
    Daemon::with(Setup {
        extra_config: format!("limits: {{{limits}}}\n"),
        ..Setup::default()
    })
}

fn connections(daemon: &Daemon) -> Value {
    daemon.admin(json!({"command": "status"}))["connections"].clone()
}

/// A raw connection whose reads give up after a generous deadline instead of hanging the test.
fn raw(daemon: &Daemon) -> UnixStream {
    let s = UnixStream::connect(&daemon.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

/// Reads until the daemon closes the connection; what it sent, or the error that ended the wait.
fn read_to_close(s: &mut UnixStream) -> Result<String, std::io::Error> {
    let mut text = String::new();
    s.read_to_string(&mut text).map(|_| text)
}

#[test]
fn clients_beyond_max_connections_get_a_clear_answer_and_are_closed() {
    let daemon = with_limits("max_connections: 3");
    // The harness's probe that saw the socket accept may still be counted for a moment: once a later client is
    // answered the probe has been accepted (the backlog is in order), and then its end is awaited.
    assert_eq!(
        daemon.client().emit(&login("first")).unwrap()["ok"],
        json!(true)
    );
    assert!(wait_until(Duration::from_secs(30), || connections(&daemon)
        ["open"]
        == json!(0)));
    let mut open: Vec<_> = (0..3).map(|_| daemon.client()).collect();
    for (i, c) in open.iter_mut().enumerate() {
        let answer = c.emit(&login(&format!("{i}"))).unwrap();
        assert_eq!(answer["ok"], json!(true), "{answer}");
    }
    assert!(wait_until(Duration::from_secs(30), || connections(&daemon)
        ["open"]
        == json!(3)));

    // The fourth gets one line saying why, then the end of the connection.
    let mut extra = raw(&daemon);
    let text = read_to_close(&mut extra).expect("the daemon closes the extra connection");
    let answer: Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(answer["ok"], json!(false));
    assert_eq!(
        answer["error"]["code"],
        json!("too_many_connections"),
        "{text}"
    );
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_connections"),
        "{text}"
    );
    // `trail emit` shows that answer too, and exits 75 (EX_TEMPFAIL: try again later).
    let (code, out, err) = trail(
        &[
            "emit",
            "--socket",
            daemon.socket.to_str().unwrap(),
            "--type",
            "user_logout",
        ],
        "",
    );
    assert_eq!(code, 75, "{out}{err}");
    assert!(out.contains("too_many_connections"), "{out}{err}");

    // Once one closes, a new client is served.
    drop(open.pop());
    assert!(wait_until(Duration::from_secs(30), || connections(&daemon)
        ["open"]
        == json!(2)));
    let mut c = daemon.client();
    assert_eq!(c.emit(&login("after")).unwrap()["ok"], json!(true));
    let status = connections(&daemon);
    assert_eq!(status["max"], json!(3));
    assert!(status["refused"].as_u64().unwrap() >= 2, "{status}");
    assert!(
        daemon.stderr().contains("too many connections"),
        "{}",
        daemon.stderr()
    );
    assert_eq!(daemon.records().len(), 5);
}

#[test]
fn idle_connections_are_closed_after_the_timeout() {
    // Long enough that a loaded machine's pause between connecting and writing, or between one answer and the
    // next request, never reaches it; short enough to keep the test quick.
    let daemon = with_limits("idle_timeout: 3s");
    // One that never sends anything, one that stops in the middle of a line.
    let mut silent = raw(&daemon);
    let mut stalled = raw(&daemon);
    stalled.write_all(b"{\"type\": \"user_lo").unwrap();
    for s in [&mut silent, &mut stalled] {
        let text = read_to_close(s).expect("the daemon closes an idle connection");
        assert_eq!(text, "", "nothing is answered for an unfinished line");
    }
    let status = connections(&daemon);
    assert!(status["idle_closed"].as_u64().unwrap() >= 2, "{status}");
    assert!(wait_until(Duration::from_secs(30), || connections(&daemon)
        ["open"]
        == json!(0)));
    // A connection that keeps talking is served; its answers came before any timeout.
    let mut c = daemon.client();
    for i in 0..3 {
        let answer = c.emit(&login(&format!("{i}"))).unwrap();
        assert_eq!(answer["ok"], json!(true), "{answer}");
    }
    assert!(daemon.records().len() == 3);
}

/// The daemon's peak resident memory (VmHWM) in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

#[test]
fn unfinished_long_lines_stay_within_the_buffer_budget() {
    const CONNECTIONS: usize = 200;
    const BUDGET: u64 = 12 << 20;
    let daemon = with_limits(&format!(
        "max_line_bytes: 1MiB, max_connections: 256, max_buffered_bytes: {BUDGET}"
    ));
    // Each connection sends most of a 1 MiB event (valid JSON once finished) and no newline.
    let head = b"{\"type\": \"user_login\", \"actor\": {\"id\": \"u-1\"}, \"message\": \"";
    let mut line = head.to_vec();
    line.resize((1 << 20) - 16, b'x');
    let mut conns: Vec<(UnixStream, usize)> = (0..CONNECTIONS)
        .map(|_| {
            let s = UnixStream::connect(&daemon.socket).unwrap();
            s.set_nonblocking(true).unwrap();
            (s, 0)
        })
        .collect();
    // Write as much as the daemon takes, until every line is sent or nothing moved for a while.
    let mut last_progress = Instant::now();
    wait_until(Duration::from_secs(120), || {
        let mut moved = false;
        for (s, sent) in conns.iter_mut() {
            while *sent < line.len() {
                match s.write(&line[*sent..]) {
                    Ok(n) => {
                        *sent += n;
                        moved = true;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("write: {e}"),
                }
            }
        }
        if moved {
            last_progress = Instant::now();
        }
        conns.iter().all(|(_, sent)| *sent == line.len())
            || last_progress.elapsed() > Duration::from_secs(3)
    });
    let peak = peak_rss(daemon.pid());
    let status = connections(&daemon);
    eprintln!(
        "peak rss {} MiB with {CONNECTIONS} unfinished lines; status {status}",
        peak >> 20
    );
    assert!(
        peak < (64 << 20) + BUDGET,
        "peak RSS {} MiB is over 64 MiB + the 12 MiB budget; status {status}",
        peak >> 20
    );
    assert!(
        status["buffered_bytes"].as_u64().unwrap() <= BUDGET,
        "{status}"
    );
    assert!(
        status["waiting_for_buffer"].as_u64().unwrap() > 0,
        "{status}"
    );

    // A new client with ordinary events is served meanwhile.
    let started = Instant::now();
    let mut good = daemon.client();
    assert_eq!(
        good.emit(&login("still served")).unwrap()["ok"],
        json!(true)
    );
    eprintln!("a new client was answered in {:?}", started.elapsed());

    // A waiting line is not refused: once the others are gone it is read whole and stored.
    let (mut waiting, sent) = conns.pop().unwrap();
    drop(conns);
    waiting.set_nonblocking(false).unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    waiting.write_all(&line[sent..]).unwrap();
    waiting.write_all(b"\"}\n").unwrap();
    let mut answer = String::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with('\n') {
        assert_eq!(
            waiting.read(&mut byte).unwrap(),
            1,
            "closed early: {answer}"
        );
        answer.push(byte[0] as char);
    }
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["ok"], json!(true), "{answer}");
    assert!(peak_rss(daemon.pid()) < (64 << 20) + BUDGET);
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses): utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn open_descriptors(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64
}

#[test]
fn running_out_of_descriptors_neither_spins_nor_floods_the_log() {
    let daemon = Daemon::start();
    let pid = daemon.pid();
    let limit = open_descriptors(pid) + 16;
    let rlimit = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    assert_eq!(
        unsafe {
            libc::prlimit(
                pid as i32,
                libc::RLIMIT_NOFILE,
                &rlimit,
                std::ptr::null_mut(),
            )
        },
        0
    );
    // Idle connections until the daemon has no descriptor left; more wait in the backlog.
    let idle: Vec<UnixStream> = (0..40)
        .map(|_| UnixStream::connect(&daemon.socket).unwrap())
        .collect();
    assert!(
        wait_until(Duration::from_secs(30), || daemon
            .stderr()
            .contains("accept failed")),
        "{}",
        daemon.stderr()
    );
    // A submission and an admin request that cannot be accepted for now.
    let (tx, rx) = std::sync::mpsc::channel();
    let (socket, admin) = (daemon.socket.clone(), daemon.path("admin.sock"));
    let emitted = tx.clone();
    std::thread::spawn(move || {
        let answer = trail::client::Client::connect(&socket)
            .map_err(std::io::Error::from)
            .and_then(|mut c| c.emit(&login("late")));
        let _ = emitted.send(("emit", answer.map_err(|e| e.to_string())));
    });
    std::thread::spawn(move || {
        let answer = trail::client::admin(&admin, &json!({"command": "status"}));
        let _ = tx.send(("status", answer.map_err(|e| e.to_string())));
    });
    // Over a short window the daemon must neither spin nor write a line per attempt.
    let window = Duration::from_secs(2);
    let before = cpu_ticks(pid);
    std::thread::sleep(window);
    let used = cpu_ticks(pid) - before;
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let failures = daemon.stderr().matches("accept failed").count();
    assert!(failures <= 6, "{failures} accept failures logged");
    assert!(
        used * 2 < window.as_secs() * ticks_per_second,
        "the daemon used {used} ticks of CPU in {window:?} while out of descriptors"
    );
    // Once descriptors are free again, the waiting clients are served.
    drop(idle);
    for _ in 0..2 {
        let (what, answer) = rx.recv_timeout(Duration::from_secs(60)).expect("answered");
        let answer = answer.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(answer["ok"], json!(true), "{what}: {answer}");
    }
}
