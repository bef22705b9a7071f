//! Nodescan against real SSH servers: host keys made by OpenSSH's
//! `ssh-keygen`, served by an SSH server (russh) on 127.0.0.1.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nodepool_core::launcher::nodescan::scan;

struct Host;

impl russh::server::Handler for Host {
    type Error = russh::Error;
}

struct Server;

impl russh::server::Server for Server {
    type Handler = Host;
    fn new_client(&mut self, _: Option<std::net::SocketAddr>) -> Host {
        Host
    }
}

/// Generates host keys with ssh-keygen; returns (private keys, "type base64" of each).
fn host_keys(dir: &std::path::Path) -> (Vec<russh::keys::PrivateKey>, Vec<String>) {
    let mut keys = Vec::new();
    let mut publics = Vec::new();
    for (t, bits) in [
        ("ed25519", None),
        ("ecdsa", Some("256")),
        ("rsa", Some("2048")),
    ] {
        let path = dir.join(format!("host_{t}"));
        let mut cmd = Command::new("ssh-keygen");
        cmd.args(["-q", "-N", "", "-t", t, "-f"]).arg(&path);
        if let Some(b) = bits {
            cmd.args(["-b", b]);
        }
        let status = cmd.status().expect("ssh-keygen runs (openssh-client)");
        assert!(status.success());
        keys.push(russh::keys::load_secret_key(&path, None).expect("key loads"));
        let public = std::fs::read_to_string(path.with_extension("pub")).expect("public key");
        let mut parts = public.split_whitespace();
        publics.push(format!(
            "{} {}",
            parts.next().expect("type"),
            parts.next().expect("key")
        ));
    }
    (keys, publics)
}

async fn ssh_server(keys: Vec<russh::keys::PrivateKey>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let config = Arc::new(russh::server::Config {
        keys,
        ..Default::default()
    });
    tokio::spawn(async move {
        use russh::server::Server as _;
        let mut server = Server;
        let _ = server.run_on_socket(config, &listener).await;
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collects_one_key_per_type() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (keys, publics) = host_keys(dir.path());
    let port = ssh_server(keys).await;
    let mut found = scan("127.0.0.1", port, "ssh", Duration::from_secs(30))
        .await
        .expect("scan");
    found.sort();
    let mut want = publics;
    want.sort();
    assert_eq!(found, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_port_without_ssh_is_not_enough() {
    // Accepts connections and says nothing, like a forwarded port whose
    // guest has no sshd yet.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let started = tokio::time::Instant::now();
    let err = scan("127.0.0.1", port, "ssh", Duration::from_secs(3))
        .await
        .expect_err("no SSH");
    assert!(err.contains("gave up"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the boot timeout bounds the scan"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_fails_after_the_timeout_and_winrm_only_needs_the_port() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let err = scan("127.0.0.1", port, "ssh", Duration::from_secs(2))
        .await
        .expect_err("closed");
    assert!(err.contains("gave up"), "{err}");
    let open = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = open.local_addr().expect("addr").port();
    let keys = scan("127.0.0.1", port, "winrm", Duration::from_secs(5))
        .await
        .expect("port open");
    assert!(keys.is_empty());
}
