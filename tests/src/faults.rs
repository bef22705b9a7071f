//! Fault injection for the drills of issue 12: the faults an operator's
//! failure drill causes, made with real parts.
//!
//! - [`ZooKeeperServer`]: a private ZooKeeper (Debian's, started by
//!   `scripts/zookeeper.sh run`, with TLS) on free ports and its own data
//!   directory, that a test stops and starts again. The shared test
//!   ZooKeeper must never be stopped: other tests use it at the same time.
//! - [`ZooKeeperEnsemble`]: three such servers as one ensemble on
//!   127.0.0.1, whose leader a test kills and starts again.
//! - [`Tmpfs`]: a small tmpfs for a SQLite file, filled by a filler file
//!   (disk full) and freed again.
//! - [`AmbiguousWrites`]: a [`StateStore`] decorator whose writes are
//!   applied (single writes and transactions alike) and then reported as
//!   failed ("connection reset"), for an
//!   in-process launcher (a release binary has no fault hooks).
//! - [`Monitor`]: samples the store and the cloud during a whole scenario
//!   and records what must never be seen (a `ready` node whose server is
//!   gone or has no id, a node in two fulfilled requests, two nodes on one
//!   server).
//!
//! Stopping a launcher past its session timeout is [`Daemon::pause`]
//! (`SIGSTOP`) and [`Daemon::resume`] (`SIGCONT`).
//!
//! [`Daemon::pause`]: crate::Daemon::pause
//! [`Daemon::resume`]: crate::Daemon::resume

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use nodepool_core::model::{NodeState, RequestState};
use nodepool_core::provider::{Instance, InstanceStatus, Provider};
use nodepool_core::store::{
    CreateMode, Entry, MultiOp, MultiResult, SessionState, Stat, StateStore, Store, StoreError,
    StoreEvent, split_path,
};
use nodepool_simulated::SimulatedProvider;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------
// A private ZooKeeper
// ---------------------------------------------------------------------------

/// The TLS client files of a [`ZooKeeperServer`] (PEM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPaths {
    /// CA bundle that signed the server's certificate.
    pub ca: PathBuf,
    /// Client certificate.
    pub cert: PathBuf,
    /// Client key.
    pub key: PathBuf,
}

/// A ZooKeeper server owned by one test: Debian's ZooKeeper run by
/// `scripts/zookeeper.sh run` (so it is configured exactly like the shared
/// test server, TLS listener included) on two free ports, with its data in
/// a private directory. [`stop`](Self::stop) and [`start`](Self::start)
/// keep the data directory, so sessions survive a short restart as they do
/// in production; dropping it kills the server.
pub struct ZooKeeperServer {
    base: tempfile::TempDir,
    port: u16,
    tls_port: u16,
    child: Option<Child>,
    /// As a member of an ensemble: its id, every member's quorum ports
    /// (`ZK_ENSEMBLE`) and the certificates all members share.
    member: Option<(u32, String, PathBuf)>,
}

impl std::fmt::Debug for ZooKeeperServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZooKeeperServer")
            .field("port", &self.port)
            .field("tls_port", &self.tls_port)
            .field("dir", &self.base.path())
            .field("running", &self.child.is_some())
            .finish()
    }
}

/// How long a (re)start may take before the test fails: a JVM on a loaded
/// 2-core machine takes 2–5 s; installing the package on first use longer.
const ZK_START_LIMIT: Duration = Duration::from_secs(120);

/// A free TCP port on 127.0.0.1 (the kernel's pick; released at once, so
/// another process could take it before ZooKeeper binds it, which then
/// fails the start loudly rather than silently).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on 127.0.0.1: {e}"))
}

/// `scripts/zookeeper.sh` of this repository.
fn zookeeper_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/zookeeper.sh")
}

impl ZooKeeperServer {
    /// Starts a fresh server and waits until it answers on both ports.
    /// Panics (a failure, never a skip) when it does not come up.
    pub async fn start_new() -> Self {
        let base = tempfile::Builder::new()
            .prefix("nodepool-rs-drill-zk-")
            .tempdir()
            .expect("tempdir for a private ZooKeeper");
        let port = free_port();
        let mut tls_port = free_port();
        while tls_port == port {
            tls_port = free_port();
        }
        let mut zk = ZooKeeperServer {
            base,
            port,
            tls_port,
            child: None,
            member: None,
        };
        zk.start().await;
        zk
    }

