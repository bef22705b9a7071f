//! Real SSH servers for the static driver's and the ready scripts' tests:
//! Debian's `sshd` on a free 127.0.0.1 port, with its own host keys made
//! by `ssh-keygen` in a temporary directory. [`Sshd::start`] lets nobody
//! log in (nodescan only needs the banner and the host key exchange);
//! [`Sshd::start_with_login`] also lets the current user in with a key
//! of its own, for ready scripts. The test command installs
//! `openssh-server` (`scripts/test.sh`); a missing `sshd` fails the test
//! with that hint.
//!
//! The server can be stopped and started again on the same port with the
//! same keys (a host going down and coming back); it is killed on drop.

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian installs the server.
pub const SSHD: &str = "/usr/sbin/sshd";

/// One private SSH server.
pub struct Sshd {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local address").port()
}

fn keygen(file: &Path, kind: &str) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", kind, "-N", "", "-C", "", "-f"])
        .arg(file)
        .output()
        .unwrap_or_else(|e| {
            panic!("ssh-keygen: {e} (install openssh-server; scripts/test.sh does)")
        });
    assert!(
        out.status.success(),
        "ssh-keygen -t {kind} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Sshd {
    /// Generates host keys and starts the server; returns once it sends
    /// its banner.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// Like [`start`](Self::start), and the current user (see
    /// [`user`](Self::user)) may log in with [`private_key`](Self::private_key).
    pub fn start_with_login() -> Self {
        Self::start_with(true)
    }

    fn start_with(login: bool) -> Self {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: install openssh-server (scripts/test.sh does)"
        );
        // sshd refuses to start without its privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        let dir = tempfile::tempdir().expect("tempdir");
        for kind in ["ed25519", "ecdsa"] {
            keygen(&dir.path().join(format!("ssh_host_{kind}_key")), kind);
        }
        let auth = if login {
            keygen(&dir.path().join("client_key"), "ed25519");
            let public =
                std::fs::read(dir.path().join("client_key.pub")).expect("read the client key");
            std::fs::write(dir.path().join("authorized_keys"), public)
                .expect("write authorized_keys");
            format!(
                "PubkeyAuthentication yes\nAuthorizedKeysFile {}/authorized_keys\n",
                dir.path().display()
            )
        } else {
            "PubkeyAuthentication no\n".to_owned()
        };
        let port = free_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\n\
             HostKey {d}/ssh_host_ed25519_key\nHostKey {d}/ssh_host_ecdsa_key\n\
             PidFile {d}/sshd.pid\nUsePAM no\nStrictModes no\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             {auth}LogLevel ERROR\n",
            d = dir.path().display()
        );
        std::fs::write(dir.path().join("sshd_config"), config).expect("write sshd_config");
        let mut sshd = Sshd {
            dir,
            port,
            child: None,
        };
        sshd.restart();
        sshd
    }

    /// The user who may log in ([`start_with_login`](Self::start_with_login)):
    /// the one running the test, as sshd runs as it.
    pub fn user(&self) -> String {
        let out = Command::new("id").arg("-un").output().expect("run id -un");
        assert!(out.status.success(), "id -un failed");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The private key [`user`](Self::user) logs in with.
    pub fn private_key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its host keys as nodes record them: `"<type> <base64>"`.
    pub fn host_keys(&self) -> Vec<String> {
        ["ed25519", "ecdsa"]
            .iter()
            .map(|kind| {
                let text = std::fs::read_to_string(
                    self.dir.path().join(format!("ssh_host_{kind}_key.pub")),
                )
                .expect("read public host key");
                let mut parts = text.split_whitespace();
                format!(
                    "{} {}",
                    parts.next().expect("key type"),
                    parts.next().expect("key data")
                )
            })
            .collect()
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("sshd.log")
    }

    /// Whether it is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops the server (the host goes down); waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port with the same keys;
    /// returns once it sends its banner (fails after 60 s).
    pub fn restart(&mut self) {
        self.stop();
        let log = std::fs::File::create(self.log()).expect("create sshd log");
        let child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(self.dir.path().join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {SSHD}: {e}"));
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                let log = std::fs::read_to_string(self.log()).unwrap_or_default();
                self.child = None;
                panic!("sshd on port {} exited ({status}): {log}", self.port);
            }
            if self.banner().is_some() {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "sshd on port {} sent no banner within 60 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The first bytes it sends, if it answers.
    fn banner(&self) -> Option<String> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).ok()?;
        (&buf == b"SSH-").then(|| String::from_utf8_lossy(&buf).into_owned())
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}
