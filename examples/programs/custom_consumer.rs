//! A `NodeConsumer` that is not Jenkins: it keeps an Ansible inventory file
//! of the ready nodes Nodepool hands it, for some other system to run jobs
//! on. The consumer runtime of `nodepool-core` drives it beside an
//! in-process launcher, on the embedded default (a SQLite file in a
//! temporary directory, the simulated cloud).
//!
//! What happens: the target wants one idle `ubuntu-jammy` node; the runtime
//! requests it, and once the launcher built it the consumer registers it (a
//! line in the inventory). A "job" then runs on it and finishes; the
//! runtime marks the node `used` and tells the consumer it is gone (the
//! line is removed), the launcher deletes it, and a replacement is
//! registered to keep one node idle.
//!
//! Run it with
//!
//! ```sh
//! cargo run -p nodepool-examples --example custom_consumer
//! ```
//!
//! (`RUST_LOG=info` shows the launcher's and the runtime's log too). It
//! exits 0 when all of that happened, and prints why and exits 1 otherwise;
//! it gives up after two minutes rather than waiting forever.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use async_trait::async_trait;
use nodepool_core::config::{Config, Target};
use nodepool_core::consumer::{
    ConsumerError, ConsumerFactory, FinishedNode, NodeConsumer, NodeOutcome,
};
use nodepool_core::consumers::{ConsumerRuntime, ConsumerSettings};
use nodepool_core::launcher::{Launcher, LauncherSettings};
use nodepool_core::model::{Node, Port};
use nodepool_core::provider::Provider;
use nodepool_core::runtime::ProviderFactory;
use nodepool_core::store::{Store, paths};
use nodepool_simulated::SimulatedProvider;
use nodepool_sqlite::{SqliteOptions, SqliteStore};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// One label, one simulated cloud, and a target that wants one idle node.
const CONFIG: &str = r#"
state-store:
  driver: sqlite
  path: nodepool.db

labels:
  - name: ubuntu-jammy

providers:
  - name: sim-cloud
    driver: simulated
    simulation:
      boot-delay: 0.2
    cloud-images:
      - name: jammy
        image-name: Ubuntu 22.04
    pools:
      - name: main
        max-servers: 3
        labels:
          - name: ubuntu-jammy
            cloud-image: jammy
            flavor-name: Fake Flavor

targets:
  - name: inventory
    # nodepool.yaml's targets are Jenkins masters, so `jenkins.url` is
    # required; the consumer built below for this target does not use it.
    jenkins:
      url: https://jenkins.invalid
    labels:
      - name: ubuntu-jammy
        min-ready: 1
"#;

/// The whole run, bounded so that a broken setup fails instead of hanging.
const OVERALL: Duration = Duration::from_secs(120);

#[tokio::main]
async fn main() -> ExitCode {
    init_logging();
    match tokio::time::timeout(OVERALL, run()).await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("custom_consumer: {e:#}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("custom_consumer: not done within {OVERALL:?}");
            ExitCode::FAILURE
        }
    }
}

/// What the consumer tells the program (which stands for the system that
/// reads the inventory).
#[derive(Debug)]
enum Event {
    Registered { node_id: String, line: String },
    Released { node_id: String },
}

/// Keeps `<file>` listing the nodes it has, one Ansible host line each.
#[derive(Debug)]
struct InventoryConsumer {
    name: String,
    wants: Vec<(String, u32)>,
    file: PathBuf,
    state: Mutex<InventoryState>,
    events: mpsc::UnboundedSender<Event>,
}

#[derive(Debug, Default)]
struct InventoryState {
    /// Node id → its inventory line.
    hosts: BTreeMap<String, String>,
    /// Nodes a job runs on.
    busy: BTreeSet<String>,
    /// Nodes whose job ended, not yet reported to the runtime.
    finished: Vec<FinishedNode>,
}

impl InventoryConsumer {
    fn new(target: &Target, file: PathBuf, events: mpsc::UnboundedSender<Event>) -> Self {
        InventoryConsumer {
            name: target.name.clone(),
            wants: target
                .labels
                .iter()
                .map(|l| (l.name.clone(), l.min_ready))
                .collect(),
            file,
            state: Mutex::default(),
            events,
        }
    }

