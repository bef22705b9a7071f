//! The listing subcommands as real processes, on a populated SQLite file
//! and a populated ZooKeeper chroot: exact columns, cells, `--json` keys.

mod common;

use common::{AGE, Backend, Fixture, SECRET, header, populate, row, row_count};
use nodepool_core::model::{Component, ProviderUnavailable};
use nodepool_core::store::LockWait;

const NODE_BRIEF: [&str; 9] = [
    "ID",
    "Provider",
    "Label",
    "Server ID",
    "Public IPv4",
    "IPv6",
    "State",
    "Age",
    "Locked",
];

async fn list_shows_nodes_with_their_lock_state(backend: Backend) {
    let f = Fixture::new(backend).await;
    let d = populate(&f.store).await;
    let guard = f
        .store
        .lock_node(&d.ready, LockWait::NonBlocking)
        .await
        .expect("lock");
    let out = f.run(&["list"]).await;
    let t = out.ok();
    assert_eq!(header(t), NODE_BRIEF, "{t}");
    assert_eq!(row_count(t), 3, "{t}");
    let r = row(t, &d.ready);
    assert_eq!(
        r[..7],
        [
            d.ready.as_str(),
            "sim",
            "small",
            "srv-ready",
            "203.0.113.5",
            "",
            "ready"
        ],
        "{t}"
    );
    assert!(r[7].starts_with("02:03:04:0"), "age {:?}", r[7]);
    assert_eq!(r[8], "locked");
    let r = row(t, &d.busy);
    assert_eq!(
        r[1..7],
        ["sim", "large", "srv-busy", "", "2001:db8::7", "in-use"]
    );
    assert_eq!(r[8], "unlocked");
    guard.release().await.expect("release");
    let t = f.run(&["list"]).await.ok().to_owned();
    assert_eq!(row(&t, &d.ready)[8], "unlocked", "{t}");
    assert!(!t.contains(SECRET));
    let _ = AGE;
}
both_stores!(list_shows_nodes_with_their_lock_state);

async fn list_detail_adds_columns_and_redacts_ports(backend: Backend) {
    let f = Fixture::new(backend).await;
    let d = populate(&f.store).await;
    let out = f.run(&["list", "--detail"]).await;
    let t = out.ok();
    let mut want: Vec<&str> = NODE_BRIEF.to_vec();
    want.extend([
        "Pool",
        "Hostname",
        "Private IPv4",
        "AZ",
        "Username",
        "Port",
        "Launcher",
        "Allocated To",
        "Hold Job",
        "Comment",
        "User Data",
        "Driver Data",
    ]);
    assert_eq!(header(t), want, "{t}");
    let r = row(t, &d.busy);
    assert_eq!(r[9], "main");
    assert_eq!(r[13], "ubuntu");
    assert_eq!(r[14], "redacted", "a non-integer port is redacted");
    assert_eq!(r[16], "200-0000000099");
    assert!(r[19].contains("\"zuul_system\": \"zuul-1\""), "{}", r[19]);
    assert_eq!(r[20], "");
    let r = row(t, &d.ready);
    assert_eq!(
        r[11..16],
        ["10.0.0.5", "az1", "", "22", "host-PoolWorker.sim-main-abc"]
    );
    let r = row(t, &d.held);
    assert_eq!(r[6], "hold");
    assert_eq!(
        r[17..19],
        [
            "tenant org/project job-x refs/heads/main",
            "investigating a flaky test"
        ]
    );
    assert!(!t.contains(SECRET), "the secret in the port leaked:\n{t}");
}
both_stores!(list_detail_adds_columns_and_redacts_ports);

