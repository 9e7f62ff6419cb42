//! A real `redis-server` child process on a free loopback port, for tests, benchmarks and
//! the `demo` command, and a small Redis Cluster of such processes ([`RedisCluster`]).
//!
//! The process is killed when the [`RedisServer`] is dropped, so a panicking test does not
//! leave a server behind.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// How long a fresh process may take to answer PING.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Free ports picked before giving up when each one is taken by someone else first.
const PORT_ATTEMPTS: usize = 5;
/// How long a fresh cluster may take until every node reports `cluster_state:ok`.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the nodes are introduced again while the cluster converges.
const CLUSTER_MEET_AGAIN: Duration = Duration::from_secs(2);
/// The hash slots of a Redis Cluster.
const CLUSTER_SLOTS: u32 = 16_384;

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
    /// A node refused a command that sets up the cluster.
    #[error("could not set up the Redis Cluster: {0}")]
    ClusterSetup(#[from] redis::RedisError),
    /// The nodes did not all report `cluster_state:ok` in time.
    #[error("the Redis Cluster was not ready within {timeout:?}: {state}")]
    ClusterNotReady { timeout: Duration, state: String },
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
    cluster: Option<ClusterNode>,
    child: Option<Child>,
}

/// The settings of a server that is a node of a [`RedisCluster`].
#[derive(Debug, Clone)]
struct ClusterNode {
    /// The cluster bus port, chosen free like the client port.
    bus_port: u16,
    /// Where the node keeps its view of the cluster, so that a restart rejoins it.
    config_file: PathBuf,
}

impl RedisServer {
    /// Starts an in-memory server (`--save "" --appendonly no`) on a free port.
    pub fn start() -> Result<Self, RedisServerError> {
        Self::start_with(RedisServerOptions::default())
    }

    /// Starts a server that keeps its data in `dir` (append-only file, synced on every write),
    /// so a restart, even after a kill, keeps every answered write.
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
        Self::start_on_free_ports(options, None)
    }

    /// A cluster node keeping its cluster view in `dir`.
    fn start_cluster_node(dir: &Path) -> Result<Self, RedisServerError> {
        Self::start_on_free_ports(RedisServerOptions::default(), Some(dir))
    }

    fn start_on_free_ports(
        options: RedisServerOptions,
        cluster_dir: Option<&Path>,
    ) -> Result<Self, RedisServerError> {
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            let cluster = match cluster_dir {
                Some(dir) => Some(ClusterNode {
                    bus_port: loop {
                        let bus_port = free_port()?;
                        if bus_port != port {
                            break bus_port;
                        }
                    },
                    config_file: dir.join(format!("nodes-{port}.conf")),
                }),
                None => None,
            };
            let mut server = RedisServer {
                options: options.clone(),
                port,
                cluster,
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

    /// The process id while running, to send it signals (such as `SIGSTOP` to make it fall
    /// silent without closing its connections).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
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
                // `always`: an answered write survives a kill. With `everysec` Redis may
                // postpone the write of the log behind a slow fsync and still answer, so a
                // kill loses up to a few seconds of answered writes (a claim, a start).
                command.arg("--dir").arg(dir).args([
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                ]);
            }
            None => {
                command.args(["--appendonly", "no"]);
            }
        }
        if let Some(node) = &self.cluster {
            command
                .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(&node.config_file)
                .arg("--cluster-port")
                .arg(node.bus_port.to_string())
                .args(["--cluster-announce-ip", "127.0.0.1"])
                // Without replicas, a stopped node would otherwise stop the whole cluster
                // once the others mark it failed.
                .args(["--cluster-require-full-coverage", "no"]);
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

/// A Redis Cluster of `size` primaries (no replicas) on free loopback ports, for tests:
/// the 16384 slots split evenly in node order, every node configured with
/// `cluster-require-full-coverage no` so the others keep serving while one is stopped.
/// The nodes are killed and their cluster files removed when it is dropped. Needs Redis 7
/// (`cluster-port`, `CLUSTER ADDSLOTSRANGE`).
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    /// The nodes' cluster files.
    dir: PathBuf,
}