    /// The plaintext address, `127.0.0.1:PORT`.
    pub fn hosts(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The TLS port (the one launchers use, as in a real deployment).
    pub fn tls_port(&self) -> u16 {
        self.tls_port
    }

    /// The client's TLS files (throw-away certificates of this server).
    pub fn tls(&self) -> TlsPaths {
        let certs = match &self.member {
            Some((_, _, certs)) => certs.clone(),
            None => self.base.path().join("certs"),
        };
        TlsPaths {
            ca: certs.join("ca.pem"),
            cert: certs.join("client.pem"),
            key: certs.join("client.key"),
        }
    }

    /// The `nodepool.yaml` store section: this server over TLS, below
    /// `chroot`, with `zookeeper-timeout: session_timeout` seconds.
    pub fn store_yaml(&self, chroot: &str, session_timeout: f64) -> String {
        let tls = self.tls();
        format!(
            "zookeeper-servers: [{{host: '127.0.0.1', port: {}, chroot: '{chroot}'}}]\n\
             zookeeper-tls: {{ca: '{}', cert: '{}', key: '{}'}}\n\
             zookeeper-timeout: {session_timeout}\n",
            self.tls_port,
            tls.ca.display(),
            tls.cert.display(),
            tls.key.display()
        )
    }

    /// Keeps the data directory and the server's logs after the drop
    /// (the server is still killed); returns where they are.
    pub fn keep(&mut self) -> PathBuf {
        let base = std::mem::replace(&mut self.base, tempfile::tempdir().expect("tempdir"));
        base.keep()
    }

    /// Whether the server process runs (it may still be starting).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Starts the server on its data directory (a no-op when it runs) and
    /// waits until it answers `ruok` and accepts TLS connections (an
    /// ensemble member: until it serves, as leader or follower).
    pub async fn start(&mut self) {
        if self.is_running() {
            return;
        }
        self.spawn();
        self.wait_serving().await;
    }

    /// Starts the process without waiting (ensemble members must all be
    /// started before any can serve).
    fn spawn(&mut self) {
        if self.is_running() {
            return;
        }
        let log = self.base.path().join("zk.out");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("ZooKeeper log {}: {e}", log.display()));
        let err = out.try_clone().expect("log file handle");
        let mut cmd = Command::new("bash");
        cmd.arg(zookeeper_script())
            .arg("run")
            .env("ZK_PORT", self.port.to_string())
            .env("ZK_TLS_PORT", self.tls_port.to_string())
            .env("ZK_BASE", self.base.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if let Some((id, ensemble, certs)) = &self.member {
            cmd.env("ZK_MYID", id.to_string())
                .env("ZK_ENSEMBLE", ensemble)
                .env("ZK_CERTS", certs);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run scripts/zookeeper.sh run: {e}"));
        self.child = Some(child);
    }

    async fn wait_serving(&mut self) {
        let log = self.base.path().join("zk.out");
        let deadline = tokio::time::Instant::now() + ZK_START_LIMIT;
        loop {
            if !self.is_running() {
                panic!(
                    "private ZooKeeper exited while starting:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let serving = match self.member {
                None => ruok(self.port).await,
                Some(_) => self.mode().await.is_some(),
            };
            if serving && accepts(self.tls_port).await {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "private ZooKeeper did not answer within {ZK_START_LIMIT:?}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `leader`, `follower` or `standalone` while the server serves
    /// clients (the `srvr` four-letter word); `None` while it does not
    /// (an ensemble member without a quorum) or does not answer.
    pub async fn mode(&self) -> Option<String> {
        let answer = four_letters(self.port, b"srvr").await?;
        answer
            .lines()
            .find_map(|l| l.strip_prefix("Mode: "))
            .map(|m| m.trim().to_owned())
    }

    /// Kills the server at once (SIGKILL: a crashed machine, no goodbye
    /// to the ensemble or the clients) and reaps it. The data stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server as an operator's `systemctl stop` does (SIGTERM;
    /// SIGKILL after 20 s) and waits until the process is gone. The data
    /// directory stays.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if tokio::time::Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

impl Drop for ZooKeeperServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// ZooKeeper's answer on `port` to a four-letter word (within 2 s).
async fn four_letters(port: u16, word: &[u8]) -> Option<String> {
    let talk = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(word).await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    match tokio::time::timeout(Duration::from_secs(2), talk).await {
        Ok(Ok(a)) => Some(String::from_utf8_lossy(&a).into_owned()),
        _ => None,
    }
}

/// A ZooKeeper ensemble on 127.0.0.1: [`ZooKeeperServer`]s as quorum
/// peers, each on its own client, TLS, quorum and election ports and data
/// directory, sharing one set of throw-away certificates. Clients are
/// given every member ([`store_yaml`](Self::store_yaml)), as in
/// production; a test kills a member (the leader, usually) and starts it
/// again.
#[derive(Debug)]
pub struct ZooKeeperEnsemble {
    /// The members, by id − 1.
    pub servers: Vec<ZooKeeperServer>,
    certs: tempfile::TempDir,
}

impl ZooKeeperEnsemble {
    /// Starts an ensemble of `n` members and waits until every one serves
    /// (one leader elected, the others following).
    pub async fn start_new(n: usize) -> Self {
        let certs = tempfile::Builder::new()
            .prefix("nodepool-rs-drill-zk-certs-")
            .tempdir()
            .expect("tempdir for the ensemble's certificates");
        let mut used = std::collections::BTreeSet::new();
        let mut port = || loop {
            let p = free_port();
            if used.insert(p) {
                return p;
            }
        };
        let mut members = Vec::new();
        let mut quorum = Vec::new();
        for id in 1..=n {
            let (client, tls, peer, election) = (port(), port(), port(), port());
            quorum.push(format!("{id}={peer}:{election}"));
            members.push((id as u32, client, tls));
        }
        let ensemble = quorum.join(" ");
        let mut servers: Vec<ZooKeeperServer> = members
            .into_iter()
            .map(|(id, client, tls)| ZooKeeperServer {
                base: tempfile::Builder::new()
                    .prefix(&format!("nodepool-rs-drill-zk{id}-"))
                    .tempdir()
                    .expect("tempdir for an ensemble member"),
                port: client,
                tls_port: tls,
                child: None,
                member: Some((id, ensemble.clone(), certs.path().to_path_buf())),
            })
            .collect();
        // The first member makes the shared certificates before it starts
        // java; the others must not race it.
        servers[0].spawn();
        let keystore = certs.path().join("server-keystore.pem");
        let deadline = tokio::time::Instant::now() + ZK_START_LIMIT;
        while !keystore.exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the ensemble's certificates were not made within {ZK_START_LIMIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for s in &mut servers[1..] {
            s.spawn();
        }
        for s in &mut servers {
            s.wait_serving().await;
        }
        ZooKeeperEnsemble { servers, certs }
    }

    /// The member that leads now, if the ensemble has a quorum.
    pub async fn leader(&self) -> Option<usize> {
        for (i, s) in self.servers.iter().enumerate() {
            if s.mode().await.as_deref() == Some("leader") {
                return Some(i);
            }
        }
        None
    }

    /// The `nodepool.yaml` store section: every member over TLS, below
    /// `chroot`, with `zookeeper-timeout: session_timeout` seconds.
    pub fn store_yaml(&self, chroot: &str, session_timeout: f64) -> String {
        let tls = self.servers[0].tls();
        let hosts: Vec<String> = self
            .servers
            .iter()
            .map(|s| {
                format!(
                    "{{host: '127.0.0.1', port: {}, chroot: '{chroot}'}}",
                    s.tls_port
                )
            })
            .collect();
        format!(
            "zookeeper-servers: [{}]\n\
             zookeeper-tls: {{ca: '{}', cert: '{}', key: '{}'}}\n\
             zookeeper-timeout: {session_timeout}\n",
            hosts.join(", "),
            tls.ca.display(),
            tls.cert.display(),
            tls.key.display()
        )
    }

    /// Where the shared certificates are.
    pub fn certs(&self) -> &Path {
        self.certs.path()
    }
}

/// Whether ZooKeeper on `port` answers the `ruok` four-letter word.
async fn ruok(port: u16) -> bool {
    let talk = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(b"ruok").await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), talk).await,
        Ok(Ok(a)) if a == b"imok"
    )
}

/// Whether something accepts TCP connections on `port`.
async fn accepts(port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(("127.0.0.1", port))
        )
        .await,
        Ok(Ok(_))
    )
}

// ---------------------------------------------------------------------------
// A small tmpfs: disk full on demand
// ---------------------------------------------------------------------------

/// A tmpfs of a fixed size mounted for one test (we run as root), for a
/// SQLite file whose disk the test fills ([`fill`](Self::fill)) and frees
/// ([`free`](Self::free)). Unmounted on drop (lazily, so a process still
/// holding a file there does not keep it mounted for ever).
#[derive(Debug)]
pub struct Tmpfs {
    path: PathBuf,
    filler: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_bytes` at `path` (created when missing).
    pub fn mount(path: &Path, size_bytes: u64) -> Result<Self, String> {
        std::fs::create_dir_all(path).map_err(|e| format!("{}: {e}", path.display()))?;
        nix::mount::mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size_bytes},mode=0755").as_str()),
        )
        .map_err(|e| {
            format!(
                "mount -t tmpfs at {}: {e} (the drills run as root)",
                path.display()
            )
        })?;
        Ok(Tmpfs {
            path: path.to_owned(),
            filler: path.join("filler"),
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fills every free byte with a filler file; returns its size. The
    /// disk is then full: the next write that needs a new block fails
    /// with ENOSPC (SQLite: "database or disk is full").
    pub fn fill(&self) -> std::io::Result<u64> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.filler)?;
        let mut written = 0u64;
        // Big chunks first, then one page at a time for the last pages
        // (tmpfs allocates whole pages).
        for chunk in [1 << 20, 4096] {
            let buf = vec![0u8; chunk];
            loop {
                match f.write(&buf) {
                    Ok(0) => break,
                    Ok(n) => written += n as u64,
                    Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(written)
    }

    /// Deletes the filler file: the space is free again.
    pub fn free(&self) -> std::io::Result<()> {
        // Truncate before unlinking: a process forked by another test
        // between our open and its exec holds a copy of the descriptor for
        // a moment, and an unlinked file's pages are freed only when the
        // last descriptor closes; truncation frees them at once.
        match std::fs::OpenOptions::new().write(true).open(&self.filler) {
            Ok(f) => f.set_len(0)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        match std::fs::remove_file(&self.filler) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
    }
}

// ---------------------------------------------------------------------------
// Ambiguous writes
// ---------------------------------------------------------------------------

/// Which writes an [`AmbiguousWrites`] store makes ambiguous.
#[derive(Clone, Debug, PartialEq)]
pub struct Ambiguity {
    /// Seed of the dice (splitmix64).
    pub seed: u64,
    /// Share (0 to 1) of the matching writes reported as failed.
    pub fraction: f64,
    /// Only records directly below this path, e.g. `/nodepool/nodes`
    /// (a node record, not its lock contenders).
    pub parent: String,
    /// Make `set` ambiguous.
    pub sets: bool,
    /// Make `create` ambiguous.
    pub creates: bool,
    /// Make `delete` ambiguous.
    pub deletes: bool,
}

impl Ambiguity {
    /// Node record updates (`set` on `/nodepool/nodes/<id>`): the writes
    /// of issue 12's "ZooKeeper applied a node's `ready` write but the
    /// launcher saw 'connection reset'".
    pub fn node_updates(seed: u64, fraction: f64) -> Self {
        Ambiguity {
            seed,
            fraction,
            parent: "/nodepool/nodes".into(),
            sets: true,
            creates: false,
            deletes: false,
        }
    }
}

/// One write that was applied and then reported as failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectedFault {
    /// `set`, `create` or `delete`.
    pub op: &'static str,
    /// The record's path.
    pub path: String,
    /// The node state written, for node records (`ready`, `deleting`...).
    pub state: Option<String>,
}

#[derive(Debug)]
struct Dice {
    state: u64,
    injected: Vec<InjectedFault>,
}

/// A [`StateStore`] decorator for ambiguous writes: every write is
/// performed on the real store, and then a seeded share of the matching
/// ones is reported as [`StoreError::Unavailable`] ("connection reset")
/// although it was applied — what a client sees when the connection drops
/// between the server applying a write and its answer arriving. Reads,
/// sessions and events are the real store's.
///
/// A launcher built on it (see `RunningLauncher::start_on`) must resolve
/// the ambiguity itself; a release binary has no such hook, so the drill
/// that uses it runs the launcher in-process.
#[derive(Debug)]
pub struct AmbiguousWrites {
    inner: Arc<dyn StateStore>,
    plan: Ambiguity,
    dice: Mutex<Dice>,
}

impl AmbiguousWrites {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn StateStore>, plan: Ambiguity) -> Self {
        let seed = plan.seed;
        AmbiguousWrites {
            inner,
            plan,
            dice: Mutex::new(Dice {
                state: seed,
                injected: Vec::new(),
            }),
        }
    }

    /// Every write reported as failed after it was applied, in order.
    pub fn injected(&self) -> Vec<InjectedFault> {
        self.dice
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .injected
            .clone()
    }

    fn matches(&self, path: &str) -> bool {
        split_path(path).0 == self.plan.parent
    }

    /// After an applied write: rolls the die and, on a hit, records it
    /// and returns the error to report instead of success.
    fn roll(&self, op: &'static str, path: &str, data: Option<&[u8]>) -> Option<StoreError> {
        let mut dice = self.dice.lock().unwrap_or_else(|p| p.into_inner());
        let x = splitmix64(&mut dice.state);
        // 53 random bits → [0, 1).
        let u = (x >> 11) as f64 / (1u64 << 53) as f64;
        if u >= self.plan.fraction {
            return None;
        }
        let state = data
            .and_then(|d| serde_json::from_slice::<serde_json::Value>(d).ok())
            .and_then(|v| v.get("state").and_then(|s| s.as_str()).map(str::to_owned));
        dice.injected.push(InjectedFault {
            op,
            path: path.to_owned(),
            state,
        });
        Some(StoreError::Unavailable {
            store: self.inner.describe(),
            reason: "connection reset by peer (injected after the write was applied)".into(),
        })
    }
}

/// splitmix64: a small, good, seedable generator (no dependency needed).
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[async_trait]
impl StateStore for AmbiguousWrites {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn create(
        &self,
        path: &str,
        data: &[u8],
        mode: CreateMode,
    ) -> Result<String, StoreError> {
        let created = self.inner.create(path, data, mode).await?;
        if self.plan.creates
            && self.matches(&created)
            && let Some(e) = self.roll("create", &created, Some(data))
        {
            return Err(e);
        }
        Ok(created)
    }

    async fn get(&self, path: &str) -> Result<Option<(Bytes, Stat)>, StoreError> {
        self.inner.get(path).await
    }

    async fn set(&self, path: &str, data: &[u8], version: Option<i32>) -> Result<Stat, StoreError> {
        let stat = self.inner.set(path, data, version).await?;
        if self.plan.sets
            && self.matches(path)
            && let Some(e) = self.roll("set", path, Some(data))
        {
            return Err(e);
        }
        Ok(stat)
    }

    async fn delete(&self, path: &str, version: Option<i32>) -> Result<(), StoreError> {
        self.inner.delete(path, version).await?;
        if self.plan.deletes
            && self.matches(path)
            && let Some(e) = self.roll("delete", path, None)
        {
            return Err(e);
        }
        Ok(())
    }

    async fn children(&self, path: &str) -> Result<Vec<String>, StoreError> {
        self.inner.children(path).await
    }

    async fn scan(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        self.inner.scan(prefix).await
    }

    /// Forwarded whole: the launcher's snapshot is one view of the store
    /// here as without the decorator.
    async fn scan_together(&self, prefixes: &[&str]) -> Result<Vec<Vec<Entry>>, StoreError> {
        self.inner.scan_together(prefixes).await
    }

    async fn create_dir_with_child(
        &self,
        dir: &str,
        child_prefix: &str,
        data: &[u8],
        child_mode: CreateMode,
    ) -> Result<Option<String>, StoreError> {
        self.inner
            .create_dir_with_child(dir, child_prefix, data, child_mode)
            .await
    }

    /// The launcher's transactions (accept, lock + `building`, `ready` +
    /// `fulfilled` + unlocks) are applied whole and, when they write a
    /// matching record, reported failed like a single write: the
    /// launcher must resolve them as it resolves single writes.
    async fn multi(&self, ops: &[MultiOp<'_>]) -> Result<Option<Vec<MultiResult>>, StoreError> {
        let Some(results) = self.inner.multi(ops).await? else {
            return Ok(None);
        };
        for op in ops {
            let hit = match op {
                MultiOp::Set { path, data, .. } if self.plan.sets && self.matches(path) => {
                    self.roll("multi", path, Some(data))
                }
                MultiOp::Create { path, data, .. } if self.plan.creates && self.matches(path) => {
                    self.roll("multi", path, Some(data))
                }
                MultiOp::Delete { path, .. } if self.plan.deletes && self.matches(path) => {
                    self.roll("multi", path, None)
                }
                _ => None,
            };
            if let Some(e) = hit {
                return Err(e);
            }
        }
        Ok(Some(results))
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.inner.subscribe()
    }

    fn session(&self) -> watch::Receiver<SessionState> {
        self.inner.session()
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.inner.close().await
    }

    fn health(&self) -> nodepool_core::store::StoreHealth {
        self.inner.health()
    }
}

// ---------------------------------------------------------------------------
// The monitor
// ---------------------------------------------------------------------------

/// What a [`Monitor`] saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MonitorReport {
    /// Samples taken (store, cloud, store again, on one live session).
    pub samples: u64,
    /// Samples given up (store unreachable, session changed meanwhile).
    pub skipped: u64,
    /// `ready` nodes whose server is missing or not ACTIVE: node id →
    /// what was seen the first time.
    pub dead_ready: BTreeMap<String, String>,
    /// `ready` nodes with no server id (`external_id: null`).
    pub ready_without_server: BTreeMap<String, String>,
    /// Nodes listed by two fulfilled requests at once.
    pub double_allocations: BTreeMap<String, String>,
    /// Servers recorded on two live nodes at once.
    pub shared_servers: BTreeMap<String, String>,
    /// The most servers seen at once that no node records (evidence, not
    /// a violation: a server exists for a moment before its launcher
    /// records it, and after its node's record went).
    pub peak_unowned_servers: usize,
    /// The most servers seen at once.
    pub peak_servers: usize,
}

impl MonitorReport {
    /// Every violation, one line each.
    pub fn violations(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (k, v) in &self.dead_ready {
            out.push(format!("ready node {k} whose server is not ACTIVE: {v}"));
        }
        for (k, v) in &self.ready_without_server {
            out.push(format!("ready node {k} with external_id null: {v}"));
        }
        for (k, v) in &self.double_allocations {
            out.push(format!("node {k} in two fulfilled requests: {v}"));
        }
        for (k, v) in &self.shared_servers {
            out.push(format!("server {k} recorded on two nodes: {v}"));
        }
        out
    }
}

/// Watches the store and the cloud for the whole scenario, recording
/// every state that must never exist (see [`MonitorReport`]). It reads
/// the nodes, then the cloud, then the nodes again, and judges only nodes
/// that were `ready` at the same version in both reads, so the node was
/// `ready` while the cloud was read: a node returned and deleted between
/// two reads is never mistaken for a dead one. Samples on a session that
/// is not connected (a ZooKeeper outage serves the last known tree) are
/// skipped.
pub struct Monitor {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<MonitorReport>,
}

impl Monitor {
    /// Starts sampling every `interval`.
    pub fn start(store: Store, clouds: Clouds, interval: Duration) -> Self {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut report = MonitorReport::default();
            loop {
                if sample(&store, &clouds, &mut report).await {
                    report.samples += 1;
                } else {
                    report.skipped += 1;
                }
                tokio::select! {
                    _ = token.cancelled() => return report,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        });
        Monitor { stop, task }
    }

    /// Stops and returns what it saw.
    pub async fn finish(self) -> MonitorReport {
        self.stop.cancel();
        self.task.await.expect("the monitor task")
    }
}

/// One sample; false when it had to be given up.
async fn sample(store: &Store, clouds: &Clouds, report: &mut MonitorReport) -> bool {
    let session = store.backend().session();
    let Some(id) = session.borrow().id() else {
        return false;
    };
    let Ok(before) = store.list_nodes().await else {
        return false;
    };
    let servers = clouds.instances().await;
    let (Ok(after), Ok(requests)) = (store.list_nodes().await, store.list_requests().await) else {
        return false;
    };
    if session.borrow().id() != Some(id) {
        return false;
    }
    let servers: BTreeMap<&str, &InstanceStatus> = servers
        .iter()
        .map(|i| (i.external_id.as_str(), &i.status))
        .collect();
    let before: BTreeMap<&str, (i32, NodeState)> = before
        .records
        .iter()
        .map(|r| (r.id.as_str(), (r.version, r.node.state)))
        .collect();
    let recorded: std::collections::BTreeSet<&str> = after
        .records
        .iter()
        .filter_map(|r| r.node.external_id.as_deref())
        .collect();
    let unowned = servers.keys().filter(|s| !recorded.contains(**s)).count();
    report.peak_unowned_servers = report.peak_unowned_servers.max(unowned);
    report.peak_servers = report.peak_servers.max(servers.len());
    let mut on_server: BTreeMap<&str, &str> = BTreeMap::new();
    for r in &after.records {
        let n = &r.node;
        if let Some(ext) = n.external_id.as_deref()
            && !matches!(n.state, NodeState::Deleting | NodeState::Deleted)
            && let Some(other) = on_server.insert(ext, r.id.as_str())
        {
            report
                .shared_servers
                .entry(ext.to_owned())
                .or_insert_with(|| format!("nodes {other} and {}", r.id));
        }
        let steady = before.get(r.id.as_str()) == Some(&(r.version, NodeState::Ready));
        if n.state != NodeState::Ready || !steady {
            continue;
        }
        let what = format!(
            "allocated to {:?}, launcher {:?}, version {}",
            n.allocated_to, n.launcher, r.version
        );
        match n.external_id.as_deref() {
            None => {
                report
                    .ready_without_server
                    .entry(r.id.clone())
                    .or_insert(what);
            }
            Some(ext) => match servers.get(ext) {
                Some(InstanceStatus::Active) => {}
                Some(status) => {
                    report
                        .dead_ready
                        .entry(r.id.clone())
                        .or_insert_with(|| format!("server {ext} is {status:?}; {what}"));
                }
                None => {
                    report
                        .dead_ready
                        .entry(r.id.clone())
                        .or_insert_with(|| format!("server {ext} does not exist; {what}"));
                }
            },
        }
    }
    let mut listed: BTreeMap<&str, &str> = BTreeMap::new();
    for r in &requests.records {
        if r.request.state != RequestState::Fulfilled {
            continue;
        }
        for n in &r.request.nodes {
            if let Some(other) = listed.insert(n.as_str(), r.id.as_str())
                && other != r.id
            {
                report
                    .double_allocations
                    .entry(n.clone())
                    .or_insert_with(|| format!("requests {other} and {}", r.id));
            }
        }
    }
    true
}

/// The drill's clouds: every simulated provider of its configuration,
/// opened on the state files the launchers share.
#[derive(Clone)]
pub struct Clouds(pub Vec<Arc<SimulatedProvider>>);

impl Clouds {
    /// The cloud of provider `name`.
    pub fn get(&self, name: &str) -> &Arc<SimulatedProvider> {
        self.0
            .iter()
            .find(|c| c.name() == name)
            .unwrap_or_else(|| panic!("no simulated cloud {name}"))
    }

    /// Every server of every cloud now, read past any API fault.
    pub async fn instances(&self) -> Vec<Instance> {
        let mut all = Vec::new();
        for c in &self.0 {
            all.extend(c.instances().await);
        }
        all
    }
}

/// Servers of the clouds now: (server id, node id it is tagged with,
/// status), read past any API fault a drill set.
pub async fn servers(clouds: &Clouds) -> Vec<(String, Option<String>, InstanceStatus)> {
    clouds
        .instances()
        .await
        .into_iter()
        .map(|i| (i.external_id.clone(), i.node_id(), i.status))
        .collect()
}
