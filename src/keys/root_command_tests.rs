//! Unit tests of the process runner, outside any backend (plain `#[test]`s,
//! run by `cargo pgrx test` with the rest). The same contract inside a real
//! backend is tested in tests/python/test_root_command.py.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::{run, Failure, Outcome, Tail, MAX_OUTPUT, TAIL};

fn never() -> bool {
    false
}

fn output(outcome: Outcome) -> String {
    match outcome.result {
        Ok(out) => String::from_utf8(out.to_vec()).unwrap(),
        Err(e) => panic!("command failed: {e:?}"),
    }
}

/// Processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(marker) {
            found.push(cmdline);
        }
    }
    found
}

fn unique_sleep(seconds: u32) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "sleep {seconds}.{:06}{}",
        nanos % 1_000_000,
        std::process::id() % 1000
    )
}

#[test]
fn output_and_exit_status() {
    let out = output(run(
        "printf 'ab'; printf 'c'",
        Duration::from_secs(5),
        never,
    ));
    assert_eq!(out, "abc");
    // stdin is /dev/null: cat ends at once.
    assert_eq!(output(run("cat", Duration::from_secs(5), never)), "");
    match run("exit 3", Duration::from_secs(5), never).result {
        Err(Failure::Exit(status)) => assert_eq!(status.code(), Some(3)),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[test]
fn too_much_output_is_refused() {
    let cmd = format!("head -c {} /dev/zero", MAX_OUTPUT + 1);
    match run(&cmd, Duration::from_secs(5), never).result {
        Err(Failure::TooMuchOutput) => {}
        other => panic!("{:?}", other.map(|_| ())),
    }
    let cmd = format!("head -c {MAX_OUTPUT} /dev/zero");
    assert_eq!(
        output(run(&cmd, Duration::from_secs(5), never)).len(),
        MAX_OUTPUT
    );
}

#[test]
fn timeout_kills_a_grandchild_that_holds_stdout() {
    let sleep = unique_sleep(30);
    let t0 = Instant::now();
    let outcome = run(
        &format!("{sleep} & echo x"),
        Duration::from_millis(300),
        never,
    );
    assert!(matches!(outcome.result, Err(Failure::TimedOut)));
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    // SIGKILL is delivered before run() returns, but an exiting process
    // may be visible for a moment.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !processes_with(&sleep).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left running: {:?}",
            processes_with(&sleep)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn stop_kills_the_group_promptly() {
    let sleep = unique_sleep(30);
    let t0 = Instant::now();
    let stop = || t0.elapsed() > Duration::from_millis(200);
    let outcome = run(&format!("{sleep}; echo x"), Duration::from_secs(30), stop);
    assert!(matches!(outcome.result, Err(Failure::Stopped)));
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let deadline = Instant::now() + Duration::from_secs(3);
    while !processes_with(&sleep).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left running: {:?}",
            processes_with(&sleep)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn only_stdin_stdout_stderr_are_inherited() {
    // An inheritable descriptor in this process (dup() does not set
    // close-on-exec).
    let file = std::fs::File::open("/dev/null").unwrap();
    // SAFETY: dup of a descriptor we own; closed below.
    let leaked = unsafe { libc::dup(file.as_raw_fd()) };
    assert!(leaked > 2);
    let out = output(run("ls -l /proc/self/fd", Duration::from_secs(5), never));
    // SAFETY: closes the descriptor dup'ed above.
    unsafe { libc::close(leaked) };
    let mut fds: Vec<(u32, String)> = out
        .lines()
        .filter_map(|l| l.split_once(" -> "))
        .map(|(l, target)| {
            (
                l.rsplit(' ').next().unwrap().parse().unwrap(),
                target.into(),
            )
        })
        .collect();
    // ls's own listing of its /proc/PID/fd directory.
    fds.retain(|(_, target)| !(target.starts_with("/proc/") && target.ends_with("/fd")));
    fds.sort();
    let numbers: Vec<u32> = fds.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, [0, 1, 2], "{fds:?}");
    assert_eq!(fds[0].1, "/dev/null");
    assert!(fds[1].1.starts_with("pipe:") && fds[2].1.starts_with("pipe:"));
}

#[test]
fn last_line_of_stderr() {
    let outcome = run(
        "echo one >&2; echo two >&2; echo >&2; exit 1",
        Duration::from_secs(5),
        never,
    );
    assert!(matches!(outcome.result, Err(Failure::Exit(_))));
    assert_eq!(outcome.stderr.last_line(200).as_deref(), Some("two"));
    let quiet = run("exit 1", Duration::from_secs(5), never);
    assert_eq!(quiet.stderr.last_line(200), None);
}

#[test]
fn tail_is_bounded_cleaned_and_masked() {
    let mut tail = Tail::default();
    tail.push(&vec![b'a'; TAIL * 3]);
    tail.push(b"\nlast \x1b[31mred\x07 key=");
    tail.push("0123456789abcdef0123456789ABCDEF01 short=abc123 é".as_bytes());
    assert!(tail.buf.len() <= TAIL && tail.buf.capacity() == TAIL);
    let line = tail.last_line(200).unwrap();
    assert_eq!(line, "last [31mred key=[redacted] short=abc123 é");
    // Cut at a character boundary: "é" is two bytes.
    assert_eq!(
        tail.last_line(line.len() - 1).unwrap(),
        line.strip_suffix('é').unwrap()
    );
    // A single write larger than the tail keeps its end.
    let mut tail = Tail::default();
    tail.push(format!("{}\nend", "b".repeat(TAIL * 2)).as_bytes());
    assert_eq!(tail.last_line(10).as_deref(), Some("end"));
}
