//! `driver: static` against real SSH servers (Debian's sshd on 127.0.0.1
//! ports, each with its own host keys), on a real ZooKeeper and a real
//! SQLite file: hosts registered as ready nodes with their scanned keys,
//! handed to requests, re-registered when returned, withdrawn while their
//! server is down and back once it answers, deregistered when removed from
//! the configuration, and never registered twice by two launchers.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use nodepool_core::model::{NodeState, Port};
use nodepool_core::store::{NodeRecord, Store};
use nodepool_requestor::{NewRequest, Outcome, Requestor};
use nodepool_tests::sshd::Sshd;
use nodepool_tests::{Backend, Clouds, RunningLauncher, TestEnv, eventually};

const WAIT: Duration = Duration::from_secs(60);

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod zookeeper {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(nodepool_tests::Backend::ZooKeeper).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(nodepool_tests::Backend::Sqlite).await;
                }
            )*
        }
    };
}

on_both_stores!(
    static_hosts_are_served_returned_withdrawn_and_removed,
    two_launchers_never_register_a_host_twice,
);

/// The configuration body: `small` on hosts 0 and 1, `large` on host 2
/// (two slots), unless `hosts` leaves some out.
fn body(hosts: &[(&Sshd, &str, u32)]) -> String {
    let mut nodes = String::new();
    for (h, labels, slots) in hosts {
        nodes.push_str(&format!(
            "          - {{name: 127.0.0.1, connection-port: {}, labels: {labels}, max-parallel-jobs: {slots}}}\n",
            h.port()
        ));
    }
    format!(
        r#"
labels:
  - name: small
  - name: large
providers:
  - name: lab
    driver: static
    pools:
      - name: main
        node-attributes: {{rack: r1}}
        nodes:
{nodes}"#
    )
}

fn port_of(rec: &NodeRecord) -> u16 {
    match rec.node.connection_port {
        Some(Port::Number(p)) => u16::try_from(p).expect("port"),
        ref other => panic!("node {} has port {other:?}", rec.id),
    }
}

/// Ready, unallocated nodes by port.
async fn ready_by_port(store: &Store) -> BTreeMap<u16, Vec<NodeRecord>> {
    let mut out: BTreeMap<u16, Vec<NodeRecord>> = BTreeMap::new();
    for rec in store.list_nodes().await.expect("list nodes").records {
        if rec.node.state == NodeState::Ready && rec.node.allocated_to.is_none() {
            out.entry(port_of(&rec)).or_default().push(rec);
        }
    }
    out
}

/// Waits until exactly these ports have these numbers of ready nodes.
async fn wait_ready(store: &Store, what: &str, want: &[(u16, usize)]) {
    let want: BTreeMap<u16, usize> = want.iter().copied().collect();
    eventually(what, WAIT, || async {
        let got: BTreeMap<u16, usize> = ready_by_port(store)
            .await
            .into_iter()
            .map(|(p, v)| (p, v.len()))
            .collect();
        got == want
    })
    .await;
}

/// Requests `labels`, takes the nodes, uses and returns them; returns the
/// ports and ids of the nodes it got.
async fn use_once(zuul: &Requestor, labels: &[&str]) -> Vec<(u16, String)> {
    let id = zuul
        .submit(&NewRequest::new(
            labels.iter().map(|l| l.to_string()).collect(),
        ))
        .await
        .expect("submit");
    let Outcome::Fulfilled(req) = zuul.wait(&id, WAIT).await.expect("wait") else {
        panic!("request {id} for {labels:?} failed")
    };
    let mut set = zuul.accept(&id, &req.value).await.expect("accept");
    let got: Vec<(u16, String)> = set
        .nodes
        .iter()
        .map(|n| match n.node.connection_port {
            Some(Port::Number(p)) => (u16::try_from(p).expect("port"), n.id.clone()),
            ref other => panic!("node {} has port {other:?}", n.id),
        })
        .collect();
    zuul.use_nodes(&mut set, "org/project")
        .await
        .expect("in-use");
    zuul.return_nodes(set).await.expect("used");
    got
}