    fn state(&self) -> Result<std::sync::MutexGuard<'_, InventoryState>, ConsumerError> {
        self.state
            .lock()
            .map_err(|_| ConsumerError::Other("inventory state poisoned".into()))
    }

    /// A job starts on the node: it is no longer idle.
    fn start_job(&self, node_id: &str) -> Result<(), ConsumerError> {
        self.state()?.busy.insert(node_id.to_owned());
        Ok(())
    }

    /// The job ended: the node goes back (deleted, as it is single-use).
    fn job_done(&self, node_id: &str) -> Result<(), ConsumerError> {
        let mut state = self.state()?;
        state.busy.remove(node_id);
        state.finished.push(FinishedNode {
            node_id: node_id.to_owned(),
            outcome: NodeOutcome::Used,
        });
        Ok(())
    }

    /// Rewrites the file; through a rename, so a reader never sees half of
    /// it.
    fn write(&self, hosts: &BTreeMap<String, String>) -> Result<(), ConsumerError> {
        let mut text =
            String::from("# Nodes from Nodepool, kept by the custom_consumer example.\n");
        text.push_str("[nodepool]\n");
        for line in hosts.values() {
            text.push_str(line);
            text.push('\n');
        }
        let partial = self.file.with_extension("partial");
        std::fs::write(&partial, text)
            .and_then(|()| std::fs::rename(&partial, &self.file))
            .map_err(|e| ConsumerError::Other(format!("{}: {e}", self.file.display())))
    }
}

#[async_trait]
impl NodeConsumer for InventoryConsumer {
    fn name(&self) -> &str {
        &self.name
    }

    fn wants(&self) -> Vec<(String, u32)> {
        self.wants.clone()
    }

    async fn node_ready(&self, node_id: &str, node: &Node) -> Result<(), ConsumerError> {
        let Some(address) = node.interface_ip.as_deref() else {
            // Counts against the node: after a few attempts the runtime
            // gives it up and the launcher deletes it.
            return Err(ConsumerError::Other(format!(
                "node {node_id} has no address"
            )));
        };
        let port = match &node.connection_port {
            Some(Port::Number(p)) => *p,
            _ => 22,
        };
        let line = format!(
            "np{node_id} ansible_host={address} ansible_port={port} nodepool_label={}",
            node.node_type.join(",")
        );
        let mut state = self.state()?;
        // Called again for nodes we already have after a restart: adopt.
        let new = state
            .hosts
            .insert(node_id.to_owned(), line.clone())
            .is_none();
        self.write(&state.hosts)?;
        if new {
            let _ = self.events.send(Event::Registered {
                node_id: node_id.to_owned(),
                line,
            });
        }
        Ok(())
    }

    async fn finished_nodes(&self) -> Result<Vec<FinishedNode>, ConsumerError> {
        Ok(std::mem::take(&mut self.state()?.finished))
    }

    async fn node_gone(&self, node_id: &str) -> Result<(), ConsumerError> {
        let mut state = self.state()?;
        state.busy.remove(node_id);
        if state.hosts.remove(node_id).is_some() {
            self.write(&state.hosts)?;
            let _ = self.events.send(Event::Released {
                node_id: node_id.to_owned(),
            });
        }
        Ok(())
    }

    async fn reconcile(&self, live: &[String]) -> Result<(), ConsumerError> {
        let mut state = self.state()?;
        state.hosts.retain(|id, _| live.contains(id));
        self.write(&state.hosts)
    }

