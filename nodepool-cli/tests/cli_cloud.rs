//! The cloud-backed subcommands (`alien-list`, `alien-image-list`,
//! `delete --now`, `request`) against the simulated cloud.
//!
//! The simulated cloud lives in the memory of one process and forgets its
//! servers when that process exits, so a `nodepool` process could never
//! see servers a launcher process made. These tests therefore run the CLI
//! in-process ([`nodepool_cli::admin::run_with`], exactly what the binary
//! runs after parsing) with a provider factory that hands out one shared
//! simulated cloud, next to an in-process launcher where one is needed.
//! Against OpenStack the same code runs in the `nodepool` process.

mod common;

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use common::{Backend, Fixture, populate, row};
use nodepool_cli::admin::{Cli, Io, run_with};
use nodepool_core::launcher::{Launcher, LauncherSettings, ProviderFactory};
use nodepool_core::model::{
    ComponentKind, ImageUpload, MIN_READY_REQUESTOR, NodeState, UploadState, epoch_now,
};
use nodepool_core::provider::{IMAGE_BUILD_ID, IMAGE_PROVIDER, ImageUploadSpec, Provider};
use nodepool_core::store::paths;
use nodepool_simulated::SimulatedProvider;
use tokio_util::sync::CancellationToken;

fn cloud_of(f: &Fixture) -> (SimulatedProvider, ProviderFactory) {
    let sim = SimulatedProvider::new(f.config.provider("sim").expect("sim provider"))
        .expect("simulated cloud");
    let shared = sim.clone();
    let factory: ProviderFactory =
        Arc::new(move |_pc| Ok(Arc::new(shared.clone()) as Arc<dyn Provider>));
    (sim, factory)
}

struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn cli(f: &Fixture, factory: &ProviderFactory, args: &[&str]) -> Ran {
    run(f, factory, args, None).await
}

/// Runs the CLI in-process; `terminal`: what the operator types at a
/// terminal, `None`: stdin is not a terminal.
async fn run(f: &Fixture, factory: &ProviderFactory, args: &[&str], terminal: Option<&str>) -> Ran {
    let mut argv = vec!["nodepool", "-c", f.config_path.to_str().expect("utf-8")];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).expect("arguments parse");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut input = terminal.unwrap_or_default().as_bytes();
    let code = {
        let mut io = Io {
            out: &mut out,
            err: &mut err,
            input: &mut input,
            interactive: terminal.is_some(),
            terminal: false,
        };
        run_with(cli, factory.clone(), &mut io).await
    };
    Ran {
        ok: code == std::process::ExitCode::SUCCESS,
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
    }
}

/// Records `server` as node `id`'s server.
async fn record_server(f: &Fixture, id: &str, server: &str) {
    let mut v = f.store.get_node(id).await.expect("read").expect("node");
    v.value.external_id = Some(server.to_owned());
    f.store
        .update_node(id, &v.value, v.version)
        .await
        .expect("update");
}

async fn alien_list_shows_servers_the_store_does_not_know(backend: Backend) {
    let f = Fixture::new(backend).await;
    let d = populate(&f.store).await;
    let (sim, factory) = cloud_of(&f);
    // A server for a known node, recorded on it: not an alien.
    let known = sim.inject_leaked_server(&d.ready).await;
    record_server(&f, &d.ready, &known).await;
    // Tagged the pre-2019 way (one JSON `nodepool` key, seed 001's
    // upgrade path) for a known node, recorded on it: ours and accounted
    // for, not an alien.
    let legacy = sim.inject_legacy_tagged_server(&d.busy).await;
    record_server(&f, &d.busy, &legacy).await;
    // A server whose node is gone, and a stale server of a node that has
    // since moved on to another server: aliens; the same for a server
    // tagged the old way whose node is gone.
    let gone = sim.inject_leaked_server("0000000777").await;
    let stale = sim.inject_leaked_server(&d.held).await;
    let legacy_gone = sim.inject_legacy_tagged_server("0000000778").await;

    let r = cli(&f, &factory, &["alien-list"]).await;
    assert!(r.ok, "{}", r.stderr);
    let t = &r.stdout;
    assert_eq!(
        common::header(t),
        ["Provider", "Hostname", "Server ID", "IP"]
    );
    assert_eq!(common::row_count(t), 3, "{t}");
    let cells = row(t, &gone);
    assert_eq!(cells[..3], ["sim", "np0000000777", gone.as_str()]);
    row(t, &stale);
    row(t, &legacy_gone);
    assert!(!t.contains(&known), "{t}");
    assert!(
        !t.contains(&legacy),
        "the legacy-tagged server of a node is ours: {t}"
    );

    let r = cli(&f, &factory, &["--json", "alien-list", "sim"]).await;
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("JSON");
    assert_eq!(v.as_array().map(Vec::len), Some(3));
    assert_eq!(v[0]["provider"], "sim");

    let r = cli(&f, &factory, &["alien-list", "elsewhere"]).await;
    assert!(!r.ok);
    assert!(
        r.stderr.contains("unknown provider \"elsewhere\""),
        "{}",
        r.stderr
    );
}
both_stores!(alien_list_shows_servers_the_store_does_not_know);