async fn list_json_has_the_web_app_keys(backend: Backend) {
    let f = Fixture::new(backend).await;
    let d = populate(&f.store).await;
    let out = f.run(&["--json", "list"]).await;
    let v: serde_json::Value = serde_json::from_str(out.ok()).expect("JSON");
    let nodes = v.as_array().expect("a list");
    assert_eq!(nodes.len(), 3);
    let busy = nodes
        .iter()
        .find(|n| n["id"] == d.busy.as_str())
        .expect("busy node");
    let keys: Vec<&str> = busy
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "id",
            "provider",
            "label",
            "server_id",
            "public_ipv4",
            "ipv6",
            "state",
            "age",
            "locked",
            "pool",
            "hostname",
            "private_ipv4",
            "AZ",
            "username",
            "connection_port",
            "launcher",
            "allocated_to",
            "hold_job",
            "comment",
            "user_data",
            "driver_data"
        ]
    );
    assert_eq!(busy["label"], serde_json::json!(["large"]));
    assert_eq!(busy["connection_port"], "redacted");
    assert_eq!(busy["public_ipv4"], serde_json::Value::Null);
    assert_eq!(busy["user_data"]["project_name"], "org/project");
    assert!(
        busy["age"]
            .as_str()
            .expect("age is a formatted string")
            .starts_with("02:03:04:0")
    );
    let ready = nodes
        .iter()
        .find(|n| n["id"] == d.ready.as_str())
        .expect("ready node");
    assert_eq!(ready["connection_port"], 22);
    assert!(!out.stdout.contains(SECRET));
}
both_stores!(list_json_has_the_web_app_keys);

