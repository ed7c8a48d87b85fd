//! Running a root key command: `/bin/sh -c CMD`, bounded in time, output
//! and what it inherits. No SQL and no PostgreSQL here: the caller says
//! through `stop` when to give up (see [`super::root_source`]).
//!
//! - The command runs in a session and process group of its own (setsid in
//!   the child), so the timeout or a cancel can kill all of it, and signals
//!   PostgreSQL sends to the backend's group do not reach it.
//! - Only stdin (/dev/null), stdout and stderr (pipes) are open in it: every
//!   other descriptor of the backend (the client socket, relation files, the
//!   postmaster-death pipe) is marked close-on-exec in the child, before
//!   exec.
//! - The backend itself waits in `poll()` on the two pipes, in short slices,
//!   with no helper thread (a backend is single-threaded by design). Between
//!   slices it asks `stop()`; a signal (cancel, statement_timeout) also cuts
//!   a slice short.
//! - The command has finished when its shell has exited and both pipes are
//!   at end of file. A grandchild that keeps a pipe open keeps the command
//!   running, until the deadline kills the whole group.
//! - When the shell has exited, whatever is left of its group is killed
//!   before the shell is reaped: until then its pid, which is the group's
//!   id, cannot be reused by an unrelated process.
//! - At most [`MAX_OUTPUT`] bytes of standard output are read, into a buffer
//!   wiped on drop; of standard error only the last [`TAIL`] bytes are kept.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

/// The most standard output read: a key is 64 characters.
pub const MAX_OUTPUT: usize = 4096;
/// How much of the end of standard error is kept.
pub const TAIL: usize = 1024;
/// How long one `poll()` may wait while a pipe is open; a signal ends it
/// sooner.
const SLICE: Duration = Duration::from_millis(25);
/// How long one wait for the shell's exit may be, once both pipes are closed.
const EXIT_SLICE: Duration = Duration::from_millis(2);
/// Signals are 1 to 64 on Linux (the kernel's _NSIG is 65).
const NSIG: libc::c_int = 65;

#[derive(Debug)]
pub enum Failure {
    /// The shell could not be started.
    Spawn(io::Error),
    /// Reading a pipe or waiting for the shell failed.
    Io(io::Error),
    /// The shell exited with a non-zero status or was killed by a signal.
    Exit(ExitStatus),
    TimedOut,
    /// More than [`MAX_OUTPUT`] bytes on standard output.
    TooMuchOutput,
    /// `stop()` asked to give up; the command's group is killed and reaped.
    Stopped,
}

/// How the shell ended, in words: "exit status 3", "killed by signal 9".
pub fn exit_text(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("{status}"),
    }
}

pub struct Outcome {
    /// Standard output when the command exited 0 in time.
    pub result: Result<Zeroizing<Vec<u8>>, Failure>,
    /// The end of its standard error, whatever the result.
    pub stderr: Tail,
}

/// Runs `cmd` with `/bin/sh -c`, for at most `timeout`, asking `stop()`
/// between waits whether to give up. Returns only once the command's shell
/// is reaped and the rest of its process group killed.
pub fn run(cmd: &str, timeout: Duration, mut stop: impl FnMut() -> bool) -> Outcome {
    let mut stderr = Tail::default();
    let result = match Running::spawn(cmd) {
        Err(e) => Err(Failure::Spawn(e)),
        Ok(mut running) => {
            let waited = running.wait(Instant::now() + timeout, &mut stop, &mut stderr);
            // Killed (what is left of) the group and reaped the shell.
            let status = running.finish();
            match (waited, status) {
                (Err(failure), _) => Err(failure),
                (Ok(_), Err(e)) => Err(Failure::Io(e)),
                (Ok(out), Ok(status)) if status.success() => Ok(out),
                (Ok(_), Ok(status)) => Err(Failure::Exit(status)),
            }
        }
    };
    Outcome { result, stderr }
}

/// The shell and our ends of its pipes. Dropping it kills the group and
/// reaps the shell (also when an ERROR unwinds through the wait).
struct Running {
    child: Child,
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    reaped: bool,
}