async fn alien_image_list_shows_uploaded_images_without_a_ready_upload(backend: Backend) {
    let f = Fixture::new(backend).await;
    let d = populate(&f.store).await;
    let (sim, factory) = cloud_of(&f);
    let file = f.dir.path().join("image.qcow2");
    std::fs::write(&file, b"not really an image").expect("write");
    let upload = |name: &str, provider: &str| {
        let mut properties = indexmap::IndexMap::new();
        properties.insert(IMAGE_BUILD_ID.to_owned(), d.ubuntu_build.clone());
        properties.insert(IMAGE_PROVIDER.to_owned(), provider.to_owned());
        ImageUploadSpec {
            name: name.to_owned(),
            path: file.clone(),
            format: "qcow2".into(),
            properties,
            md5: None,
            sha256: None,
            timeout: Duration::from_secs(30),
            sent: Default::default(),
        }
    };
    let recorded = sim
        .upload_image(&upload("ubuntu-recorded", "sim"))
        .await
        .expect("upload");
    let forgotten = sim
        .upload_image(&upload("ubuntu-forgotten", "sim"))
        .await
        .expect("upload");
    sim.upload_image(&upload("ubuntu-of-another-provider", "other"))
        .await
        .expect("upload");
    let mut u = ImageUpload::new(epoch_now(), Some("qcow2".into()));
    u.set_state(UploadState::Ready, epoch_now());
    u.external_id = Some(recorded.clone());
    f.store
        .create_upload("ubuntu", &d.ubuntu_build, "sim", &u)
        .await
        .expect("record the upload");

    let r = cli(&f, &factory, &["alien-image-list"]).await;
    assert!(r.ok, "{}", r.stderr);
    let t = &r.stdout;
    assert_eq!(common::header(t), ["Provider", "Name", "Image ID"]);
    assert_eq!(
        row(t, &forgotten),
        ["sim", "ubuntu-forgotten", forgotten.as_str()]
    );
    assert_eq!(
        common::row_count(t),
        1,
        "cloud images and known uploads are not aliens:\n{t}"
    );
}
both_stores!(alien_image_list_shows_uploaded_images_without_a_ready_upload);

async fn delete_now_deletes_server_and_record(backend: Backend) {
    let f = Fixture::new(backend).await;
    let d = populate(&f.store).await;
    let (sim, factory) = cloud_of(&f);
    let server = sim.inject_leaked_server(&d.busy).await;
    let mut v = f
        .store
        .get_node(&d.busy)
        .await
        .expect("read")
        .expect("node");
    v.value.external_id = Some(server.clone());
    f.store
        .update_node(&d.busy, &v.value, v.version)
        .await
        .expect("update");
    assert!(sim.server_for_node(&d.busy).await.is_some());

    let r = cli(&f, &factory, &["delete", "--now", "--yes", &d.busy]).await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(
        common::row_count(&r.stdout),
        0,
        "the node is gone:\n{}",
        r.stdout
    );
    assert!(f.store.get_node(&d.busy).await.expect("read").is_none());
    assert!(
        sim.server_for_node(&d.busy).await.is_none(),
        "the server is gone"
    );

    // A node whose provider is not configured cannot have its server deleted.
    let mut orphan = nodepool_core::model::Node::new(
        NodeState::Used,
        epoch_now(),
        "gone-provider",
        "main",
        vec!["small".into()],
    );
    orphan.external_id = Some("srv-x".into());
    let id = f.store.create_node(&orphan).await.expect("create");
    let r = cli(&f, &factory, &["delete", "--now", "--yes", &id]).await;
    assert!(!r.ok);
    assert!(
        r.stderr.contains("is not in the configuration"),
        "{}",
        r.stderr
    );
    assert!(!f.store.is_node_locked(&id).await.expect("lock state"));
}
both_stores!(delete_now_deletes_server_and_record);