impl RedisCluster {
    /// Starts `size` nodes, assigns the slots, introduces the nodes to each other and waits
    /// until every node reports `cluster_state:ok` and knows every slot.
    pub fn start(size: usize) -> Result<Self, RedisServerError> {
        if size == 0 {
            return Err(RedisServerError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a cluster needs at least one node",
            )));
        }
        static CLUSTERS: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "egress-scaler-cluster-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        ));
        // Left over from an earlier process with the same id: its files would describe
        // another cluster.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        // Built first, so that a failure below still stops what started and removes `dir`.
        let mut cluster = RedisCluster {
            nodes: Vec::with_capacity(size),
            dir,
        };
        for _ in 0..size {
            let node = RedisServer::start_cluster_node(&cluster.dir)?;
            cluster.nodes.push(node);
        }
        let mut connections = cluster
            .nodes
            .iter()
            .map(|node| node_connection(node.port))
            .collect::<Result<Vec<_>, _>>()?;
        for (index, connection) in connections.iter_mut().enumerate() {
            let (first, last) = cluster.slots_of(index);
            redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(first)
                .arg(last)
                .exec(connection)?;
        }
        cluster.meet(&mut connections)?;
        cluster.wait_until_ready(&mut connections)?;
        Ok(cluster)
    }

    /// `redis://127.0.0.1:PORT/` of the first node; any node's URL reaches the cluster.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// The URL of every node, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// How many nodes the cluster has.
    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// One node, to stop and start again (it rejoins the cluster with its slots).
    pub fn node_mut(&mut self, index: usize) -> &mut RedisServer {
        &mut self.nodes[index]
    }

    /// The node serving hash slot `slot` (as `CLUSTER KEYSLOT` gives it); panics on a slot
    /// past 16383.
    pub fn node_of_slot(&self, slot: u16) -> usize {
        (0..self.nodes.len())
            .find(|&index| {
                let (first, last) = self.slots_of(index);
                (first..=last).contains(&u32::from(slot))
            })
            .expect("a hash slot is below 16384")
    }

    /// The first and last slot of node `index`.
    fn slots_of(&self, index: usize) -> (u32, u32) {
        let size = self.nodes.len() as u32;
        let index = index as u32;
        (
            index * CLUSTER_SLOTS / size,
            (index + 1) * CLUSTER_SLOTS / size - 1,
        )
    }

    /// Introduces every other node to the first one (idempotent).
    fn meet(&self, connections: &mut [redis::Connection]) -> Result<(), RedisServerError> {
        for node in &self.nodes[1..] {
            let bus_port = node.cluster.as_ref().expect("a cluster node").bus_port;
            redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(node.port)
                .arg(bus_port)
                .exec(&mut connections[0])?;
        }
        Ok(())
    }

    fn wait_until_ready(
        &self,
        connections: &mut [redis::Connection],
    ) -> Result<(), RedisServerError> {
        let expected = [
            "cluster_state:ok".to_owned(),
            format!("cluster_slots_assigned:{CLUSTER_SLOTS}"),
            format!("cluster_known_nodes:{}", self.nodes.len()),
        ];
        let deadline = Instant::now() + CLUSTER_READY_TIMEOUT;
        let mut next_meet = Instant::now() + CLUSTER_MEET_AGAIN;
        loop {
            let mut not_ready = None;
            for (connection, node) in connections.iter_mut().zip(&self.nodes) {
                let info: String = redis::cmd("CLUSTER").arg("INFO").query(connection)?;
                let lines: Vec<&str> = info.lines().map(str::trim).collect();
                if let Some(missing) = expected.iter().find(|line| !lines.contains(&line.as_str()))
                {
                    not_ready = Some(format!("node on port {} lacks {missing}", node.port));
                    break;
                }
            }
            match not_ready {
                None => return Ok(()),
                Some(state) if Instant::now() >= deadline => {
                    return Err(RedisServerError::ClusterNotReady {
                        timeout: CLUSTER_READY_TIMEOUT,
                        state,
                    });
                }
                Some(_) => {
                    // Under load a gossip message can be late or lost: introduce them again.
                    if Instant::now() >= next_meet {
                        self.meet(connections)?;
                        next_meet = Instant::now() + CLUSTER_MEET_AGAIN;
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        // Stopped first: a running node rewrites its cluster file.
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A plain connection to a local node, for setting up the cluster.
fn node_connection(port: u16) -> Result<redis::Connection, RedisServerError> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let connection = client.get_connection_with_timeout(Duration::from_secs(1))?;
    connection.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(connection)
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