    fn busy_nodes(&self) -> Vec<String> {
        self.state()
            .map(|s| s.busy.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// Starts the launcher and the consumer runtime, follows one node through
/// the consumer, stops both.
async fn run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let config_path = dir.path().join("nodepool.yaml");
    std::fs::write(&config_path, CONFIG).context("writing nodepool.yaml")?;
    let config = Config::load(&config_path, None).map_err(|e| anyhow!("nodepool.yaml: {e}"))?;
    let target = config
        .targets
        .first()
        .cloned()
        .context("the configuration has no target")?;

    let sqlite = SqliteStore::from_config(&config, SqliteOptions::default())
        .await
        .context("opening the SQLite store")?;
    let store = Store::new(Arc::new(sqlite));
    println!("store: {}", store.describe());

    let (events_tx, mut events) = mpsc::unbounded_channel();
    let inventory = Arc::new(InventoryConsumer::new(
        &target,
        dir.path().join("inventory.ini"),
        events_tx,
    ));

    // The launcher and, beside it on the same store, the consumer runtime,
    // as the `nodepool-launcher` daemon runs them (it passes Jenkins'
    // factory where we pass ours).
    let providers: ProviderFactory = Arc::new(|pc| {
        SimulatedProvider::new(pc)
            .map(|p| Arc::new(p) as Arc<dyn Provider>)
            .map_err(|e| e.to_string())
    });
    let consumers: ConsumerFactory = {
        let inventory = inventory.clone();
        Arc::new(move |t: &Target| {
            if t.name == inventory.name {
                Ok(inventory.clone() as Arc<dyn NodeConsumer>)
            } else {
                Err(format!("no consumer for target {}", t.name))
            }
        })
    };
    let launcher = Launcher::new(
        store.clone(),
        providers,
        LauncherSettings {
            hostname: "custom-consumer".into(),
            ..LauncherSettings::default()
        },
    );
    let runtime = ConsumerRuntime::new(
        store.clone(),
        consumers,
        ConsumerSettings {
            // The default (5 s) suits Jenkins' API; a file is cheap.
            poll_interval: Duration::from_millis(200),
            ..ConsumerSettings::default()
        },
    );
    // A new value on this channel reloads both. Keep the sender until they
    // stopped: once it is dropped, their wait for a reload ends at once and
    // they would run pass after pass.
    let (config_tx, config_rx) = watch::channel(Arc::new(config));
    let shutdown = CancellationToken::new();
    let launcher_task = tokio::spawn(launcher.run(config_rx.clone(), shutdown.clone()));
    let runtime_task = tokio::spawn(runtime.run(config_rx, shutdown.clone()));

    let followed = follow_one_node(&store, &inventory, &mut events).await;

    shutdown.cancel();
    let runtime_stopped = runtime_task.await;
    let launcher_stopped = launcher_task.await;
    drop(config_tx);
    followed?;
    runtime_stopped.context("the consumer runtime panicked")?;
    launcher_stopped
        .context("the launcher task panicked")?
        .context("the launcher failed")?;
    store.backend().close().await.context("closing the store")?;
    println!("launcher and consumer runtime stopped; done");
    Ok(())
}

/// Registration, a job, release, deletion, replacement.
async fn follow_one_node(
    store: &Store,
    inventory: &InventoryConsumer,
    events: &mut mpsc::UnboundedReceiver<Event>,
) -> anyhow::Result<()> {
    let first = match next_event(events).await? {
        Event::Registered { node_id, line } => {
            println!("registered node {node_id}: {line}");
            node_id
        }
        Event::Released { node_id } => bail!("node {node_id} released before any registration"),
    };
    let file = &inventory.file;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    print!("{}:\n{text}", file.display());

    inventory.start_job(&first)?;
    println!("job running on node {first}");
    inventory.job_done(&first)?;
    println!("job done on node {first}; handing it back");

    // The replacement may register before or after the release (the
    // runtime asks for it as soon as the job starts); wait for both.
    let mut released = false;
    let mut replacement = None;
    while !released || replacement.is_none() {
        match next_event(events).await? {
            Event::Released { node_id } if node_id == first => {
                println!("released node {first} (removed from the inventory)");
                released = true;
            }
            Event::Released { node_id } => bail!("node {node_id} released unexpectedly"),
            Event::Registered { node_id, line } => {
                if replacement.is_none() {
                    replacement = Some((node_id, line));
                }
            }
        }
    }
    node_deleted(store, &first).await?;
    println!("node {first} deleted by the launcher");
    if let Some((node_id, line)) = replacement {
        println!("replacement registered (min-ready 1): node {node_id}: {line}");
    }
    Ok(())
}

async fn next_event(events: &mut mpsc::UnboundedReceiver<Event>) -> anyhow::Result<Event> {
    events
        .recv()
        .await
        .context("the consumer went away (the runtime dropped it)")
}

/// Waits until a node's record is gone, following the store's change
/// stream.
async fn node_deleted(store: &Store, id: &str) -> anyhow::Result<()> {
    // Subscribe before reading, so that no change between the two is missed.
    let mut changes = store.backend().subscribe();
    let path = paths::node(id);
    while store.get_node(id).await?.is_some() {
        loop {
            match changes.recv().await {
                Ok(e) if e.path() == path => break,
                Ok(_) => {}
                // Missed changes: read again.
                Err(RecvError::Lagged(_)) => break,
                Err(RecvError::Closed) => bail!("the store's change stream ended"),
            }
        }
    }
    Ok(())
}

/// The launcher's and the runtime's log on stderr, when `RUST_LOG` asks.
fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
}