async fn request_gets_nodes_from_a_running_launcher(backend: Backend) {
    let f = Fixture::new(backend).await;
    let (_sim, factory) = cloud_of(&f);
    let stop = CancellationToken::new();
    let (_tx, rx) = tokio::sync::watch::channel(f.config.clone());
    let launcher = Launcher::new(
        f.store.clone(),
        factory.clone(),
        LauncherSettings::default(),
    );
    let run = tokio::spawn(launcher.run(rx, stop.clone()));

    // Held for the user.
    let r = cli(&f, &factory, &["request", "large", "--timeout", "60"]).await;
    assert!(r.ok, "{}", r.stderr);
    let t = &r.stdout;
    assert_eq!(common::row_count(t), 1, "{t}");
    let id = common::row(t, "large")[0].clone();
    let n = f.store.get_node(&id).await.expect("read").expect("node");
    assert_eq!(n.value.state, NodeState::Hold);
    assert!(!f.store.is_node_locked(&id).await.expect("lock"));
    assert!(r.stderr.contains("holding"), "{}", r.stderr);

    // Returned: the launcher deletes it, and the command waits for that.
    let r = cli(
        &f,
        &factory,
        &[
            "--json",
            "request",
            "large",
            "large",
            "--return",
            "--timeout",
            "60",
        ],
    )
    .await;
    assert!(r.ok, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("JSON");
    let ids: Vec<String> = v
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(ids.len(), 2);
    for id in &ids {
        assert!(f.store.get_node(id).await.expect("read").is_none());
        assert!(
            r.stderr.contains(&format!("node {id} deleted")),
            "{}",
            r.stderr
        );
    }
    assert!(
        f.store
            .list_requests()
            .await
            .expect("requests")
            .records
            .iter()
            .all(|q| !q
                .request
                .requestor
                .as_deref()
                .unwrap_or("")
                .starts_with("nodepool-cli"))
    );

    // No pool serves it: the request fails once every pool declined.
    let r = cli(&f, &factory, &["request", "nonesuch", "--timeout", "60"]).await;
    assert!(!r.ok);
    assert!(r.stderr.contains("failed"), "{}", r.stderr);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the launcher stops")
        .expect("join")
        .expect("clean stop");
}
both_stores!(request_gets_nodes_from_a_running_launcher);

async fn erase_asks_at_a_terminal_and_does_only_what_was_answered(backend: Backend) {
    let f = Fixture::new(backend).await;
    populate(&f.store).await;
    let (_, factory) = cloud_of(&f);
    let nodes = |f: &Fixture| {
        let store = f.store.clone();
        async move { store.list_nodes().await.expect("nodes").records.len() }
    };
    let r = run(&f, &factory, &["erase", "sim"], Some("n\n")).await;
    assert!(!r.ok, "{}", r.stdout);
    assert!(r.stderr.contains("not reversible"), "{}", r.stderr);
    assert!(r.stderr.contains("[N/y]"), "{}", r.stderr);
    assert!(r.stderr.contains("aborted"), "{}", r.stderr);
    assert_eq!(nodes(&f).await, 3, "nothing erased");
    let r = run(&f, &factory, &["erase", "sim"], Some("y\n")).await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(
        r.stdout,
        "Erasing build data for sim...\nErasing node data for sim...\n"
    );
    assert_eq!(nodes(&f).await, 0);
}
both_stores!(erase_asks_at_a_terminal_and_does_only_what_was_answered);

async fn request_explain_says_why_a_request_waits_pool_by_pool(backend: Backend) {
    let f = Fixture::new(backend).await;
    populate(&f.store).await;
    let (_sim, factory) = cloud_of(&f);
    let zuul = nodepool_requestor::Requestor::new(f.store.clone(), "zuul");
    let submit = |labels: &[&str]| {
        let req =
            nodepool_requestor::NewRequest::new(labels.iter().map(|l| l.to_string()).collect());
        let zuul = zuul.clone();
        async move { zuul.submit(&req).await.expect("submit") }
    };
    let id = submit(&["small"]).await;

    // The registered pool's next pass takes it (a ready spare is there).
    let r = cli(&f, &factory, &["--json", "request-explain", &id]).await;
    assert!(r.ok, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("JSON");
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["state"], "requested");
    assert_eq!(v["node_types"], serde_json::json!(["small"]));
    assert_eq!(v["pools"][0]["provider"], "sim");
    assert_eq!(v["pools"][0]["pool"], "main");
    assert_eq!(v["pools"][0]["verdict"], "would-take", "{v}");

    // A label the pool does not serve.
    let odd = submit(&["nonesuch"]).await;
    let r = cli(&f, &factory, &["request-explain", &odd]).await;
    assert!(r.ok, "{}", r.stderr);
    let mut lines = r.stdout.lines();
    let head = lines.next().expect("summary");
    assert!(
        head.starts_with(&format!("request {odd} (nonesuch): requested ")),
        "{head}"
    );
    assert!(head.ends_with("0 of 1 pools could serve it now"), "{head}");
    assert_eq!(
        lines.next(),
        Some("  sim/main: does not serve label nonesuch")
    );

    // Both at once, one line each, in the request listing.
    let r = cli(&f, &factory, &["--json", "request-list", "--detail"]).await;
    assert!(r.ok, "{}", r.stderr);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).expect("JSON");
    let why = |id: &str| {
        rows.iter()
            .find(|row| row["id"] == id)
            .map(|row| row["waiting_because"].clone())
    };
    assert_eq!(
        why(&odd),
        Some(serde_json::json!("sim/main: does not serve label nonesuch")),
        "{rows:?}"
    );
    let first = why(&id).expect("listed");
    assert!(
        first.as_str().is_some_and(|w| w.starts_with("sim/main: ")),
        "{first}"
    );
    let r = cli(&f, &factory, &["request-list", "--detail"]).await;
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("Waiting Because"), "{}", r.stdout);
    assert!(
        r.stdout.contains("sim/main: does not serve label nonesuch"),
        "{}",
        r.stdout
    );

    // Its launcher gone: nobody runs the pool.
    let pools = f
        .store
        .list_components(ComponentKind::Pool)
        .await
        .expect("pools");
    for (name, _) in &pools.records {
        let path = format!("{}/{name}", paths::components("pool"));
        f.store
            .backend()
            .delete(&path, None)
            .await
            .expect("unregister");
    }
    let r = cli(&f, &factory, &["request-explain", &id]).await;
    assert!(
        r.stdout
            .contains("  sim/main: no running launcher serves this pool"),
        "{}",
        r.stdout
    );

    let r = cli(&f, &factory, &["request-explain", "100-0000099999"]).await;
    assert!(!r.ok);
    assert!(
        r.stderr.contains("request 100-0000099999 not found"),
        "{}",
        r.stderr
    );
}
both_stores!(request_explain_says_why_a_request_waits_pool_by_pool);

