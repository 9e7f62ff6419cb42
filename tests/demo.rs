//! `egress-scaler demo` as a user runs it: a clean run that records every room once and
//! leaves no process behind, Ctrl-C, and the errors of bad flags and a missing redis-server.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BINARY: &str = env!("CARGO_BIN_EXE_egress-scaler");

/// The redis-server pid and port from the header line
/// `real      redis-server pid N on 127.0.0.1:PORT, ...`.
fn redis_of(output: &str) -> (u32, u16) {
    let line = output
        .lines()
        .find(|line| line.contains("redis-server pid "))
        .unwrap_or_else(|| panic!("no redis-server line in:\n{output}"));
    let after_pid = &line[line.find("pid ").unwrap() + 4..];
    let pid = after_pid
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let after_host = &line[line.find("127.0.0.1:").unwrap() + 10..];
    let port = after_host
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap();
    (pid, port)
}

/// The process is gone (not even a zombie) and nothing listens on its port.
fn assert_redis_gone(pid: u32, port: u16) {
    let alive = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| cmdline.contains("redis-server"));
    assert!(!alive, "redis-server pid {pid} is still there");
    assert!(
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).is_err(),
        "something still listens on the demo's redis port {port}"
    );
}

#[test]
fn a_small_demo_records_every_room_once_and_cleans_up() {
    let started = Instant::now();
    let output = Command::new(BINARY)
        .args(["demo", "--rooms", "6", "--cold-start", "1", "--seed", "11"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{:?}\n{stdout}\n{stderr}",
        output.status
    );
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
    for expected in [
        "stand-in  livekit-server",
        "stand-in  egress pods",
        "stand-in  KEDA and its HPA",
        "real      egress-scaler serve",
        "rooms:            6",
        "duplicates:       1 of 1 repeated requests answered duplicate",
        "recordings:       6 started",
        "lost:             0",
        "duplicated:       0",
        "ended in time:    6 of 6",
        "0 left at the end",
        "Result: every room was recorded exactly once.",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }
    // Not a terminal: no escape sequences, and the KEDA stand-in scaled from 0 and back.
    assert!(!stdout.contains('\x1b'), "{stdout}");
    assert!(stdout.contains("0 -> 1 replica(s)"), "{stdout}");
    assert!(stdout.contains("-> 0 replica(s)"), "{stdout}");
    let (pid, port) = redis_of(&stdout);
    assert_redis_gone(pid, port);
}

#[test]
fn ctrl_c_stops_the_demo_and_its_redis_server() {
    let mut child = Command::new(BINARY)
        .args(["demo", "--rooms", "4", "--plain"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    // Wait until the KEDA/HPA stand-in has scaled, so that everything has started.
    while !seen.contains("replica(s)") {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "{seen}");
        seen.push_str(&line);
    }
    let (pid, port) = redis_of(&seen);
    let interrupted = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let started = Instant::now();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(status.code(), Some(130), "{seen}{rest}");
    assert!(rest.contains("interrupted before the end"), "{rest}");
    assert_redis_gone(pid, port);
}

#[test]
fn a_bad_flag_value_exits_with_one_line_naming_it() {
    for (args, setting) in [
        (vec!["--rooms", "0"], "--rooms"),
        (vec!["--rooms", "101"], "--rooms"),
        (vec!["--cold-start", "11"], "--cold-start"),
        (vec!["--cold-start=-1"], "--cold-start"),
        (vec!["--cold-start", "NaN"], "--cold-start"),
    ] {
        let output = Command::new(BINARY)
            .arg("demo")
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(setting), "{stderr}");
        assert!(output.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn a_missing_redis_server_says_how_to_install_it() {
    let empty = std::env::temp_dir().join(format!("egress-scaler-no-redis-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let output = Command::new(BINARY)
        .args(["demo", "--rooms", "1"])
        .env("PATH", &empty)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&empty).unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("redis-server"), "{stderr}");
    assert!(stderr.contains("apt-get install redis-server"), "{stderr}");
}