async fn static_hosts_are_served_returned_withdrawn_and_removed(backend: Backend) {
    let env = TestEnv::new(backend);
    let mut hosts = [Sshd::start(), Sshd::start(), Sshd::start()];
    let ports: Vec<u16> = hosts.iter().map(Sshd::port).collect();
    let all = |h: &[Sshd; 3]| {
        body(&[
            (&h[0], "small", 1),
            (&h[1], "[small]", 1),
            (&h[2], "large", 2),
        ])
    };
    let cfg = env.config(&all(&hosts));
    let l = RunningLauncher::start(&env, &cfg, "static-l1", &Clouds::default()).await;
    let zuul = Requestor::new(env.store(&cfg).await, "zuul");
    let store = zuul.store().clone();

    // One ready node per slot, with Python's static driver's fields and
    // the keys each server offers.
    wait_ready(
        &store,
        "every slot registered",
        &[(ports[0], 1), (ports[1], 1), (ports[2], 2)],
    )
    .await;
    let ready = ready_by_port(&store).await;
    for (i, h) in hosts.iter().enumerate() {
        for rec in &ready[&ports[i]] {
            let n = &rec.node;
            assert_eq!(n.provider, "lab");
            assert_eq!(n.pool, "main");
            assert_eq!(n.launcher.as_deref(), Some("static driver"));
            assert_eq!(n.hostname.as_deref(), Some("127.0.0.1"));
            assert_eq!(n.interface_ip.as_deref(), Some("127.0.0.1"));
            assert_eq!(n.external_id.as_deref(), Some("127.0.0.1"));
            assert_eq!(n.username.as_deref(), Some("zuul"));
            assert_eq!(n.connection_type.as_deref(), Some("ssh"));
            assert_eq!(n.python_path.as_deref(), Some("auto"));
            assert_eq!(
                n.attributes.as_ref().map(|a| a.as_text().to_owned()),
                Some(r#"{"rack":"r1"}"#.to_owned())
            );
            assert_eq!(
                n.host_keys.iter().collect::<BTreeSet<_>>(),
                h.host_keys().iter().collect::<BTreeSet<_>>(),
                "host keys of host {i}"
            );
            let want: Vec<String> = if i == 2 {
                vec!["large".into()]
            } else {
                vec!["small".into()]
            };
            assert_eq!(n.node_type, want);
        }
    }
    let slots: BTreeSet<String> = ready[&ports[2]]
        .iter()
        .map(|r| r.node.slot.as_ref().expect("slot").as_text().to_owned())
        .collect();
    assert_eq!(slots, BTreeSet::from(["0".to_owned(), "1".to_owned()]));

    // Served, returned, and back ready for the same hosts (as new nodes:
    // Python deletes and re-registers).
    let got = use_once(&zuul, &["small", "small", "large"]).await;
    let mut got_ports: Vec<u16> = got.iter().map(|(p, _)| *p).collect();
    got_ports.sort_unstable();
    let mut want_ports = vec![ports[0], ports[1], ports[2]];
    want_ports.sort_unstable();
    assert_eq!(got_ports, want_ports);
    wait_ready(
        &store,
        "returned nodes registered again",
        &[(ports[0], 1), (ports[1], 1), (ports[2], 2)],
    )
    .await;
    let ids_now: BTreeSet<String> = ready_by_port(&store)
        .await
        .into_values()
        .flatten()
        .map(|r| r.id)
        .collect();
    for (_, id) in &got {
        assert!(!ids_now.contains(id), "node {id} was returned and kept");
    }

    // Host 0 goes down: its node is withdrawn, and while it is down it is
    // neither registered again nor handed out.
    hosts[0].stop();
    wait_ready(
        &store,
        "the down host's node withdrawn",
        &[(ports[1], 1), (ports[2], 2)],
    )
    .await;
    l.passes(5, WAIT).await;
    let got = use_once(&zuul, &["small"]).await;
    assert_eq!(got[0].0, ports[1], "served by the host that answers");
    wait_ready(
        &store,
        "host 1 back, host 0 still withdrawn",
        &[(ports[1], 1), (ports[2], 2)],
    )
    .await;
    assert!(
        !ready_by_port(&store).await.contains_key(&ports[0]),
        "a down host was registered"
    );

    // It comes back: registered again and used.
    hosts[0].restart();
    wait_ready(
        &store,
        "the host registered again once it answers",
        &[(ports[0], 1), (ports[1], 1), (ports[2], 2)],
    )
    .await;
    let got = use_once(&zuul, &["small", "small"]).await;
    let got_ports: BTreeSet<u16> = got.iter().map(|(p, _)| *p).collect();
    assert_eq!(got_ports, BTreeSet::from([ports[0], ports[1]]));

    // Host 2 is removed from the configuration: deregistered.
    let fewer = env.config(&body(&[(&hosts[0], "small", 1), (&hosts[1], "small", 1)]));
    l.reload(fewer).await;
    wait_ready(
        &store,
        "the removed host deregistered",
        &[(ports[0], 1), (ports[1], 1)],
    )
    .await;
    eventually("the removed host's records deleted", WAIT, || async {
        store
            .list_nodes()
            .await
            .expect("list")
            .records
            .iter()
            .all(|r| port_of(r) != ports[2])
    })
    .await;
    l.stop().await;
}

async fn two_launchers_never_register_a_host_twice(backend: Backend) {
    let env = TestEnv::new(backend);
    let hosts = [Sshd::start(), Sshd::start(), Sshd::start()];
    let ports: Vec<u16> = hosts.iter().map(Sshd::port).collect();
    let cfg = env.config(&body(&[
        (&hosts[0], "small", 1),
        (&hosts[1], "small", 1),
        (&hosts[2], "small", 1),
    ]));
    let clouds = Clouds::default();
    let l1 = RunningLauncher::start(&env, &cfg, "static-l1", &clouds).await;
    let l2 = RunningLauncher::start(&env, &cfg, "static-l2", &clouds).await;
    let zuul = Requestor::new(env.store(&cfg).await, "zuul");
    let store = zuul.store().clone();
    let one_each = [(ports[0], 1), (ports[1], 1), (ports[2], 1)];
    wait_ready(&store, "one node per host", &one_each).await;
    for round in 0..3 {
        let got = use_once(&zuul, &["small", "small", "small"]).await;
        assert_eq!(
            got.iter().map(|(p, _)| *p).collect::<BTreeSet<_>>(),
            ports.iter().copied().collect::<BTreeSet<_>>(),
            "round {round}"
        );
        wait_ready(&store, "one node per host again", &one_each).await;
    }
    // Both launchers keep syncing: still exactly one record per host.
    l1.passes(5, WAIT).await;
    l2.passes(5, WAIT).await;
    let mut per_port: BTreeMap<u16, usize> = BTreeMap::new();
    for rec in store.list_nodes().await.expect("list").records {
        if rec.node.state != NodeState::Deleting {
            *per_port.entry(port_of(&rec)).or_default() += 1;
        }
    }
    assert_eq!(per_port, one_each.iter().copied().collect());
    l1.stop().await;
    l2.stop().await;
}