async fn request_list_shows_requests(backend: Backend) {
    let f = Fixture::new(backend).await;
    let d = populate(&f.store).await;
    let t = f.run(&["request-list"]).await.ok().to_owned();
    assert_eq!(
        header(&t),
        [
            "Request ID",
            "Priority",
            "State",
            "Requestor",
            "Node Types",
            "Nodes",
            "Declined By",
            "Event ID",
            "Unavailable Providers"
        ]
    );
    assert_eq!(
        row(&t, &d.request),
        [
            d.request.as_str(),
            "4",
            "pending",
            "zuul-1",
            "small,large",
            "",
            "launcher-a",
            "ev-42",
            ""
        ]
    );
    let j = f.run(&["request-list", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(j.ok()).expect("JSON");
    assert_eq!(
        v,
        serde_json::json!([{
            "id": d.request, "relative_priority": 4, "state": "pending",
            "requestor": "zuul-1", "node_types": ["small", "large"], "nodes": [],
            "declined_by": ["launcher-a"], "event_id": "ev-42",
            "unavailable_providers": []
        }])
    );
}
both_stores!(request_list_shows_requests);

/// A waiting request says which provider that could serve it is
/// unavailable, why and for how long (from the pool components the
/// launchers write); pools that cannot serve it, or declined it, do not
/// count.
async fn request_list_names_unavailable_providers(backend: Backend) {
    let f = Fixture::new(backend).await;
    let d = populate(&f.store).await;
    let now = nodepool_core::model::epoch_now();
    let pool = |id: &str, provider: &str, labels: &[&str], down: bool| {
        let mut c = Component::pool(
            "launcher01",
            "0.1.0",
            id,
            provider,
            "main",
            labels.iter().map(|l| l.to_string()).collect(),
            100,
        );
        c.paused = Some(down);
        c.provider_unavailable = down.then(|| ProviderUnavailable {
            reason: "timed out: provider sim: server list: no answer within 5.0 s".into(),
            since: now - 3723.0,
        });
        c
    };
    for c in [
        pool("launcher-sim", "sim", &["small", "large"], true),
        // Cannot serve `large`: not a candidate.
        pool("launcher-other", "other", &["small"], true),
        // Declined the request already.
        pool("launcher-a", "third", &["small", "large"], true),
        pool("launcher-ok", "fine", &["small", "large"], false),
    ] {
        f.store.register_component(&c).await.expect("register");
    }
    let t = f.run(&["request-list"]).await.ok().to_owned();
    let r = row(&t, &d.request);
    assert!(
        r[8].starts_with("sim: unavailable for 00:01:02:0"),
        "{:?}\n{t}",
        r[8]
    );
    assert!(r[8].ends_with("no answer within 5.0 s"), "{t}");
    let j = f.run(&["request-list", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(j.ok()).expect("JSON");
    let notes = v[0]["unavailable_providers"].as_array().expect("a list");
    assert_eq!(notes.len(), 1, "{notes:?}");
}
both_stores!(request_list_names_unavailable_providers);

async fn image_listings_show_builds_uploads_and_status(backend: Backend) {
    let f = Fixture::new(backend).await;
    let d = populate(&f.store).await;

    let t = f.run(&["image-list"]).await.ok().to_owned();
    assert_eq!(
        header(&t),
        [
            "Build ID",
            "Upload ID",
            "Provider",
            "Image",
            "Provider Image Name",
            "Provider Image ID",
            "State",
            "Age"
        ]
    );
    let r = row(&t, "img-ready");
    assert_eq!(
        r[..7],
        [
            d.ubuntu_build.as_str(),
            d.ready_upload.as_str(),
            "sim",
            "ubuntu",
            "ubuntu-1700000000",
            "img-ready",
            "ready"
        ]
    );
    assert!(r[7].starts_with("02:03:04:0"), "{t}");
    assert_eq!(row(&t, &d.uploading_upload)[6], "uploading");

    let t = f.run(&["dib-image-list"]).await.ok().to_owned();
    assert_eq!(
        header(&t),
        ["ID", "Image", "Builder", "Formats", "State", "Age"]
    );
    let r = row(&t, &format!("ubuntu-{}", d.ubuntu_build));
    assert_eq!(
        r[1..5],
        ["ubuntu", "builder01.example.org", "qcow2,raw", "ready"]
    );
    assert_eq!(
        row(&t, &format!("ubuntu-{}", d.building_build))[4],
        "building"
    );
    assert_eq!(
        row(&t, &format!("centos-{}", d.centos_build))[4],
        "paused",
        "a paused image's builds show as paused"
    );

    let j = f.run(&["dib-image-list", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(j.ok()).expect("JSON");
    let b = v
        .as_array()
        .expect("list")
        .iter()
        .find(|b| b["id"] == format!("ubuntu-{}", d.ubuntu_build))
        .expect("build")
        .clone();
    assert_eq!(b["formats"], serde_json::json!(["qcow2", "raw"]));
    assert!(b["age"].as_i64().expect("age is an epoch integer") > 1_600_000_000);

    let t = f.run(&["image-status"]).await.ok().to_owned();
    assert_eq!(
        header(&t),
        ["Image", "Paused", "Build Request", "Build Request Age"]
    );
    let r = row(&t, "ubuntu");
    assert_eq!(r[1..3], ["False", "pending"]);
    assert!(r[3].starts_with("00:00:0"), "a fresh request: {t}");
    assert_eq!(row(&t, "centos")[1..4], ["True", "", ""]);
    let j = f.run(&["image-status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(j.ok()).expect("JSON");
    assert_eq!(v[0]["image"], "centos");
    assert_eq!(v[0]["paused"], true);
    assert_eq!(v[0]["build_request"], serde_json::Value::Null);
    assert_eq!(v[1]["build_request"], "pending");
}
both_stores!(image_listings_show_builds_uploads_and_status);

async fn label_list_and_info(backend: Backend) {
    let f = Fixture::new(backend).await;
    let d = populate(&f.store).await;
    let t = f.run(&["label-list"]).await.ok().to_owned();
    assert_eq!(
        t,
        "+-------+\n| Label |\n+-------+\n| large |\n| small |\n+-------+\n"
    );

    let t = f.run(&["info", "sim"]).await.ok().to_owned();
    assert!(
        t.starts_with("State store data for provider sim\n\nImage data:\n"),
        "{t}"
    );
    assert_eq!(
        row(&t, &d.ubuntu_build),
        [
            "ubuntu",
            d.ubuntu_build.as_str(),
            &format!("{},{}", d.ready_upload, d.uploading_upload)
        ]
    );
    assert!(t.contains("\n\nNodes:\n"), "{t}");
    assert_eq!(row(&t, &d.held), [d.held.as_str(), "srv-held"]);
    let j = f.run(&["--json", "info", "sim"]).await;
    let v: serde_json::Value = serde_json::from_str(j.ok()).expect("JSON");
    assert_eq!(v["provider"], "sim");
    assert_eq!(v["nodes"].as_array().expect("nodes").len(), 3);
    assert_eq!(
        v["images"][0]["upload_ids"].as_array().map(Vec::len),
        Some(2)
    );
}
both_stores!(label_list_and_info);

async fn empty_store_lists_empty_tables(backend: Backend) {
    let f = Fixture::new(backend).await;
    let t = f.run(&["list"]).await.ok().to_owned();
    assert_eq!(row_count(&t), 0);
    assert_eq!(t.lines().count(), 4, "header between rules:\n{t}");
    assert_eq!(f.run(&["--json", "image-list"]).await.ok(), "[]\n");
}
both_stores!(empty_store_lists_empty_tables);

/// Writes a record as someone else could: raw bytes at `path`.
async fn write_raw(f: &Fixture, path: &str, data: &[u8]) {
    f.store
        .backend()
        .create(path, data, nodepool_core::store::CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("create {path}: {e}"));
}

/// The `warning:` lines of a run's stderr.
fn warnings(out: &common::Out) -> Vec<String> {
    out.stderr
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .map(str::to_owned)
        .collect()
}

async fn unreadable_records_are_named_on_stderr(backend: Backend) {
    let f = Fixture::new(backend).await;
    let d = populate(&f.store).await;
    let node = nodepool_core::store::paths::node("0000009999");
    let request = nodepool_core::store::paths::request("200-0000009999");
    let build = nodepool_core::store::paths::build("ubuntu", "0000000000000000000000000000abcd");
    write_raw(&f, &node, b"{\"state\": 42}").await;
    write_raw(&f, &request, b"not json").await;
    write_raw(&f, &build, b"[]").await;
    for (args, path, rows) in [
        (&["list"][..], &node, 3),
        (&["request-list"][..], &request, 0),
        (&["image-list"][..], &build, 0),
    ] {
        for json in [false, true] {
            let mut argv: Vec<&str> = Vec::new();
            if json {
                argv.push("--json");
            }
            argv.extend_from_slice(args);
            let out = f.run(&argv).await;
            let stdout = out.ok().to_owned();
            let w = warnings(&out);
            assert_eq!(
                w.len(),
                1,
                "{argv:?}: one line per unreadable record: {w:?}"
            );
            assert!(
                w[0].starts_with(&format!("warning: skipped unreadable record {path}: "))
                    && w[0].len() > format!("warning: skipped unreadable record {path}: ").len(),
                "{argv:?}: path and reason: {w:?}"
            );
            if json {
                // Still the web app's bare list, with the readable records.
                let v: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
                let items = v
                    .as_array()
                    .unwrap_or_else(|| panic!("{argv:?}: a list: {v}"));
                if args == ["list"] {
                    assert_eq!(items.len(), rows, "{argv:?}");
                    assert!(items.iter().any(|n| n["id"] == d.ready.as_str()));
                }
            } else if args == ["list"] {
                assert_eq!(row_count(&stdout), rows, "{stdout}");
            }
        }
    }
    // Nothing unreadable: nothing said.
    let clean = Fixture::new(backend).await;
    populate(&clean.store).await;
    for cmd in ["list", "request-list", "image-list"] {
        let out = clean.run(&[cmd]).await;
        out.ok();
        assert!(warnings(&out).is_empty(), "{cmd}: {}", out.stderr);
    }
}
both_stores!(unreadable_records_are_named_on_stderr);