impl Running {
    fn spawn(cmd: &str) -> io::Result<Running> {
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let max_fd = open_max();
        // SAFETY: the hook runs in the forked child before exec and makes
        // only async-signal-safe system calls; it allocates nothing.
        unsafe { command.pre_exec(move || detach(max_fd)) };
        // std waits until the exec succeeded (or reports why not), so once
        // this returns, the child has called setsid().
        let mut child = command.spawn()?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let running = Running {
            child,
            stdout,
            stderr,
            reaped: false,
        };
        // Dropping `running` on an error here kills and reaps the shell.
        let fds = [
            running.stdout.as_ref().map(AsRawFd::as_raw_fd),
            running.stderr.as_ref().map(AsRawFd::as_raw_fd),
        ];
        for fd in fds.into_iter().flatten() {
            set_nonblocking(fd)?;
        }
        Ok(running)
    }

    fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    /// Reads the pipes until the command has finished, the deadline passed
    /// or `stop()` said so.
    fn wait(
        &mut self,
        deadline: Instant,
        stop: &mut impl FnMut() -> bool,
        stderr: &mut Tail,
    ) -> Result<Zeroizing<Vec<u8>>, Failure> {
        // Allocated once, at its full size, so no copy of the key is left
        // behind by a reallocation; wiped on drop.
        let mut out = Zeroizing::new(vec![0u8; MAX_OUTPUT + 1]);
        let mut len = 0;
        loop {
            if stop() {
                return Err(Failure::Stopped);
            }
            let open = self.stdout.is_some() || self.stderr.is_some();
            if !open && self.exited().map_err(Failure::Io)? {
                out.truncate(len);
                return Ok(out);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure::TimedOut);
            }
            let slice = left.min(if open { SLICE } else { EXIT_SLICE });
            let [out_ready, err_ready] = self.poll(slice).map_err(Failure::Io)?;
            if out_ready {
                if let Some(n) = read_some(&mut self.stdout, &mut out[len..])? {
                    len += n;
                    if len > MAX_OUTPUT {
                        return Err(Failure::TooMuchOutput);
                    }
                }
            }
            if err_ready {
                let mut chunk = Zeroizing::new([0u8; 512]);
                if let Some(n) = read_some(&mut self.stderr, &mut chunk[..])? {
                    stderr.push(&chunk[..n]);
                }
            }
        }
    }

    /// Waits up to `slice` for either pipe to be readable (or at end of
    /// file). A signal ends the wait early, which is not an error.
    fn poll(&self, slice: Duration) -> io::Result<[bool; 2]> {
        let pipes = [
            self.stdout.as_ref().map(AsRawFd::as_raw_fd),
            self.stderr.as_ref().map(AsRawFd::as_raw_fd),
        ];
        let mut fds: Vec<libc::pollfd> = pipes
            .iter()
            .flatten()
            .map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = slice.as_millis().clamp(1, 1000) as libc::c_int;
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for
        // the duration of the call; with none, poll() only sleeps.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::Interrupted => Ok([false, false]),
                _ => Err(e),
            };
        }
        // `fds` holds the open pipes in order: stdout's entry first.
        let mut revents = fds.iter().map(|p| p.revents != 0);
        let out_ready = pipes[0].is_some() && revents.next().unwrap_or(false);
        let err_ready = pipes[1].is_some() && revents.next().unwrap_or(false);
        Ok([out_ready, err_ready])
    }

    /// Whether the shell has exited, without reaping it (WNOWAIT): its pid,
    /// and so its group id, stays reserved until [`Running::finish`].
    fn exited(&self) -> io::Result<bool> {
        // SAFETY: an all-zero siginfo_t is a valid value to be filled in.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        // SAFETY: waitid writes only into `info`; the pid is our unreaped
        // child.
        let r = unsafe { libc::waitid(libc::P_PID, self.pid() as libc::id_t, &mut info, flags) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: waitid filled `info` (si_pid stays 0 if nothing exited).
        Ok(unsafe { info.si_pid() } != 0)
    }

    /// Kills what is left of the process group, closes our pipe ends and
    /// reaps the shell. The shell is still unreaped when the group is
    /// killed, so the group id cannot name anyone else's processes.
    fn finish(&mut self) -> io::Result<ExitStatus> {
        let pid = self.pid();
        // SAFETY: kill() touches no memory. `pid` is our child, not yet
        // reaped, and the leader of its own group (setsid), so neither
        // `-pid` nor `pid` can name an unrelated process.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGKILL);
        }
        self.stdout = None;
        self.stderr = None;
        self.reaped = true;
        self.child.wait()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.finish();
        }
    }
}

