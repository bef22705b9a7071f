//! The launcher runtime on the qemu provider, with the real clock and real
//! VMs: a node is served at 127.0.0.1 on its VM's forwarded port and
//! deleted with its VM; a VM left by a killed launcher is deleted by the
//! next launcher's leak cleanup.

use std::sync::Arc;
use std::time::Duration;

use nodepool_core::config::Config;
use nodepool_core::launcher::{Launcher, LauncherSettings, ObserverIntervals};
use nodepool_core::model::Port;
use nodepool_core::provider::Provider;
use nodepool_core::runtime::ProviderFactory;
use nodepool_core::store::Store;
use nodepool_model::conformance::provider::random_node_id;
use nodepool_model::store::MemoryStore;
use nodepool_qemu::QemuProvider;
use nodepool_requestor::{NewRequest, Outcome, Requestor};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

mod support;

use support::{Local, eventually, qemu_alive, vm_of_a_killed_launcher};

struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _config: watch::Sender<Arc<Config>>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("launcher task");
    }
}

fn start(store: Store, config: Config) -> Running {
    let factory: ProviderFactory = Arc::new(|pc| {
        QemuProvider::new(pc)
            .map(|p| Arc::new(p) as Arc<dyn Provider>)
            .map_err(|e| e.to_string())
    });
    let settings = LauncherSettings {
        hostname: "qemu-test".into(),
        observer: ObserverIntervals {
            instances: Duration::from_secs(1),
            ..ObserverIntervals::default()
        },
        ..LauncherSettings::default()
    };
    let launcher = Launcher::new(store, factory, settings);
    let (tx, rx) = watch::channel(Arc::new(config));
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        launcher.run(rx, stop).await.expect("launcher runs");
    });
    Running {
        shutdown,
        task,
        _config: tx,
    }
}

/// The host's configuration with nodescan off (the stub has no SSH).
fn without_nodescan(host: &Local) -> Config {
    let yaml = std::fs::read_to_string(&host.config_path)
        .expect("config")
        .replace(
            "      - name: main\n",
            "      - name: main\n        host-key-checking: false\n",
        );
    support::config(&yaml)
}

fn store() -> Store {
    Store::new(Arc::new(MemoryStore::new().new_session()))
}

fn server_dirs(host: &Local) -> usize {
    std::fs::read_dir(host.image_dir.join("servers"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_served_at_its_vms_forwarded_port() {
    let host = Local::new();
    host.stub_image(&host.provider()).await;
    let store = store();
    let l = start(store.clone(), without_nodescan(&host));
    let zuul = Requestor::new(store.clone(), "zuul-system-id");
    let id = zuul
        .submit(&NewRequest::new(vec!["tiny".into()]))
        .await
        .expect("submit");
    let Outcome::Fulfilled(req) = zuul
        .wait(&id, Duration::from_secs(120))
        .await
        .expect("wait")
    else {
        panic!("request failed")
    };
    let mut set = zuul.accept(&id, &req.value).await.expect("accept");
    let node = store
        .get_node(&set.nodes[0].id)
        .await
        .expect("get")
        .expect("node")
        .value;
    let server = node.external_id.clone().expect("a server id");
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            host.image_dir
                .join("servers")
                .join(&server)
                .join("server.json"),
        )
        .expect("server.json"),
    )
    .expect("json");
    let port = record["port"].as_i64().expect("port");
    assert_eq!(node.interface_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(node.connection_port, Some(Port::Number(port)));
    assert_eq!(node.ssh_port, Some(Port::Number(port)));
    std::net::TcpStream::connect(("127.0.0.1", port as u16))
        .unwrap_or_else(|e| panic!("the node's port {port} is forwarded: {e}"));
    let pids = host.vm_pids();
    zuul.use_nodes(&mut set, "example/project")
        .await
        .expect("in-use");
    zuul.return_nodes(set).await.expect("used");
    eventually("the node's VM is deleted", || {
        server_dirs(&host) == 0 && pids.iter().all(|p| !qemu_alive(*p))
    })
    .await;
    l.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launcher_deletes_the_vms_a_killed_launcher_left() {
    let host = Local::new();
    let id = vm_of_a_killed_launcher(&host, &random_node_id()).await;
    let pids = host.vm_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    assert!(qemu_alive(pids[0]), "the VM outlives its launcher");
    let l = start(store(), without_nodescan(&host));
    eventually("the leaked VM is deleted", || {
        !host.image_dir.join("servers").join(&id).exists() && !qemu_alive(pids[0])
    })
    .await;
    l.stop().await;
}
