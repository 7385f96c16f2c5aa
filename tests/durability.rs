//! Durability: restarts, crashes, torn tails and orderly shutdown.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

use serde_json::{Value, json};

use crate::util::{Daemon, login};

fn log_file(daemon: &Daemon) -> std::path::PathBuf {
    let mut files: Vec<_> = std::fs::read_dir(&daemon.log_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    files.pop().unwrap()
}

#[test]
fn restart_continues_seq() {
    let mut daemon = Daemon::start();
    for i in 0..3 {
        assert_eq!(
            daemon.client().emit(&login(&i.to_string())).unwrap()["seq"],
            // After the start record, seq 1.
            json!(i + 2)
        );
    }
    assert!(daemon.stop().success(), "{}", daemon.stderr());
    daemon.spawn();
    // After the second start's record, seq 5.
    assert_eq!(daemon.client().emit(&login("3")).unwrap()["seq"], json!(6));
    let seqs: Vec<Value> = daemon.records().iter().map(|r| r["seq"].clone()).collect();
    assert_eq!(seqs, [json!(2), json!(3), json!(4), json!(6)]);
}

#[test]
fn a_torn_tail_is_cut_and_kept_aside() {
    let mut daemon = Daemon::start();
    daemon.client().emit(&login("a")).unwrap();
    daemon.client().emit(&login("b")).unwrap();
    assert!(daemon.stop().success());
    let file = log_file(&daemon);
    let good_len = std::fs::metadata(&file).unwrap().len();
    let torn = br#"{"seq":4,"id":"0193","received_at":"2026-"#;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap()
        .write_all(torn)
        .unwrap();
    daemon.spawn();
    let stderr = daemon.stderr();
    assert!(
        stderr.contains("torn") && stderr.contains(&format!("offset={good_len}")),
        "{stderr}"
    );
    let answer = daemon.client().emit(&login("c")).unwrap();
    // The start records are seq 1 and 4.
    assert_eq!(answer["seq"], json!(5));
    let messages: Vec<Value> = daemon
        .records()
        .iter()
        .map(|r| r["message"].clone())
        .collect();
    assert_eq!(messages, [json!("a"), json!("b"), json!("c")]);
    let aside: Vec<_> = std::fs::read_dir(&daemon.log_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".torn-"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(std::fs::read(&aside[0]).unwrap(), torn);
}

#[test]
fn kill_9_under_load_loses_no_acknowledged_event() {
    let mut daemon = Daemon::start();
    let socket = daemon.socket.clone();
    let acks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients: Vec<_> = (0..4)
        .map(|conn| {
            let socket = socket.clone();
            let acks = acks.clone();
            std::thread::spawn(move || {
                let stream = UnixStream::connect(&socket).unwrap();
                let mut writer = stream.try_clone().unwrap();
                std::thread::spawn(move || {
                    let mut i = 0u64;
                    loop {
                        let mut chunk = Vec::new();
                        for _ in 0..100 {
                            serde_json::to_writer(&mut chunk, &login(&format!("{conn}:{i}")))
                                .unwrap();
                            chunk.push(b'\n');
                            i += 1;
                        }
                        if writer.write_all(&chunk).is_err() {
                            return;
                        }
                    }
                });
                let mut acked = Vec::new();
                for line in BufReader::new(stream).split(b'\n') {
                    let Ok(line) = line else { break };
                    // The crash may cut the last answer short: an answer not received whole is no acknowledgement.
                    let Ok(a) = serde_json::from_slice::<Value>(&line) else {
                        break;
                    };
                    assert_eq!(a["ok"], json!(true), "{a}");
                    acked.push(a["seq"].as_u64().unwrap());
                    acks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                acked
            })
        })
        .collect();
    // Let a good amount be acknowledged, then crash the daemon mid-stream.
    let enough = crate::util::wait_until(std::time::Duration::from_secs(60), || {
        acks.load(std::sync::atomic::Ordering::Relaxed) > 5_000
    });
    assert!(enough, "the load did not get going");
    daemon.kill9();
    let acked: Vec<u64> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert!(acked.len() > 5_000, "only {} acknowledged", acked.len());
    daemon.spawn();
    let seqs: Vec<u64> = daemon
        .all_log_lines()
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "seq has gaps or repeats"
    );
    let stored: HashSet<u64> = seqs.iter().copied().collect();
    let missing: Vec<_> = acked.iter().filter(|s| !stored.contains(s)).collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    let next = daemon.client().emit(&login("after")).unwrap();
    assert_eq!(next["seq"], json!(seqs.last().unwrap() + 1));
}

#[test]
fn sigterm_answers_what_was_read_and_exits_cleanly() {
    let mut daemon = Daemon::start();
    let stream = UnixStream::connect(&daemon.socket).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut input = Vec::new();
    for i in 0..20_000 {
        serde_json::to_writer(&mut input, &login(&i.to_string())).unwrap();
        input.push(b'\n');
    }
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&input);
    });
    let mut reader = BufReader::new(stream);
    let mut answers = Vec::new();
    let mut line = String::new();
    // Stop the daemon once it has answered something, while it still has work in flight.
    reader.read_line(&mut line).unwrap();
    answers.push(line.clone());
    daemon.signal(libc::SIGTERM);
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        answers.push(line.clone());
    }
    let status = daemon.wait();
    assert!(status.success(), "{status}: {}", daemon.stderr());
    drop(sender);
    let stored: HashSet<u64> = daemon
        .records()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    for a in &answers {
        let a: Value = serde_json::from_str(a).unwrap();
        assert_eq!(a["ok"], json!(true), "{a}");
        assert!(stored.contains(&a["seq"].as_u64().unwrap()));
    }
    assert!(
        !daemon.socket.exists(),
        "the socket file is removed on exit"
    );
}
