//! A real `redis-server` child process on a free loopback port, for tests, benchmarks and
//! the `demo` command, a small Redis Cluster of such processes ([`RedisCluster`]), and a
//! primary with a replica watched by three `redis-sentinel` processes ([`RedisSentinels`]).
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
    /// The replica or the sentinels did not reach the state a failover needs in time.
    #[error("the Redis Sentinel set was not ready within {timeout:?}: {state}")]
    SentinelNotReady { timeout: Duration, state: String },
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
    /// The port of the primary this server replicates (`--replicaof`).
    replica_of: Option<u16>,
    /// The password clients and replicas must give (`--requirepass`, `--masterauth`).
    password: Option<String>,
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
        Self::start_on_free_ports(options, None, None)
    }

    /// A cluster node keeping its cluster view in `dir`.
    fn start_cluster_node(dir: &Path) -> Result<Self, RedisServerError> {
        Self::start_on_free_ports(RedisServerOptions::default(), Some(dir), None)
    }

    fn start_on_free_ports(
        options: RedisServerOptions,
        cluster_dir: Option<&Path>,
        replica_of: Option<u16>,
    ) -> Result<Self, RedisServerError> {
        Self::start_on_free_ports_with(options, cluster_dir, replica_of, None)
    }

    fn start_on_free_ports_with(
        options: RedisServerOptions,
        cluster_dir: Option<&Path>,
        replica_of: Option<u16>,
        password: Option<&str>,
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
                replica_of,
                password: password.map(str::to_owned),
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
        if let Some(password) = &self.password {
            command
                .arg("--requirepass")
                .arg(password)
                .arg("--masterauth")
                .arg(password);
        }
        if let Some(primary) = self.replica_of {
            command
                .args(["--replicaof", "127.0.0.1"])
                .arg(primary.to_string());
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
/// The master name the sentinels of a [`RedisSentinels`] monitor.
pub const SENTINEL_MASTER_NAME: &str = "egress-scaler";
/// How long a fresh Sentinel set may take until the replica is in sync and every sentinel
/// knows the replica and the other two sentinels (they announce themselves every 2 s).
const SENTINEL_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A primary and a replica (`redis-server`), watched by three `redis-sentinel` processes
/// (quorum 2), all on free loopback ports, for failover tests. The servers keep an
/// append-only file (as a Redis pod with a volume), each in its own directory. The sentinels declare the
/// primary down after `down-after-milliseconds` 1000 of silence, so a failover completes
/// within a few seconds. Everything is killed and the sentinels' files removed on drop.
/// Needs Debian's `redis-sentinel` (scripts/ensure-redis installs it).
#[derive(Debug)]
pub struct RedisSentinels {
    dir: PathBuf,
    /// Redis's password and the sentinels' own, when set.
    passwords: SentinelPasswords,
    /// The first primary, then its replica; which one is primary changes on failover.
    servers: Vec<RedisServer>,
    sentinels: Vec<SentinelProcess>,
}

/// The passwords of a [`RedisSentinels`]: Redis's (`requirepass` of both servers, given to
/// the sentinels as `auth-pass`) and the sentinels' own (`requirepass` of each sentinel).
#[derive(Debug, Clone, Default)]
pub struct SentinelPasswords {
    pub redis: Option<String>,
    pub sentinel: Option<String>,
}

/// One `redis-sentinel` child process.
#[derive(Debug)]
struct SentinelProcess {
    port: u16,
    child: Child,
}

impl RedisSentinels {
    /// Starts the primary, its replica and three sentinels, and waits until a failover
    /// could happen.
    pub fn start() -> Result<Self, RedisServerError> {
        Self::start_with_passwords(SentinelPasswords::default())
    }

    /// As [`RedisSentinels::start`], with passwords on Redis and on the sentinels.
    pub fn start_with_passwords(passwords: SentinelPasswords) -> Result<Self, RedisServerError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "egress-scaler-sentinel-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut set = RedisSentinels {
            dir,
            passwords,
            servers: Vec::new(),
            sentinels: Vec::new(),
        };
        // Each server in a directory of its own: a replica writes the primary's snapshot to
        // its directory, which a server started later in the same one would load.
        let options = |name: &str| -> io::Result<RedisServerOptions> {
            let data_dir = set.dir.join(name);
            std::fs::create_dir_all(&data_dir)?;
            Ok(RedisServerOptions {
                data_dir: Some(data_dir),
                ..RedisServerOptions::default()
            })
        };
        let (primary_options, replica_options) = (options("primary")?, options("replica")?);
        let password = set.passwords.redis.clone();
        let primary = RedisServer::start_on_free_ports_with(
            primary_options,
            None,
            None,
            password.as_deref(),
        )?;
        let primary_port = primary.port();
        set.servers.push(primary);
        set.servers.push(RedisServer::start_on_free_ports_with(
            replica_options,
            None,
            Some(primary_port),
            password.as_deref(),
        )?);
        for _ in 0..3 {
            let sentinel = set.spawn_sentinel(primary_port)?;
            set.sentinels.push(sentinel);
        }
        set.wait_until_ready(primary_port)?;
        Ok(set)
    }

    fn spawn_sentinel(&self, primary_port: u16) -> Result<SentinelProcess, RedisServerError> {
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            // Sentinel rewrites its configuration file: one per process, in the set's dir.
            let config = self.dir.join(format!("sentinel-{port}.conf"));
            let mut auth = String::new();
            if let Some(password) = &self.passwords.redis {
                auth.push_str(&format!(
                    "sentinel auth-pass {SENTINEL_MASTER_NAME} {password}\n"
                ));
            }
            if let Some(password) = &self.passwords.sentinel {
                auth.push_str(&format!("requirepass {password}\n"));
            }
            std::fs::write(
                &config,
                // auth-pass names a master, so it follows the monitor line.
                format!(
                    "port {port}\nbind 127.0.0.1\ndaemonize no\nloglevel warning\n\
                     sentinel monitor {SENTINEL_MASTER_NAME} 127.0.0.1 {primary_port} 2\n\
                     sentinel down-after-milliseconds {SENTINEL_MASTER_NAME} 1000\n\
                     sentinel failover-timeout {SENTINEL_MASTER_NAME} 5000\n\
                     sentinel parallel-syncs {SENTINEL_MASTER_NAME} 1\n"
                ) + &auth,
            )?;
            let binary = PathBuf::from("redis-sentinel");
            let mut child = Command::new(&binary)
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|error| {
                    if error.kind() == io::ErrorKind::NotFound {
                        RedisServerError::NotInstalled { binary }
                    } else {
                        RedisServerError::Io(error)
                    }
                })?;
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                if let Some(status) = child.try_wait()? {
                    last_error = Some(RedisServerError::Exited { port, status });
                    break;
                }
                if answers_ping(port) {
                    return Ok(SentinelProcess { port, child });
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(RedisServerError::NotReady {
                        port,
                        timeout: READY_TIMEOUT,
                    });
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        Err(last_error.expect("at least one attempt was made"))
    }

    /// Waits until the replica is in sync and every sentinel sees the replica and the
    /// other sentinels.
    fn wait_until_ready(&self, primary_port: u16) -> Result<(), RedisServerError> {
        let deadline = Instant::now() + SENTINEL_READY_TIMEOUT;
        loop {
            let state = self.readiness(primary_port);
            match state {
                Ok(None) => return Ok(()),
                Ok(Some(_)) | Err(_) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(100));
                }
                Ok(Some(state)) => {
                    return Err(RedisServerError::SentinelNotReady {
                        timeout: SENTINEL_READY_TIMEOUT,
                        state,
                    });
                }
                Err(error) => {
                    return Err(RedisServerError::SentinelNotReady {
                        timeout: SENTINEL_READY_TIMEOUT,
                        state: error.to_string(),
                    });
                }
            }
        }
    }

    /// `None` when ready, else what is still missing.
    fn readiness(&self, primary_port: u16) -> Result<Option<String>, RedisServerError> {
        let replica = self
            .servers
            .iter()
            .find(|server| server.port() != primary_port)
            .expect("two servers");
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut self.server_connection(replica.port())?)?;
        if !info.contains("master_link_status:up") {
            return Ok(Some("the replica is not in sync".to_owned()));
        }
        for sentinel in &self.sentinels {
            let master: std::collections::HashMap<String, String> = redis::cmd("SENTINEL")
                .arg("MASTER")
                .arg(SENTINEL_MASTER_NAME)
                .query(&mut self.sentinel_connection(sentinel.port)?)?;
            let count = |field: &str| {
                master
                    .get(field)
                    .and_then(|value| value.parse::<usize>().ok())
                    .unwrap_or(0)
            };
            if count("num-slaves") < 1 || count("num-other-sentinels") < 2 {
                return Ok(Some(format!(
                    "sentinel {} sees {} replica(s) and {} other sentinel(s)",
                    sentinel.port,
                    master.get("num-slaves").map_or("?", String::as_str),
                    master
                        .get("num-other-sentinels")
                        .map_or("?", String::as_str),
                )));
            }
        }
        Ok(None)
    }

    /// `redis+sentinel://[:PASSWORD@]127.0.0.1:A,127.0.0.1:B,127.0.0.1:C/egress-scaler`
    /// (`?sentinel_password=...` when the sentinels have one).
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|sentinel| format!("127.0.0.1:{}", sentinel.port))
            .collect();
        let auth = match &self.passwords.redis {
            Some(password) => format!(":{password}@"),
            None => String::new(),
        };
        let query = match &self.passwords.sentinel {
            Some(password) => format!("?sentinel_password={password}"),
            None => String::new(),
        };
        format!(
            "redis+sentinel://{auth}{}/{SENTINEL_MASTER_NAME}{query}",
            hosts.join(",")
        )
    }

    fn server_connection(&self, port: u16) -> Result<redis::Connection, RedisServerError> {
        node_connection_as(port, self.passwords.redis.as_deref())
    }

    fn sentinel_connection(&self, port: u16) -> Result<redis::Connection, RedisServerError> {
        node_connection_as(port, self.passwords.sentinel.as_deref())
    }

    /// The port of the primary the first answering sentinel names.
    pub fn primary_port(&self) -> Result<u16, RedisServerError> {
        let mut last_error = None;
        for sentinel in &self.sentinels {
            let asked = self
                .sentinel_connection(sentinel.port)
                .and_then(|mut connection| {
                    let (_, port): (String, u16) = redis::cmd("SENTINEL")
                        .arg("GET-MASTER-ADDR-BY-NAME")
                        .arg(SENTINEL_MASTER_NAME)
                        .query(&mut connection)?;
                    Ok(port)
                });
            match asked {
                Ok(port) => return Ok(port),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("three sentinels"))
    }

    /// The ports of the two servers, the first primary first.
    pub fn server_ports(&self) -> Vec<u16> {
        self.servers.iter().map(RedisServer::port).collect()
    }

    /// The server listening on `port` (the primary or the replica).
    pub fn server_mut(&mut self, port: u16) -> Option<&mut RedisServer> {
        self.servers.iter_mut().find(|server| server.port() == port)
    }

    /// Kills the current primary (like a crash) and returns its port.
    pub fn kill_primary(&mut self) -> Result<u16, RedisServerError> {
        let port = self.primary_port()?;
        if let Some(server) = self.server_mut(port) {
            server.stop();
        }
        Ok(port)
    }

    /// Waits until the sentinels name a primary other than `old_port` and it says it is
    /// a primary; returns its port.
    pub fn wait_for_failover(
        &self,
        old_port: u16,
        timeout: Duration,
    ) -> Result<u16, RedisServerError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(port) = self.primary_port()
                && port != old_port
                && let Ok(mut connection) = self.server_connection(port)
                && let Ok(role) = redis::cmd("ROLE").query::<redis::Value>(&mut connection)
                && matches!(&role, redis::Value::Array(items)
                    if matches!(items.first(), Some(redis::Value::BulkString(role)) if role == b"master"))
            {
                return Ok(port);
            }
            if Instant::now() >= deadline {
                return Err(RedisServerError::SentinelNotReady {
                    timeout,
                    state: format!("no failover away from port {old_port}"),
                });
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for RedisSentinels {
    fn drop(&mut self) {
        for sentinel in &mut self.sentinels {
            let _ = sentinel.child.kill();
            let _ = sentinel.child.wait();
        }
        for server in &mut self.servers {
            server.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn node_connection(port: u16) -> Result<redis::Connection, RedisServerError> {
    node_connection_as(port, None)
}

fn node_connection_as(
    port: u16,
    password: Option<&str>,
) -> Result<redis::Connection, RedisServerError> {
    let auth = password.map_or(String::new(), |password| format!(":{password}@"));
    let client = redis::Client::open(format!("redis://{auth}127.0.0.1:{port}/"))?;
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
        // `+PONG`, or `-NOAUTH ...` from a server with a password: it answers either way.
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply)?;
        Ok(&reply == b"+PONG\r\n" || reply.starts_with(b"-NOAUTH"))
    };
    attempt().unwrap_or(false)
}
