//! A real `redis-server` child process on a free loopback port, for tests, benchmarks and
//! the `demo` command.
//!
//! The process is killed when the [`RedisServer`] is dropped, so a panicking test does not
//! leave a server behind.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long a fresh process may take to answer PING.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Free ports picked before giving up when each one is taken by someone else first.
const PORT_ATTEMPTS: usize = 5;

/// Why a `redis-server` could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RedisServerError {
    /// The binary is not installed.
    #[error(
        "{binary:?} was not found in PATH: install Redis (Debian/Ubuntu: `apt-get install redis-server`, macOS: `brew install redis`)"
    )]
    NotInstalled { binary: PathBuf },
    /// Spawning the process, picking a port or creating the data directory failed.
    #[error("could not start redis-server: {0}")]
    Io(#[from] io::Error),
    /// The process exited before it answered PING (a taken port, a bad option).
    #[error("redis-server on port {port} exited before it was ready ({status})")]
    Exited { port: u16, status: ExitStatus },
    /// The process runs but did not answer PING in time.
    #[error("redis-server on port {port} did not answer PING within {timeout:?}")]
    NotReady { port: u16, timeout: Duration },
}

/// How to run the server.
#[derive(Debug, Clone)]
pub struct RedisServerOptions {
    /// The program to run; found through PATH unless it contains a slash.
    pub binary: PathBuf,
    /// With a directory, the server keeps an append-only file there (`appendonly yes`), so a
    /// restart keeps the data. Without one, nothing is written to disk.
    pub data_dir: Option<PathBuf>,
}

impl Default for RedisServerOptions {
    fn default() -> Self {
        RedisServerOptions {
            binary: PathBuf::from("redis-server"),
            data_dir: None,
        }
    }
}

/// A running (or stopped, restartable) `redis-server` on `127.0.0.1`.
#[derive(Debug)]
pub struct RedisServer {
    options: RedisServerOptions,
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts an in-memory server (`--save "" --appendonly no`) on a free port.
    pub fn start() -> Result<Self, RedisServerError> {
        Self::start_with(RedisServerOptions::default())
    }

    /// Starts a server that keeps its data in `dir` (append-only file), so a restart keeps it.
    pub fn start_persistent(dir: impl Into<PathBuf>) -> Result<Self, RedisServerError> {
        Self::start_with(RedisServerOptions {
            data_dir: Some(dir.into()),
            ..RedisServerOptions::default()
        })
    }

    /// Starts a server with `options` on a free port, retrying with another port when the
    /// chosen one was taken between picking and binding.
    pub fn start_with(options: RedisServerOptions) -> Result<Self, RedisServerError> {
        if let Some(dir) = &options.data_dir {
            std::fs::create_dir_all(dir)?;
        }
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            let mut server = RedisServer {
                options: options.clone(),
                port,
                child: None,
            };
            match server.spawn_and_wait() {
                Ok(()) => return Ok(server),
                // Most likely another process bound the port first: try another one.
                Err(error @ RedisServerError::Exited { .. }) => last_error = Some(error),
                Err(error) => return Err(error),
            }
        }
        Err(last_error.expect("at least one attempt was made"))
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The TCP port, the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory when the server persists its data.
    pub fn data_dir(&self) -> Option<&Path> {
        self.options.data_dir.as_deref()
    }

    /// Whether the process has been started and not stopped or exited.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the process (like a crash: no final save) and waits for it to exit. Does
    /// nothing when it is already stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // An error means it has already exited; wait reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the stopped server again on the same port (and data directory).
    pub fn start_again(&mut self) -> Result<(), RedisServerError> {
        self.stop();
        // A client's lingering connection never blocks the port (redis-server sets
        // SO_REUSEADDR), but another process may just have taken it: retry a few times.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match self.spawn_and_wait() {
                Err(RedisServerError::Exited { .. }) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(50));
                }
                result => return result,
            }
        }
    }

    /// Stops and starts the server on the same port.
    pub fn restart(&mut self) -> Result<(), RedisServerError> {
        self.start_again()
    }

    fn spawn_and_wait(&mut self) -> Result<(), RedisServerError> {
        let mut command = Command::new(&self.options.binary);
        command
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--daemonize", "no", "--save", ""])
            .args(["--loglevel", "warning"])
            .stdin(Stdio::null())
            // The log is not read: a pipe nobody drains would eventually block the server.
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match &self.options.data_dir {
            Some(dir) => {
                command.arg("--dir").arg(dir).args([
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "everysec",
                ]);
            }
            None => {
                command.args(["--appendonly", "no"]);
            }
        }
        let child = command.spawn().map_err(|error| {
            if error.kind() == io::ErrorKind::NotFound {
                RedisServerError::NotInstalled {
                    binary: self.options.binary.clone(),
                }
            } else {
                RedisServerError::Io(error)
            }
        })?;
        self.child = Some(child);
        let result = self.wait_until_ready();
        if result.is_err() {
            self.stop();
        }
        result
    }

    fn wait_until_ready(&mut self) -> Result<(), RedisServerError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let child = self.child.as_mut().expect("spawned just before");
        loop {
            if let Some(status) = child.try_wait()? {
                return Err(RedisServerError::Exited {
                    port: self.port,
                    status,
                });
            }
            if answers_ping(self.port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(RedisServerError::NotReady {
                    port: self.port,
                    timeout: READY_TIMEOUT,
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port that was free a moment ago.
fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// Whether something on the port answers an inline PING with `+PONG`.
fn answers_ping(port: u16) -> bool {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let attempt = || -> io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_millis(200))?;
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        stream.write_all(b"PING\r\n")?;
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply)?;
        Ok(&reply == b"+PONG\r\n")
    };
    attempt().unwrap_or(false)
}