/// One read from a pipe into `buf`: `Some(n)` bytes (none if it would
/// block), and at end of file the pipe is closed.
fn read_some<P: Read>(pipe: &mut Option<P>, buf: &mut [u8]) -> Result<Option<usize>, Failure> {
    let Some(p) = pipe.as_mut() else {
        return Ok(None);
    };
    match p.read(buf) {
        Ok(0) => {
            *pipe = None;
            Ok(None)
        }
        Ok(n) => Ok(Some(n)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(Failure::Io(e)),
    }
}

fn set_nonblocking(fd: libc::c_int) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, changing only its status flags.
    let r = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
        }
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The descriptor limit, for the child's fallback when close_range() is
/// missing (Linux before 5.11). Read here: the child may only make
/// async-signal-safe calls.
fn open_max() -> libc::c_int {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) };
    n.clamp(1024, 1 << 20) as libc::c_int
}

/// In the child, between fork and exec: a session and process group of its
/// own, signals as a new process has them (a backend ignores some, and a
/// child would inherit that), and descriptors 3 and up closed at exec.
/// Only async-signal-safe calls, no allocation.
fn detach(max_fd: libc::c_int) -> io::Result<()> {
    // SAFETY: setsid, sigprocmask, signal, syscall(close_range) and fcntl
    // are async-signal-safe and touch no memory of ours beyond `mask`.
    unsafe {
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut mask: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut mask);
        libc::sigprocmask(libc::SIG_SETMASK, &mask, std::ptr::null_mut());
        for sig in 1..NSIG {
            // Fails harmlessly for SIGKILL, SIGSTOP and reserved signals.
            libc::signal(sig, libc::SIG_DFL);
        }
        // Close-on-exec rather than closed: std's own pipe that reports a
        // failed exec must stay open until the exec.
        let flags = libc::CLOSE_RANGE_CLOEXEC as libc::c_uint;
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, flags) != 0 {
            for fd in 3..max_fd {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
    }
    Ok(())
}

/// The last [`TAIL`] bytes of standard error, wiped on drop (a KMS tool may
/// print tokens there).
pub struct Tail {
    buf: Zeroizing<Vec<u8>>,
}

impl Default for Tail {
    fn default() -> Self {
        Tail {
            buf: Zeroizing::new(Vec::with_capacity(TAIL)),
        }
    }
}

impl Tail {
    /// Appends `bytes`, dropping the oldest to stay within [`TAIL`] (never
    /// reallocating, so nothing is left unwiped).
    pub fn push(&mut self, bytes: &[u8]) {
        let bytes = &bytes[bytes.len().saturating_sub(TAIL)..];
        let excess = (self.buf.len() + bytes.len()).saturating_sub(TAIL);
        self.buf.drain(..excess);
        self.buf.extend_from_slice(bytes);
    }

    /// The last non-empty line, for the server log: control characters
    /// removed, runs of 32 or more hex digits (key-shaped) masked, at most
    /// `max` bytes.
    pub fn last_line(&self, max: usize) -> Option<String> {
        let text = Zeroizing::new(String::from_utf8_lossy(&self.buf).into_owned());
        let line = text.lines().map(clean).rfind(|l| !l.is_empty())?;
        let mut end = line.len().min(max);
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        Some(line[..end].to_owned())
    }
}

/// A line without control characters and with key-shaped hex runs masked.
fn clean(line: &str) -> String {
    const MASK: &str = "[redacted]";
    let mut out = String::with_capacity(line.len());
    let mut run = Zeroizing::new(String::new());
    let flush = |run: &mut Zeroizing<String>, out: &mut String| {
        out.push_str(if run.len() >= 32 { MASK } else { run.as_str() });
        run.clear();
    };
    for c in line.chars().filter(|c| !c.is_control()) {
        if c.is_ascii_hexdigit() {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out.trim().to_owned()
}

#[cfg(test)]
#[path = "root_command_tests.rs"]
mod tests;