async fn label_list_detail_says_why_a_label_is_short_of_min_ready(backend: Backend) {
    let body = common::BODY.replace(
        "  - name: small\n  - name: large\n",
        "  - name: small\n    min-ready: 2\n  - name: large\n    min-ready: 1\n  - name: spare\n    min-ready: 1\n",
    );
    let f = Fixture::with_body(backend, &body).await;
    populate(&f.store).await;
    let (_sim, factory) = cloud_of(&f);
    // A launcher's min-ready request for `large`; none yet for `small`.
    let zuul = nodepool_requestor::Requestor::new(f.store.clone(), MIN_READY_REQUESTOR);
    let large = zuul
        .submit(&nodepool_requestor::NewRequest::new(vec!["large".into()]))
        .await
        .expect("submit");

    let r = cli(&f, &factory, &["--json", "label-list", "--detail"]).await;
    assert!(r.ok, "{}", r.stderr);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).expect("JSON");
    let row = |label: &str| {
        rows.iter()
            .find(|x| x["label"] == label)
            .cloned()
            .unwrap_or_else(|| panic!("{label} not listed: {rows:?}"))
    };
    let small = row("small");
    assert_eq!(
        (&small["min_ready"], &small["ready"]),
        (&2.into(), &1.into())
    );
    assert!(
        small["short_because"]
            .as_str()
            .is_some_and(|w| w.starts_with("no min-ready request waits for it yet")),
        "{small}"
    );
    let explained = cli(&f, &factory, &["--json", "request-explain", &large]).await;
    let v: serde_json::Value = serde_json::from_str(&explained.stdout).expect("JSON");
    let line = row("large")["short_because"].clone();
    assert!(
        line.as_str().is_some_and(|w| w.starts_with("sim/main: ")
            && w.ends_with(v["pools"][0]["reason"].as_str().expect("reason"))),
        "{line} vs {v}"
    );
    assert_eq!(
        row("spare")["short_because"],
        "no pool in the configuration serves it"
    );

    let r = cli(&f, &factory, &["label-list", "--detail"]).await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(
        common::header(&r.stdout),
        ["Label", "Min Ready", "Ready", "Short Because"]
    );
}
both_stores!(label_list_detail_says_why_a_label_is_short_of_min_ready);
