//! The builder runtime (`nodepool_core::builder`) end to end: real
//! `DibBuilder` running `fake-disk-image-create` (a real program,
//! `nodepool-dib`'s stand-in for diskimage-builder), the simulated cloud
//! receiving real uploads (checksums verified), the in-memory store and a
//! SQLite file. Waits poll real conditions; "nothing happens" is checked
//! over counted planning passes.

// Helpers outside #[test] fns panic on purpose, like the tests themselves.
#![allow(clippy::unwrap_used)]

// nodepool-dib's own test helpers (procfs checks, specs from YAML, bounded
// polling), shared rather than copied.
#[path = "../../nodepool-dib/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use nodepool_core::builder::{Builder, BuilderSettings, BuilderStatus};
use nodepool_core::config::Config;
use nodepool_core::launcher::ProviderFactory;
use nodepool_core::model::{BuildState, ComponentKind, UploadState};
use nodepool_core::provider::{CloudImageInfo, ImageUploadSpec, Provider};
use nodepool_core::store::{BuildRecord, ImageState, Store, UploadRecord};
use nodepool_dib::{DibBuilder, DibOptions};
use nodepool_model::store::MemoryStore;
use nodepool_simulated::SimulatedProvider;
use nodepool_tests::workspace_binary;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(60);

type Clouds = Arc<Mutex<BTreeMap<String, Arc<SimulatedProvider>>>>;

/// A scratch installation: images, logs, elements, scripts.
struct Site {
    dir: tempfile::TempDir,
    /// The fake diskimage-builder.
    fake: PathBuf,
}

impl Site {
    async fn new() -> Self {
        // Built by Cargo on first use (blocking).
        let fake = tokio::task::spawn_blocking(|| {
            workspace_binary("nodepool-dib", "fake-disk-image-create")
        })
        .await
        .unwrap();
        Site {
            dir: tempfile::tempdir().unwrap(),
            fake,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn images(&self) -> PathBuf {
        self.path("images")
    }

    /// A configuration: `deb` built by the fake (extra diskimage YAML
    /// lines in `image`), uploaded to `p1` (qcow2) and `p2` (raw), with
    /// `providers_extra` appended to each provider.
    fn config(&self, image: &str, providers_extra: &str) -> Config {
        let mut c = config(&self.yaml(image, providers_extra));
        // Stands for clouds.yaml `image_format: raw` of p2's cloud.
        c.providers[1].image_format = Some("raw".into());
        c
    }

    /// The YAML text of [`Site::config`].
    fn yaml(&self, image: &str, providers_extra: &str) -> String {
        format!(
            r#"images-dir: {images}
build-log-dir: {logs}
elements-dir: {elements}
build-log-retention: 2
labels:
  - name: small
diskimages:
  - name: deb
    dib-cmd: {fake}
    elements: [debian-minimal, vm]
    release: bookworm
    metadata: {{os: debian, team: infra}}
{image}
providers:
  - name: p1
    driver: simulated
    image-name-format: "{{image_name}}-{{upload_id}}"
    diskimages: [{{name: deb, meta: {{team: ci}}}}]
{providers_extra}
    pools:
      - name: main
        max-servers: 5
        labels: [{{name: small, diskimage: deb, flavor-name: "Fake Flavor"}}]
  - name: p2
    driver: simulated
    diskimages: [{{name: deb}}]
{providers_extra}
    pools:
      - name: main
        max-servers: 5
        labels: [{{name: small, diskimage: deb, flavor-name: "Fake Flavor"}}]
"#,
            fake = self.fake.display(),
            images = self.images().display(),
            logs = self.path("logs").display(),
            elements = self.path("elements").display(),
        )
    }

    /// Writes an executable script.
    fn script(&self, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.path(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }
}

struct Running {
    shutdown: CancellationToken,
    config: watch::Sender<Arc<Config>>,
    task: tokio::task::JoinHandle<()>,
    status: Arc<BuilderStatus>,
    store: Store,
    metrics: Arc<nodepool_core::launcher::Metrics>,
}

fn factory(clouds: &Clouds) -> ProviderFactory {
    let registry = clouds.clone();
    Arc::new(move |pc| {
        let mut reg = registry.lock().unwrap();
        if let Some(p) = reg.get(&pc.name) {
            // One cloud across reloads and builders, as a real one.
            return Ok(p.clone() as Arc<dyn Provider>);
        }
        let p = Arc::new(SimulatedProvider::new(pc).map_err(|e| e.to_string())?);
        reg.insert(pc.name.clone(), p.clone());
        Ok(p as Arc<dyn Provider>)
    })
}

fn settings(host: &str) -> BuilderSettings {
    BuilderSettings {
        hostname: host.into(),
        max_pass_interval: Duration::from_millis(500),
        repeat_delay: Duration::from_millis(100),
        shutdown_grace: Duration::from_secs(30),
        log_pruner: Some(Arc::new(nodepool_dib::prune_build_logs)),
        ..BuilderSettings::default()
    }
}

fn start(store: Store, cfg: Config, host: &str, clouds: &Clouds) -> Running {
    start_with(store, cfg, settings(host), clouds)
}

fn start_with(store: Store, cfg: Config, settings: BuilderSettings, clouds: &Clouds) -> Running {
    start_on(store, cfg, settings, factory(clouds))
}

fn start_on(
    store: Store,
    cfg: Config,
    settings: BuilderSettings,
    providers: ProviderFactory,
) -> Running {
    let dib = DibBuilder::new(DibOptions::default().with_term_grace(Duration::from_secs(5)));
    let builder = Builder::new(store.clone(), providers, Arc::new(dib), settings);
    let status = builder.status();
    let metrics = builder.metrics();
    let (tx, rx) = watch::channel(Arc::new(cfg));
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        builder.run(rx, stop).await.expect("builder runs");
    });
    Running {
        shutdown,
        config: tx,
        task,
        status,
        store,
        metrics,
    }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }

    async fn images(&self) -> ImageState {
        self.store.image_state().await.unwrap()
    }

    /// Waits until `f` holds on the store's image state.
    async fn until(&self, what: &str, f: impl Fn(&ImageState) -> bool) -> ImageState {
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            let st = self.images().await;
            if f(&st) {
                return st;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {st:#?}\n{}",
                self.status.report()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for `n` more planning passes (to see that nothing happens).
    async fn passes(&self, n: u64) {
        tokio::time::timeout(LIMIT, self.status.passes().more(n))
            .await
            .expect("planning passes within the limit")
            .expect("the builder runs");
    }
}

fn cloud(clouds: &Clouds, name: &str) -> Arc<SimulatedProvider> {
    clouds.lock().unwrap().get(name).cloned().unwrap()
}

async fn cloud_images(clouds: &Clouds, name: &str) -> Vec<CloudImageInfo> {
    cloud(clouds, name).list_images().await.unwrap()
}

fn ready_builds<'a>(st: &'a ImageState, image: &str) -> Vec<&'a BuildRecord> {
    let mut v: Vec<_> = st
        .builds
        .iter()
        .filter(|b| b.image == image && b.build.state == BuildState::Ready)
        .collect();
    v.sort_by(|a, b| a.build.state_time.total_cmp(&b.build.state_time));
    v
}

fn ready_uploads<'a>(st: &'a ImageState, build: &str) -> Vec<&'a UploadRecord> {
    st.uploads
        .iter()
        .filter(|u| u.build_id == build && u.upload.state == UploadState::Ready)
        .collect()
}

/// The newest ready build has a ready upload on both providers.
fn uploaded_everywhere(st: &ImageState) -> bool {
    ready_builds(st, "deb").last().is_some_and(|b| {
        let ups = ready_uploads(st, &b.id);
        ["p1", "p2"]
            .iter()
            .all(|p| ups.iter().any(|u| u.provider == *p))
    })
}

fn files_of(site: &Site, build: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(site.images())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(build))
        .collect();
    v.sort();
    v
}

/// Checks the whole first-build path on a store: build record, files,
/// log, uploads to two providers in their formats with checksums and
/// properties, the component registration.
async fn build_then_upload_to_two_providers(store: Store) {
    let site = Site::new().await;
    let clouds = Clouds::default();
    let b = start(store, site.config("", ""), "nb01", &clouds);
    let st = b
        .until("a build uploaded to p1 and p2", uploaded_everywhere)
        .await;
    let build = ready_builds(&st, "deb")[0];
    let id = build.id.clone();
    assert_eq!(id.len(), 32);
    assert_eq!(build.build.formats, ["qcow2", "raw"]);
    assert_eq!(build.build.builder.as_deref(), Some("nb01"));
    let builder_id = std::fs::read_to_string(site.images().join("builder_id.txt")).unwrap();
    assert_eq!(build.build.builder_id.as_deref(), Some(builder_id.as_str()));
    assert_eq!(b.status.builder_id(), builder_id);
    assert_eq!(build.build.username.as_deref(), Some("zuul"));
    let log = std::fs::read_to_string(site.path(&format!("logs/deb-{id}.log"))).unwrap();
    assert!(log.ends_with("Exit code: 0\n"), "{log}");
    let files = files_of(&site, &id);
    for f in [
        "qcow2",
        "qcow2.md5",
        "qcow2.sha256",
        "raw",
        "raw.md5",
        "raw.sha256",
    ] {
        assert!(files.contains(&format!("deb-{id}.{f}")), "{files:?}");
    }
    for (p, fmt) in [("p1", "qcow2"), ("p2", "raw")] {
        let u = ready_uploads(&st, &id)
            .into_iter()
            .find(|u| u.provider == p)
            .unwrap();
        assert_eq!(u.upload.format.as_deref(), Some(fmt));
        let images = cloud_images(&clouds, p).await;
        assert_eq!(images.len(), 1, "{images:?}");
        let img = &images[0];
        assert_eq!(u.upload.external_id.as_deref(), Some(img.id.as_str()));
        assert_eq!(u.upload.external_name.as_deref(), Some(img.name.as_str()));
        let file = site.images().join(format!("deb-{id}.{fmt}"));
        // The cloud checked these against the bytes it received.
        assert_eq!(
            img.properties.get("owner_specified.openstack.sha256"),
            Some(&sha256_of(&file))
        );
        assert!(img.properties.contains_key("owner_specified.openstack.md5"));
        assert_eq!(img.properties["nodepool_build_id"], id);
        assert_eq!(img.properties["nodepool_upload_id"], u.id);
        assert_eq!(img.properties["nodepool_provider_name"], p);
        assert_eq!(img.properties["os"], "debian");
        let team = if p == "p1" { "ci" } else { "infra" };
        assert_eq!(img.properties["team"], team, "provider meta overrides");
        if p == "p1" {
            assert_eq!(img.name, format!("deb-{}", u.id));
        }
    }
    let comps = b
        .store
        .list_components(ComponentKind::Builder)
        .await
        .unwrap();
    assert_eq!(comps.records.len(), 1);
    assert_eq!(comps.records[0].1.hostname, "nb01");
    // Settled: nothing more is built or uploaded.
    b.passes(3).await;
    let again = b.images().await;
    assert_eq!(again.builds.len(), 1);
    assert_eq!(again.uploads.len(), 2);
    let store = b.store.clone();
    b.stop().await;
    let comps = store.list_components(ComponentKind::Builder).await.unwrap();
    assert!(comps.records.is_empty(), "unregistered at stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_is_uploaded_to_two_providers() {
    build_then_upload_to_two_providers(Store::new(Arc::new(MemoryStore::new()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_is_uploaded_to_two_providers_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = nodepool_sqlite::SqliteStore::open(
        &dir.path().join("nodepool.db"),
        nodepool_sqlite::SqliteOptions::default(),
    )
    .await
    .unwrap();
    let store = Store::new(Arc::new(store));
    build_then_upload_to_two_providers(store.clone()).await;
    store.backend().close().await.unwrap();
}

/// Asks for a build and waits until it is ready and uploaded everywhere;
/// returns its id.
async fn one_more_build(b: &Running) -> String {
    let before: Vec<String> = ready_builds(&b.images().await, "deb")
        .iter()
        .map(|x| x.id.clone())
        .collect();
    b.store.request_image_build("deb").await.unwrap();
    let st = b
        .until("a new build uploaded everywhere", |st| {
            ready_builds(st, "deb")
                .last()
                .is_some_and(|x| !before.contains(&x.id))
                && uploaded_everywhere(st)
                && !st.build_requests.contains_key("deb")
        })
        .await;
    ready_builds(&st, "deb").last().unwrap().id.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_two_builds_and_deletes_the_rest_everywhere() {
    let site = Site::new().await;
    let clouds = Clouds::default();
    let store = Store::new(Arc::new(MemoryStore::new()));
    let b = start(store, site.config("", ""), "nb01", &clouds);
    b.until("the first build", uploaded_everywhere).await;
    let first = ready_builds(&b.images().await, "deb")[0].id.clone();
    let second = one_more_build(&b).await;
    let third = one_more_build(&b).await;
    let st = b
        .until("the first build deleted", |st| {
            !st.builds.iter().any(|x| x.id == first)
        })
        .await;
    let kept: Vec<&str> = ready_builds(&st, "deb")
        .iter()
        .map(|x| x.id.as_str())
        .collect();
    assert_eq!(kept, [second.as_str(), third.as_str()]);
    assert_eq!(st.uploads.len(), 4);
    for p in ["p1", "p2"] {
        let images = cloud_images(&clouds, p).await;
        assert_eq!(images.len(), 2, "{p}: {images:?}");
        assert!(
            images
                .iter()
                .all(|i| i.properties["nodepool_build_id"] != first)
        );
    }
    wait_for("the first build's files deleted", LIMIT, || {
        files_of(&site, &first).is_empty()
    })
    .await;
    assert!(!files_of(&site, &second).is_empty());
    // build-log-retention: 2 keeps the two newest logs before each build
    // (as Python), then the build writes its own.
    let logs: Vec<_> = std::fs::read_dir(site.path("logs")).unwrap().collect();
    assert_eq!(logs.len(), 3);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_image_is_not_built_until_unpaused() {
    let site = Site::new().await;
    let clouds = Clouds::default();
    let store = Store::new(Arc::new(MemoryStore::new()));
    store.set_image_paused("deb", true).await.unwrap();
    store.request_image_build("deb").await.unwrap();
    let b = start(store.clone(), site.config("", ""), "nb01", &clouds);
    b.passes(5).await;
    assert!(b.images().await.builds.is_empty());
    store.set_image_paused("deb", false).await.unwrap();
    b.until("a build after unpausing", uploaded_everywhere)
        .await;
    // Paused in the configuration this time (a reload).
    b.config
        .send(Arc::new(site.config("    pause: true", "")))
        .unwrap();
    b.passes(2).await;
    store.request_image_build("deb").await.unwrap();
    b.passes(5).await;
    assert_eq!(b.images().await.builds.len(), 1);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_by_deleting_the_newest_build_keeps_the_previous_one() {
    let site = Site::new().await;
    let clouds = Clouds::default();
    let store = Store::new(Arc::new(MemoryStore::new()));
    let b = start(store.clone(), site.config("", ""), "nb01", &clouds);
    b.until("the first build", uploaded_everywhere).await;
    let previous = ready_builds(&b.images().await, "deb")[0].id.clone();
    let newest = one_more_build(&b).await;
    // Seed 000: pause, then `nodepool dib-image-delete deb-<newest>`.
    store.set_image_paused("deb", true).await.unwrap();
    let v = store.get_build("deb", &newest).await.unwrap().unwrap();
    let mut rec = v.value;
    rec.set_state(BuildState::Deleting, nodepool_core::model::epoch_now());
    store
        .update_build("deb", &newest, &rec, Some(v.version))
        .await
        .unwrap();
    let st = b
        .until("the newest build gone", |st| {
            !st.builds.iter().any(|x| x.id == newest)
        })
        .await;
    assert!(st.uploads.iter().all(|u| u.build_id == previous));
    assert_eq!(ready_uploads(&st, &previous).len(), 2);
    for p in ["p1", "p2"] {
        let images = cloud_images(&clouds, p).await;
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].properties["nodepool_build_id"], previous);
    }
    assert!(files_of(&site, &newest).is_empty());
    b.passes(4).await;
    let st = b.images().await;
    assert_eq!(st.builds.len(), 1, "paused: not rebuilt");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_provider_deletes_its_uploads() {
    let site = Site::new().await;
    let clouds = Clouds::default();
    let store = Store::new(Arc::new(MemoryStore::new()));
    let b = start(store, site.config("", ""), "nb01", &clouds);
    b.until("the first build", uploaded_everywhere).await;
    // Seed 001: p2 keeps no images and every pool at max-servers -1.
    let mut cfg = site.config("", "");
    cfg.providers[1].diskimages.clear();
    for pool in &mut cfg.providers[1].pools {
        pool.max_servers = Some(-1);
        pool.labels.clear();
    }
    b.config.send(Arc::new(cfg)).unwrap();
    let st = b
        .until("p2's upload deleted", |st| {
            st.uploads.iter().all(|u| u.provider != "p2")
        })
        .await;
    assert!(cloud_images(&clouds, "p2").await.is_empty());
    assert_eq!(cloud_images(&clouds, "p1").await.len(), 1);
    assert_eq!(st.uploads.len(), 1);
    b.passes(3).await;
    assert!(cloud_images(&clouds, "p2").await.is_empty(), "nothing new");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_builders_build_and_upload_are_recovered_by_another() {
    let site = Site::new().await;
    let clouds = Clouds::default();
    let mem = MemoryStore::new();
    // Builder A hangs in diskimage-builder, then dies: its runtime (the
    // stand-in for its process) goes away with every task, and its store
    // session expires.
    let mem_a = mem.new_session();
    let store_a = Store::new(Arc::new(mem_a.clone()));
    let rt_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let a = {
        let _in_a = rt_a.enter();
        start(
            store_a,
            site.config("    env-vars: {FAKE_DIB_HANG: \"1\"}", ""),
            "nb-a",
            &clouds,
        )
    };
    let st = a
        .until("A building", |st| {
            st.builds
                .iter()
                .any(|b| b.build.state == BuildState::Building)
                && st.build_locked.contains("deb")
        })
        .await;
    let dead = st.builds[0].id.clone();
    let log = site.path(&format!("logs/deb-{dead}.log"));
    wait_for("the fake to hang", LIMIT, || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("pgid"))
    })
    .await;
    let (_, child) = fake_pids(&std::fs::read_to_string(&log).unwrap());
    rt_a.shutdown_background();
    mem_a.expire_session();
    drop(a);
    // Another dead upload: a ready build of B's own with an `uploading`
    // record nobody holds and a half-made cloud image tagged with it.
    let store = Store::new(Arc::new(mem.clone()));
    let b = start(store.clone(), site.config("", ""), "nb-b", &clouds);
    let st = b
        .until("B's build uploaded", |st| {
            uploaded_everywhere(st) && !st.builds.iter().any(|x| x.id == dead)
        })
        .await;
    assert_eq!(st.builds.len(), 1);
    let good = st.builds[0].id.clone();
    // Set up under the upload lock, as the uploader that died held it:
    // B must not see the record before its half-made image exists.
    let dying = store
        .lock(
            &nodepool_model::store::paths::uploads_lock("deb", &good, "p1"),
            nodepool_model::store::LockWait::NonBlocking,
        )
        .await
        .unwrap();
    let stale = store
        .create_upload(
            "deb",
            &good,
            "p1",
            &nodepool_core::model::ImageUpload::new(
                nodepool_core::model::epoch_now(),
                Some("qcow2".into()),
            ),
        )
        .await
        .unwrap();
    let file = site.images().join(format!("deb-{good}.qcow2"));
    let leftover = cloud(&clouds, "p1")
        .upload_image(&ImageUploadSpec {
            name: "half-made".into(),
            path: file,
            format: "qcow2".into(),
            properties: [
                ("nodepool_build_id".to_owned(), good.clone()),
                ("nodepool_upload_id".to_owned(), stale.clone()),
                ("nodepool_provider_name".to_owned(), "p1".to_owned()),
            ]
            .into_iter()
            .collect(),
            md5: None,
            sha256: None,
            timeout: Duration::from_secs(30),
            sent: Default::default(),
        })
        .await
        .unwrap();
    dying.release().await.unwrap();
    b.until("the dead upload removed", |st| {
        !st.uploads
            .iter()
            .any(|u| u.id == stale && u.build_id == good && u.provider == "p1")
    })
    .await;
    let images = cloud_images(&clouds, "p1").await;
    assert!(images.iter().all(|i| i.id != leftover), "{images:?}");
    assert_eq!(images.len(), 1);
    // A's diskimage-builder did not outlive A.
    if let Some(child) = child {
        wait_for("A's build processes gone", LIMIT, || !alive(child)).await;
    }
    assert!(files_of(&site, &dead).is_empty());
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_past_its_timeout_is_killed_and_recorded_failed() {
    let site = Site::new().await;
    let clouds = Clouds::default();
    let store = Store::new(Arc::new(MemoryStore::new()));
    let b = start(
        store,
        site.config(
            "    build-timeout: 1\n    env-vars: {FAKE_DIB_HANG: \"1\"}",
            "",
        ),
        "nb01",
        &clouds,
    );
    let st = b
        .until("the build failed", |st| {
            st.builds
                .iter()
                .any(|x| x.build.state == BuildState::Failed)
        })
        .await;
    let rec = &st.builds[0];
    let tail = rec.build.extra["log_tail"].decode::<String>().unwrap();
    assert!(tail.contains("timed out"), "{tail}");
    let log = std::fs::read_to_string(site.path(&format!("logs/deb-{}.log", rec.id))).unwrap();
    let (pgid, child) = fake_pids(&log);
    let pgid = pgid.expect("the fake prints its pgid");
    assert_eq!(live_group_members(pgid), Vec::<i32>::new());
    if let Some(c) = child {
        assert!(!alive(c));
    }
    assert!(files_of(&site, &rec.id).is_empty());
    // Backed off: not rebuilt at once.
    b.passes(4).await;
    assert_eq!(b.images().await.builds.len(), 1);
    assert!(b.images().await.uploads.is_empty());
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_post_upload_hook_fails_the_upload_and_deletes_the_cloud_image() {
    let site = Site::new().await;
    let clouds = Clouds::default();
    let args = site.path("hook-args");
    let hook = site.script(
        "hook.sh",
        &format!(
            "echo \"$@\" >> {}\necho hook output for $1\n[ \"$1\" = p1 ]",
            args.display()
        ),
    );
    let store = Store::new(Arc::new(MemoryStore::new()));
    let b = start(
        store,
        site.config("", &format!("    post-upload-hook: {}", hook.display())),
        "nb01",
        &clouds,
    );
    let st = b
        .until("p1 ready and p2 failed", |st| {
            st.uploads
                .iter()
                .any(|u| u.provider == "p1" && u.upload.state == UploadState::Ready)
                && st
                    .uploads
                    .iter()
                    .any(|u| u.provider == "p2" && u.upload.state == UploadState::Failed)
        })
        .await;
    let build = &st.builds[0].id;
    let p1 = st.uploads.iter().find(|u| u.provider == "p1").unwrap();
    let calls = std::fs::read_to_string(&args).unwrap();
    let ext = p1.upload.external_id.clone().unwrap();
    assert!(
        calls.contains(&format!(
            "p1 {ext} {}",
            site.images().join(format!("deb-{build}.qcow2")).display()
        )),
        "{calls}"
    );
    assert!(calls.contains(&format!("deb-{build}.raw")), "{calls}");
    assert_eq!(cloud_images(&clouds, "p1").await.len(), 1);
    assert!(
        cloud_images(&clouds, "p2").await.is_empty(),
        "the failed upload's image is deleted"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_cancels_a_running_build_and_leaves_no_process() {
    let site = Site::new().await;
    let clouds = Clouds::default();
    let store = Store::new(Arc::new(MemoryStore::new()));
    let b = start(
        store.clone(),
        site.config("    env-vars: {FAKE_DIB_HANG: \"1\"}", ""),
        "nb01",
        &clouds,
    );
    let st = b
        .until("building", |st| {
            st.builds
                .iter()
                .any(|x| x.build.state == BuildState::Building)
        })
        .await;
    let id = st.builds[0].id.clone();
    let log = site.path(&format!("logs/deb-{id}.log"));
    wait_for("the fake to hang", LIMIT, || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("pgid"))
    })
    .await;
    b.stop().await;
    let st = store.image_state().await.unwrap();
    assert_eq!(st.builds[0].build.state, BuildState::Failed);
    assert!(st.build_locked.is_empty());
    let (pgid, _) = fake_pids(&std::fs::read_to_string(&log).unwrap());
    assert_eq!(live_group_members(pgid.unwrap()), Vec::<i32>::new());
    assert!(files_of(&site, &id).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_request_uploads_the_newest_build_again() {
    let site = Site::new().await;
    let clouds = Clouds::default();
    let store = Store::new(Arc::new(MemoryStore::new()));
    let b = start(store.clone(), site.config("", ""), "nb01", &clouds);
    let st = b.until("the first build", uploaded_everywhere).await;
    let old = st
        .uploads
        .iter()
        .find(|u| u.provider == "p1")
        .unwrap()
        .upload
        .external_id
        .clone()
        .unwrap();
    // `nodepool image-upload p1 deb`
    store.request_image_upload("deb", "p1").await.unwrap();
    let st = b
        .until(
            "a fresh p1 upload, the request cleared, the old copy gone",
            |st| {
                st.upload_requests.is_empty()
                    && st.uploads.iter().filter(|u| u.provider == "p1").count() == 1
                    && st.uploads.iter().any(|u| {
                        u.provider == "p1" && u.upload.external_id.as_deref() != Some(old.as_str())
                    })
            },
        )
        .await;
    let images = cloud_images(&clouds, "p1").await;
    assert_eq!(images.len(), 1);
    assert_ne!(images[0].id, old);
    assert_eq!(st.uploads.len(), 2);
    b.stop().await;
}

/// Uploads `file` to `provider`'s cloud as someone other than the builder
/// would, with these properties; returns the cloud image id.
async fn stray_image(
    clouds: &Clouds,
    provider: &str,
    name: &str,
    file: PathBuf,
    props: &[(&str, &str)],
) -> String {
    cloud(clouds, provider)
        .upload_image(&ImageUploadSpec {
            name: name.into(),
            path: file,
            format: "qcow2".into(),
            properties: props
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            md5: None,
            sha256: None,
            timeout: Duration::from_secs(30),
            sent: Default::default(),
        })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_unknown_to_the_store_are_deleted_and_alien_images_stay() {
    let site = Site::new().await;
    let clouds = Clouds::default();
    let store = Store::new(Arc::new(MemoryStore::new()));
    let cfg = site.config("", "");
    let b = start_with(
        store.clone(),
        cfg.clone(),
        BuilderSettings {
            leak_check_interval: Duration::from_millis(200),
            ..settings("nb01")
        },
        &clouds,
    );
    let st = b.until("the first build", uploaded_everywhere).await;
    let build = st.builds[0].id.clone();
    let file = site.images().join(format!("deb-{build}.qcow2"));
    // What a builder killed mid-upload leaves: an image tagged as an
    // upload of p1 whose record is gone.
    let leaked = stray_image(
        &clouds,
        "p1",
        "deb-0000000099",
        file.clone(),
        &[
            ("nodepool_build_id", &build),
            ("nodepool_upload_id", "0000000099"),
            ("nodepool_provider_name", "p1"),
        ],
    )
    .await;
    // Not ours to delete: a build id without the provider and upload tags
    // (another installation's), and an image with no tags at all.
    let alien = stray_image(
        &clouds,
        "p1",
        "someone-elses",
        file.clone(),
        &[("nodepool_build_id", "feedfacefeedfacefeedfacefeedface")],
    )
    .await;
    let plain = stray_image(&clouds, "p1", "plain", file, &[]).await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    while cloud_images(&clouds, "p1")
        .await
        .iter()
        .any(|i| i.id == leaked)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leaked image is still there\n{}",
            b.status.report()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The ready uploads and the images that are not ours are all there.
    let st = b.images().await;
    for p in ["p1", "p2"] {
        let ids: Vec<String> = cloud_images(&clouds, p)
            .await
            .into_iter()
            .map(|i| i.id)
            .collect();
        for u in st.uploads.iter().filter(|u| u.provider == p) {
            assert_eq!(u.upload.state, UploadState::Ready);
            let ext = u.upload.external_id.clone().unwrap();
            assert!(ids.contains(&ext), "{p}: upload {ext} kept: {ids:?}");
        }
        if p == "p1" {
            assert!(ids.contains(&alien) && ids.contains(&plain), "{ids:?}");
            assert_eq!(ids.len(), 3);
        } else {
            assert_eq!(ids.len(), 1);
        }
    }
    // `nodepool alien-image-list` shows what is not ours, and nothing else.
    let aliens = nodepool_core::admin::alien_images(&cfg, &store, &factory(&clouds), None)
        .await
        .unwrap();
    assert!(aliens.unlisted.is_empty(), "{:?}", aliens.unlisted);
    let found: Vec<(&str, &str)> = aliens
        .found
        .iter()
        .map(|a| (a.provider.as_str(), a.id.as_str()))
        .collect();
    assert_eq!(found, [("p1", alien.as_str())]);
    assert_eq!(
        b.metrics.counter("nodepool.provider.p1.leaked.images"),
        1,
        "the deletion is counted"
    );
    b.stop().await;
}

/// A running upload's record carries its progress (the file's size, the
/// bytes the cloud took so far), written while the cloud does not answer;
/// the ready record has every byte counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_publishes_its_progress_in_its_record() {
    use nodepool_simulated::faults::Operation;
    let site = Site::new().await;
    let (clouds, providers) = faulty_clouds(true);
    let store = Store::new(Arc::new(MemoryStore::new()));
    let b = start_on(store, site.config("", ""), settings("nb01"), providers);
    let st = b
        .until("a hung upload to p1 with its progress", |st| {
            st.uploads.iter().any(|u| {
                u.provider == "p1"
                    && u.upload.state == UploadState::Uploading
                    && u.upload.progress().is_some()
            })
        })
        .await;
    let u = st.uploads.iter().find(|u| u.provider == "p1").unwrap();
    let build = u.build_id.clone();
    let size = std::fs::metadata(site.images().join(format!("deb-{build}.qcow2")))
        .unwrap()
        .len();
    let p = u.upload.progress().unwrap();
    assert_eq!((p.bytes_sent, p.total_bytes), (0, size), "nothing sent yet");

    for faulty in clouds.lock().unwrap().values() {
        faulty.clear(Operation::UploadImage);
    }
    let st = b.until("the uploads done", uploaded_everywhere).await;
    for u in st.uploads.iter().filter(|u| u.build_id == build) {
        let p = u.upload.progress().unwrap();
        assert!(p.total_bytes > 0, "{p:?}");
        assert_eq!(p.bytes_sent, p.total_bytes, "{}: {p:?}", u.provider);
    }
    b.stop().await;
}

type FaultyClouds = Arc<Mutex<BTreeMap<String, nodepool_simulated::faults::FaultyProvider>>>;

/// Simulated clouds behind fault injectors (kept to steer them); with
/// `hang`, every upload hangs until the faults change.
fn faulty_clouds(hang: bool) -> (FaultyClouds, ProviderFactory) {
    use nodepool_simulated::faults::{Fault, FaultyProvider, Operation};
    let clouds: FaultyClouds = Arc::default();
    let registry = clouds.clone();
    let providers: ProviderFactory = Arc::new(move |pc| {
        let mut reg = registry.lock().unwrap();
        if let Some(p) = reg.get(&pc.name) {
            return Ok(Arc::new(p.clone()) as Arc<dyn Provider>);
        }
        let cloud = Arc::new(SimulatedProvider::new(pc).map_err(|e| e.to_string())?);
        let faulty = FaultyProvider::new(cloud);
        if hang {
            faulty.set(Operation::UploadImage, Fault::Hang);
        }
        reg.insert(pc.name.clone(), faulty.clone());
        Ok(Arc::new(faulty) as Arc<dyn Provider>)
    });
    (clouds, providers)
}

/// `nodepool image-upload p1 deb --wait` (the real binary, no terminal)
/// shows the bytes of an upload the cloud holds up, from the record the
/// builder (in this process, on the same SQLite file) publishes, and ends
/// when the upload is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_upload_wait_shows_the_bytes_of_a_held_up_upload() {
    use nodepool_simulated::faults::{Fault, Operation};
    use tokio::io::AsyncReadExt;
    let site = Site::new().await;
    let db = site.path("nodepool.db");
    let store = Store::new(Arc::new(
        nodepool_sqlite::SqliteStore::open(&db, nodepool_sqlite::SqliteOptions::default())
            .await
            .unwrap(),
    ));
    let cfg_path = site.path("nodepool.yaml");
    std::fs::write(
        &cfg_path,
        format!(
            "state-store:\n  driver: sqlite\n  path: {}\n{}",
            db.display(),
            site.yaml("", "")
        ),
    )
    .unwrap();
    let (clouds, providers) = faulty_clouds(false);
    let b = start_on(store, site.config("", ""), settings("nb01"), providers);
    b.until("the first build uploaded", uploaded_everywhere)
        .await;
    for faulty in clouds.lock().unwrap().values() {
        faulty.set(Operation::UploadImage, Fault::Hang);
    }

    let nodepool = tokio::task::spawn_blocking(|| workspace_binary("nodepool-cli", "nodepool"))
        .await
        .unwrap();
    let mut cli = tokio::process::Command::new(nodepool)
        .arg("-c")
        .arg(&cfg_path)
        .args(["image-upload", "p1", "deb", "--wait"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = cli.stderr.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 1024];
    let wanted = "of deb to p1: 0 B of 64.0 KiB (0%)\n";
    while !seen.contains(wanted) {
        let n = tokio::time::timeout(LIMIT, stderr.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no progress line within the limit: {seen}"))
            .unwrap();
        assert!(n > 0, "stderr ended without a progress line: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    for faulty in clouds.lock().unwrap().values() {
        faulty.clear(Operation::UploadImage);
    }
    let out = tokio::time::timeout(LIMIT, cli.wait_with_output())
        .await
        .expect("the CLI ends")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{seen}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.contains(" to p1 ready (64.0 KiB): cloud image "),
        "{stdout}"
    );
    b.stop().await;
}

/// A site whose `p1` boot-tests each new upload (`validate`) with
/// `check.sh` on a server that answers at a real sshd: the script leaves
/// a marker naming its server, fails when the file `fail` exists and
/// hangs when `hang` does. Retries of a failed upload wait an hour, so a
/// failure stays as it was recorded.
struct ValidatingSite {
    site: Site,
    sshd: nodepool_tests::sshd::Sshd,
    /// `validate.timeout`, seconds.
    timeout: u64,
    /// Whether servers answer at the sshd (else the simulated cloud
    /// skips nodescan: its servers have no network).
    reachable: bool,
}

impl ValidatingSite {
    async fn new() -> Self {
        let site = Site::new().await;
        std::fs::create_dir(site.path("scripts")).unwrap();
        let d = site.dir.path().display();
        std::fs::write(
            site.path("scripts/check.sh"),
            format!(
                "#!/bin/sh\necho \"validating on $NODEPOOL_NODE_ID\"\n\
                 if [ -e {d}/hang ]; then sleep 600; fi\n\
                 if [ -e {d}/fail ]; then echo 'no good: the image is broken' >&2; exit 3; fi\n\
                 echo \"$NODEPOOL_NODE_ID\" >> {d}/validated\n"
            ),
        )
        .unwrap();
        ValidatingSite {
            site,
            sshd: nodepool_tests::sshd::Sshd::start_with_login(),
            timeout: 3,
            reachable: true,
        }
    }

    fn config(&self) -> Config {
        let image = format!(
            "    username: {}\n    private-key: {}\n",
            self.sshd.user(),
            self.sshd.private_key().display()
        );
        let simulation = if self.reachable {
            "    simulation: {skip-nodescan: false, data-plane-host: 127.0.0.1, boot-delay: 0}"
        } else {
            ""
        };
        let yaml = self.site.yaml(&image, simulation).replace(
            "diskimages: [{name: deb, meta: {team: ci}}]",
            &format!(
                "diskimages: [{{name: deb, meta: {{team: ci}}, connection-port: {}, validate: {{script: check.sh, timeout: {}}}}}]",
                self.sshd.port(),
                self.timeout
            ),
        );
        let mut c = config(&format!(
            "script-dir: {}\n{yaml}",
            self.site.path("scripts").display()
        ));
        c.providers[1].image_format = Some("raw".into());
        c
    }

    fn start(&self, clouds: &Clouds) -> Running {
        let settings = BuilderSettings {
            retry_delay: Duration::from_secs(3600),
            max_retry_delay: Duration::from_secs(3600),
            ..settings("nb01")
        };
        let store = Store::new(Arc::new(MemoryStore::new()));
        start_with(store, self.config(), settings, clouds)
    }

    /// The servers the script ran on, in order.
    fn validated_on(&self) -> Vec<String> {
        std::fs::read_to_string(self.site.path("validated"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_is_ready_only_after_its_boot_test_passed_and_its_server_is_gone() {
    let v = ValidatingSite::new().await;
    let clouds = Clouds::default();
    let b = v.start(&clouds);
    let st = b
        .until("a build uploaded to p1 and p2", uploaded_everywhere)
        .await;
    let p1 = st.uploads.iter().find(|u| u.provider == "p1").unwrap();
    assert_eq!(p1.upload.state, UploadState::Ready);
    // By the time the record is ready, the script has run on a server
    // of this upload and that server is gone.
    assert_eq!(v.validated_on(), [format!("np-validate-deb-{}", p1.id)]);
    assert!(
        cloud(&clouds, "p1")
            .list_instances()
            .await
            .unwrap()
            .is_empty(),
        "the test server is deleted"
    );
    // p2 has no `validate`: no server was booted there.
    assert!(
        cloud(&clouds, "p2")
            .list_instances()
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        b.metrics
            .counter("nodepool.image_update.deb.p1.validate.success"),
        1
    );
    assert_eq!(
        b.metrics.value(
            &nodepool_core::launcher::metrics::families::IMAGE_VALIDATION,
            &[("image", "deb"), ("provider", "p1"), ("status", "success")]
        ),
        Some(1.0),
        "{}",
        b.metrics.prometheus()
    );
    b.stop().await;
}

/// Makes the boot test of the second build fail (`trigger` names the
/// file the script checks) and checks the outcome: the upload failed
/// with `reason`, its cloud image deleted, no server left, the first
/// build's upload still the current one.
async fn a_failed_boot_test_keeps_the_previous_image(trigger: &str, reason: &str) {
    let v = ValidatingSite::new().await;
    let clouds = Clouds::default();
    let b = v.start(&clouds);
    let st = b
        .until("a build uploaded to p1 and p2", uploaded_everywhere)
        .await;
    let first = st
        .uploads
        .iter()
        .find(|u| u.provider == "p1")
        .unwrap()
        .clone();
    std::fs::write(v.site.path(trigger), "").unwrap();
    let before = ready_builds(&st, "deb")[0].id.clone();
    b.store.request_image_build("deb").await.unwrap();
    let st = b
        .until("the second build's upload to p1 failed", |st| {
            st.uploads.iter().any(|u| {
                u.provider == "p1" && u.build_id != before && u.upload.state == UploadState::Failed
            })
        })
        .await;
    let failed = st
        .uploads
        .iter()
        .find(|u| u.provider == "p1" && u.build_id != before)
        .unwrap();
    let why = failed.upload.failure().unwrap_or_default();
    assert!(why.contains("validation failed"), "{why}");
    assert!(why.contains(reason), "{why}");
    assert!(why.contains("validating on np-validate-deb-"), "{why}");
    // The failed upload's image is gone, the previous one stays current.
    let images: Vec<String> = cloud_images(&clouds, "p1")
        .await
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(images, [first.upload.external_id.clone().unwrap()]);
    let ready: Vec<(&str, &str)> = st
        .uploads
        .iter()
        .filter(|u| u.provider == "p1" && u.upload.state == UploadState::Ready)
        .map(|u| (u.build_id.as_str(), u.id.as_str()))
        .collect();
    assert_eq!(ready, [(first.build_id.as_str(), first.id.as_str())]);
    assert!(
        cloud(&clouds, "p1")
            .list_instances()
            .await
            .unwrap()
            .is_empty(),
        "the test server is deleted"
    );
    assert_eq!(
        b.metrics
            .counter("nodepool.image_update.deb.p1.validate.failure"),
        1
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_boot_test_fails_the_upload_and_keeps_the_previous_image() {
    a_failed_boot_test_keeps_the_previous_image(
        "fail",
        "exited with status 3; output: validating on",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_boot_test_times_out_and_keeps_the_previous_image() {
    a_failed_boot_test_keeps_the_previous_image("hang", "did not finish within 3s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_builder_during_a_boot_test_deletes_its_server_and_image() {
    let mut v = ValidatingSite::new().await;
    v.timeout = 600;
    std::fs::write(v.site.path("hang"), "").unwrap();
    let clouds = Clouds::default();
    let b = v.start(&clouds);
    // The boot test is under way once its server exists.
    nodepool_tests::eventually("a test server", LIMIT, || async {
        let p1 = clouds.lock().unwrap().get("p1").cloned();
        match p1 {
            Some(p1) => !p1.list_instances().await.unwrap().is_empty(),
            None => false,
        }
    })
    .await;
    let store = b.store.clone();
    b.stop().await;
    assert!(
        cloud(&clouds, "p1")
            .list_instances()
            .await
            .unwrap()
            .is_empty(),
        "the test server is deleted when the builder stops"
    );
    assert!(
        cloud_images(&clouds, "p1").await.is_empty(),
        "the untested upload's image is deleted"
    );
    assert!(v.validated_on().is_empty());
    let st = store.image_state().await.unwrap();
    let p1 = st.uploads.iter().find(|u| u.provider == "p1").unwrap();
    assert_eq!(p1.upload.state, UploadState::Failed);
    let why = p1.upload.failure().unwrap_or_default();
    assert!(why.contains("the builder is stopping"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boot_test_on_a_cloud_without_network_fails_without_a_server() {
    let mut v = ValidatingSite::new().await;
    v.reachable = false;
    let clouds = Clouds::default();
    let b = v.start(&clouds);
    let st = b
        .until("the upload to p1 failed", |st| {
            st.uploads
                .iter()
                .any(|u| u.provider == "p1" && u.upload.state == UploadState::Failed)
        })
        .await;
    let p1 = st.uploads.iter().find(|u| u.provider == "p1").unwrap();
    let why = p1.upload.failure().unwrap_or_default();
    assert!(
        why.contains("the servers of p1 cannot be reached (it skips nodescan)"),
        "{why}"
    );
    assert!(
        cloud(&clouds, "p1")
            .list_instances()
            .await
            .unwrap()
            .is_empty()
    );
    assert!(cloud_images(&clouds, "p1").await.is_empty());
    b.stop().await;
}

/// A site with a snapshot image (seed 002): `prepared`, made on `sim` by
/// booting the cloud image `base` (its servers answer at a real sshd) and
/// running `setup.sh`, which leaves a marker naming its server when it
/// starts (`setup-started`, with its pid) and when it succeeds
/// (`setup-ran`), waits
/// while the file `hold` exists, and fails when the file `fail` exists.
/// `check.sh`, its boot test when configured, fails when the file
/// `fail-validate` exists. Label `prepared` boots it.
struct SnapshotSite {
    dir: tempfile::TempDir,
    sshd: nodepool_tests::sshd::Sshd,
    env: nodepool_tests::TestEnv,
}

impl SnapshotSite {
    fn new(backend: nodepool_tests::Backend) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("scripts")).unwrap();
        let d = dir.path().display();
        std::fs::write(
            dir.path().join("scripts/setup.sh"),
            format!(
                "#!/bin/sh\necho \"setting up $NODEPOOL_NODE_ID\"\n\
                 echo \"$NODEPOOL_NODE_ID $$\" >> {d}/setup-started\n\
                 while [ -e {d}/hold ]; do sleep 0.1; done\n\
                 if [ -e {d}/fail ]; then echo 'setup: no good' >&2; exit 4; fi\n\
                 echo \"$NODEPOOL_NODE_ID\" >> {d}/setup-ran\n"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("scripts/check.sh"),
            format!(
                "#!/bin/sh\necho \"validating on $NODEPOOL_NODE_ID\"\n\
                 if [ -e {d}/fail-validate ]; then echo 'no good: the snapshot is broken' >&2; exit 3; fi\n"
            ),
        )
        .unwrap();
        SnapshotSite {
            dir,
            sshd: nodepool_tests::sshd::Sshd::start_with_login(),
            env: nodepool_tests::TestEnv::new(backend),
        }
    }

    fn config(&self) -> Config {
        self.config_with("", None)
    }

    /// The configuration with `image_extra` (`, key: value` pairs) added
    /// to the snapshot image, and with `dib` (the fake diskimage-builder)
    /// a diskimage `deb` uploaded to `sim` as its base instead of `base`.
    fn config_with(&self, image_extra: &str, dib: Option<&std::path::Path>) -> Config {
        let d = self.dir.path().display();
        let port = self.sshd.port();
        let (base, diskimages, provider_diskimages) = match dib {
            None => ("base".to_owned(), String::new(), String::new()),
            Some(fake) => (
                "deb".to_owned(),
                format!(
                    "elements-dir: {d}/elements\ndiskimages:\n  - {{name: deb, dib-cmd: {}, elements: [debian-minimal, vm], release: bookworm}}\n",
                    fake.display()
                ),
                format!("    diskimages: [{{name: deb, connection-port: {port}}}]\n"),
            ),
        };
        self.env.config(&format!(
            r#"images-dir: {d}/images
build-log-dir: {d}/logs
script-dir: {d}/scripts
{diskimages}labels:
  - name: prepared
    min-ready: 1
providers:
  - name: sim
    driver: simulated
    simulation: {{skip-nodescan: false, data-plane-host: 127.0.0.1, boot-delay: 0}}
    cloud-images:
      - {{name: base, connection-port: {port}}}
{provider_diskimages}    images:
      - {{name: prepared, base-image: {base}, setup: setup.sh, username: {user}, private-key: {key}, min-ram: 1024{image_extra}}}
    pools:
      - name: main
        max-servers: 5
        labels: [{{name: prepared, diskimage: prepared, min-ram: 1024}}]
"#,
            user = self.sshd.user(),
            key = self.sshd.private_key().display(),
        ))
    }

    fn start(&self, store: Store, cfg: Config, host: &str, clouds: &Clouds) -> Running {
        // A failed snapshot stays as it was recorded (no retry).
        let settings = BuilderSettings {
            retry_delay: Duration::from_secs(3600),
            max_retry_delay: Duration::from_secs(3600),
            ..settings(host)
        };
        start_with(store, cfg, settings, clouds)
    }

    fn lines(&self, file: &str) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join(file))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn touch(&self, file: &str) {
        std::fs::write(self.dir.path().join(file), "").unwrap();
    }

    fn remove(&self, file: &str) {
        std::fs::remove_file(self.dir.path().join(file)).unwrap();
    }

    /// The servers the setup script ran on, in order.
    fn set_up_on(&self) -> Vec<String> {
        self.lines("setup-ran")
    }
}

/// The ready snapshot builds of `prepared` (oldest first) with their
/// ready upload to `sim`.
fn snapshots(st: &ImageState) -> Vec<(String, UploadRecord)> {
    ready_builds(st, "prepared")
        .iter()
        .filter_map(|b| {
            let u = ready_uploads(st, &b.id)
                .into_iter()
                .find(|u| u.provider == "sim")?;
            Some((b.id.clone(), u.clone()))
        })
        .collect()
}

async fn setup_servers(clouds: &Clouds) -> Vec<String> {
    cloud(clouds, "sim")
        .list_instances()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .filter(|n| n.starts_with("np-setup-"))
        .collect()
}

/// Waits until a ready node of label `prepared` runs on snapshot
/// `build`'s upload `upload` to `sim`.
async fn until_node_booted_from(store: &Store, build: &str, upload: &str) {
    let image_id = nodepool_core::store::paths::upload("prepared", build, "sim", upload);
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let nodes = store.list_nodes().await.unwrap().records;
        if nodes.iter().any(|n| {
            n.node.state == nodepool_core::model::NodeState::Ready
                && n.node.image_id.as_deref() == Some(image_id.as_str())
        }) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no ready node booted from {image_id}: {nodes:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Makes the newest snapshot look `rebuild-age` old (a day): its record
/// and the older ones' are backdated, as time would.
async fn age_snapshots(store: &Store, st: &ImageState) {
    let day = 86_400.0;
    for (n, (build, _)) in snapshots(st).iter().rev().enumerate() {
        let v = store.get_build("prepared", build).await.unwrap().unwrap();
        let mut rec = v.value;
        rec.state_time -= day * (n as f64 + 1.0) + 1.0;
        store
            .update_build("prepared", build, &rec, Some(v.version))
            .await
            .unwrap();
    }
}

/// The whole life of a snapshot image on a store: made by the builder
/// (setup ran on its server, which is gone), booted by a label, a second
/// kept with the first as previous, a third (rebuild-age) deleting the
/// oldest, `image-delete` of the newest rolling back, a failing setup
/// failing its build and deleting its server.
async fn snapshot_image_life(backend: nodepool_tests::Backend) {
    let site = SnapshotSite::new(backend);
    let cfg = site.config();
    let clouds = Clouds::default();
    let b = site.start(site.env.store(&cfg).await, cfg.clone(), "nb01", &clouds);

    // 1. The first snapshot: setup ran on its server, which is gone.
    let st = b.until("a snapshot", |st| snapshots(st).len() == 1).await;
    let (first, up1) = snapshots(&st).remove(0);
    assert_eq!(site.set_up_on(), [format!("np-setup-prepared-{}", up1.id)]);
    assert!(
        setup_servers(&clouds).await.is_empty(),
        "the setup server is deleted"
    );
    let ext1 = up1.upload.external_id.clone().unwrap();
    let images = cloud_images(&clouds, "sim").await;
    let img = images
        .iter()
        .find(|i| i.id == ext1)
        .expect("the snapshot is an image");
    assert_eq!(img.properties["nodepool_build_id"], first);
    assert_eq!(img.properties["nodepool_upload_id"], up1.id);
    assert_eq!(img.properties["nodepool_provider_name"], "sim");

    // 2. The label boots it (min-ready).
    let launcher = nodepool_tests::RunningLauncher::start(&site.env, &cfg, "nl01", &clouds).await;
    until_node_booted_from(&b.store, &first, &up1.id).await;
    launcher.stop().await;

    // 3. A requested snapshot becomes current; the first is kept.
    b.store.request_image_build("prepared").await.unwrap();
    let st = b
        .until("a second snapshot", |st| {
            snapshots(st).len() == 2 && !st.build_requests.contains_key("prepared")
        })
        .await;
    let second = snapshots(&st)[1].0.clone();
    assert_eq!(snapshots(&st)[0].0, first);

    // 4. At rebuild-age a third is made and the oldest goes, cloud image too.
    age_snapshots(&b.store, &st).await;
    let st = b
        .until("a third snapshot and the first gone", |st| {
            let s = snapshots(st);
            s.len() == 2 && s[0].0 == second && !st.builds.iter().any(|x| x.id == first)
        })
        .await;
    let (third, up3) = snapshots(&st)[1].clone();
    assert_eq!(site.set_up_on().len(), 3);
    let ids: Vec<String> = cloud_images(&clouds, "sim")
        .await
        .into_iter()
        .filter(|i| i.properties.contains_key("nodepool_build_id"))
        .map(|i| i.id)
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(!ids.contains(&ext1));

    // 5. `image-delete` of the newest rolls back to the second. Paused
    // first (seed 000's recipe): the second is past rebuild-age.
    b.store.set_image_paused("prepared", true).await.unwrap();
    let upload = nodepool_core::admin::UploadRef {
        image: "prepared".into(),
        build: third.clone(),
        provider: "sim".into(),
        upload: up3.id.clone(),
    };
    let read = nodepool_core::admin::upload_to_delete(&b.store, &upload)
        .await
        .unwrap();
    nodepool_core::admin::mark_upload_deleting(&b.store, &upload, read)
        .await
        .unwrap();
    let st = b
        .until("the newest snapshot gone", |st| {
            !st.builds.iter().any(|x| x.id == third)
        })
        .await;
    assert_eq!(
        snapshots(&st)
            .iter()
            .map(|s| s.0.as_str())
            .collect::<Vec<_>>(),
        [second.as_str()]
    );
    b.passes(4).await;
    assert_eq!(snapshots(&b.images().await).len(), 1, "not remade: paused");

    // 6. Unpaused, the second is remade (rebuild-age); a failing setup
    // fails its build and deletes its server.
    std::fs::write(site.dir.path().join("fail"), "").unwrap();
    b.store.set_image_paused("prepared", false).await.unwrap();
    let st = b
        .until("a failed snapshot", |st| {
            st.builds
                .iter()
                .any(|x| x.image == "prepared" && x.build.state == BuildState::Failed)
        })
        .await;
    let failed = st
        .builds
        .iter()
        .find(|x| x.build.state == BuildState::Failed)
        .unwrap();
    let why = failed.build.log_tail().unwrap_or_default();
    assert!(why.contains("exited with status 4"), "{why}");
    assert!(
        setup_servers(&clouds).await.is_empty(),
        "the setup server is deleted"
    );
    assert_eq!(
        snapshots(&st)
            .iter()
            .map(|s| s.0.clone())
            .collect::<Vec<_>>(),
        [second],
        "the previous snapshot stays current"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_image_is_made_booted_kept_rolled_back_on_zookeeper() {
    snapshot_image_life(nodepool_tests::Backend::ZooKeeper).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_image_is_made_booted_kept_rolled_back_on_sqlite() {
    snapshot_image_life(nodepool_tests::Backend::Sqlite).await;
}

/// The cloud images of `sim` that Nodepool made (tagged with a build).
async fn nodepool_images(clouds: &Clouds) -> Vec<String> {
    cloud_images(clouds, "sim")
        .await
        .into_iter()
        .filter(|i| i.properties.contains_key("nodepool_build_id"))
        .map(|i| i.id)
        .collect()
}

/// The servers on `sim` that the builder booted (setup and boot test).
async fn builder_servers(clouds: &Clouds) -> Vec<String> {
    cloud(clouds, "sim")
        .list_instances()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .filter(|n| n.starts_with("np-setup-") || n.starts_with("np-validate-"))
        .collect()
}

/// A snapshot failing its boot test (`validate`): its upload and build
/// are recorded failed saying why, its image is deleted and its test
/// server gone, the metric counts it, and the previous snapshot stays
/// the one labels boot.
async fn a_failing_validate_keeps_the_previous_snapshot(backend: nodepool_tests::Backend) {
    let site = SnapshotSite::new(backend);
    let cfg = site.config_with(", validate: {script: check.sh, timeout: 60}", None);
    let clouds = Clouds::default();
    let b = site.start(site.env.store(&cfg).await, cfg.clone(), "nb01", &clouds);
    let metric = |status: &str| {
        b.metrics.counter(&format!(
            "nodepool.image_update.prepared.sim.validate.{status}"
        ))
    };

    let st = b.until("a snapshot", |st| snapshots(st).len() == 1).await;
    let (first, up1) = snapshots(&st).remove(0);
    assert_eq!(metric("success"), 1, "{}", b.metrics.prometheus());
    assert!(builder_servers(&clouds).await.is_empty());

    site.touch("fail-validate");
    b.store.request_image_build("prepared").await.unwrap();
    let st = b
        .until("the second snapshot's upload failed", |st| {
            st.uploads
                .iter()
                .any(|u| u.build_id != first && u.upload.state == UploadState::Failed)
                && st
                    .builds
                    .iter()
                    .any(|x| x.id != first && x.build.state == BuildState::Failed)
        })
        .await;
    let failed = st.uploads.iter().find(|u| u.build_id != first).unwrap();
    let why = failed.upload.failure().unwrap_or_default();
    assert!(why.contains("validation failed"), "{why}");
    assert!(why.contains("exited with status 3"), "{why}");
    assert!(
        why.contains(&format!("validating on np-validate-prepared-{}", failed.id)),
        "{why}"
    );
    let build = st.builds.iter().find(|x| x.id != first).unwrap();
    let tail = build.build.log_tail().unwrap_or_default();
    assert!(tail.contains("no good: the snapshot is broken"), "{tail}");
    assert_eq!(metric("failure"), 1, "{}", b.metrics.prometheus());
    // Its setup ran; its image and both its servers are gone.
    assert_eq!(
        site.set_up_on(),
        [
            format!("np-setup-prepared-{}", up1.id),
            format!("np-setup-prepared-{}", failed.id)
        ]
    );
    assert_eq!(
        nodepool_images(&clouds).await,
        [up1.upload.external_id.clone().unwrap()]
    );
    assert!(builder_servers(&clouds).await.is_empty());
    assert_eq!(
        snapshots(&st).into_iter().map(|s| s.0).collect::<Vec<_>>(),
        [first.as_str()]
    );

    // The label boots the previous snapshot.
    let launcher = nodepool_tests::RunningLauncher::start(&site.env, &cfg, "nl01", &clouds).await;
    until_node_booted_from(&b.store, &first, &up1.id).await;
    launcher.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_failing_validate_keeps_the_previous_one_on_zookeeper() {
    a_failing_validate_keeps_the_previous_snapshot(nodepool_tests::Backend::ZooKeeper).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_failing_validate_keeps_the_previous_one_on_sqlite() {
    a_failing_validate_keeps_the_previous_snapshot(nodepool_tests::Backend::Sqlite).await;
}

/// Waits until the builder's setup server runs its script (held by the
/// file `hold`); returns its name and `groups` tag.
async fn until_setup_held(
    site: &SnapshotSite,
    clouds: &Clouds,
    started: usize,
) -> (String, String) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let sim = clouds.lock().unwrap().get("sim").cloned();
        let servers = match sim {
            Some(c) => c.list_instances().await.unwrap(),
            None => Vec::new(),
        };
        if site.lines("setup-started").len() == started
            && let Some(s) = servers.iter().find(|s| s.name.starts_with("np-setup-"))
        {
            let groups = s.metadata[nodepool_core::provider::META_GROUPS].clone();
            return (s.name.clone(), groups);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no setup script running within {LIMIT:?}: {servers:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A snapshot image over a diskimage of its provider: not made while the
/// diskimage has no ready upload there (paused), then made on a setup
/// server booted from that upload.
async fn a_snapshot_of_a_diskimage_waits_for_its_upload(backend: nodepool_tests::Backend) {
    let site = SnapshotSite::new(backend);
    let fake =
        tokio::task::spawn_blocking(|| workspace_binary("nodepool-dib", "fake-disk-image-create"))
            .await
            .unwrap();
    let cfg = site.config_with("", Some(&fake));
    let store = site.env.store(&cfg).await;
    store.set_image_paused("deb", true).await.unwrap();
    let clouds = Clouds::default();
    let b = site.start(store, cfg, "nb01", &clouds);

    b.passes(4).await;
    let st = b.images().await;
    assert!(st.builds.is_empty(), "{st:#?}");
    assert!(site.lines("setup-started").is_empty());
    assert!(builder_servers(&clouds).await.is_empty());

    site.touch("hold");
    b.store.set_image_paused("deb", false).await.unwrap();
    let (server, groups) = until_setup_held(&site, &clouds, 1).await;
    // Booted from the diskimage (`provider,image,label`), whose upload
    // was ready first.
    assert_eq!(groups, "sim,deb,prepared");
    let st = b.images().await;
    let deb = ready_builds(&st, "deb");
    assert_eq!(deb.len(), 1, "{st:#?}");
    assert_eq!(ready_uploads(&st, &deb[0].id).len(), 1, "{st:#?}");

    site.remove("hold");
    let st = b.until("a snapshot", |st| snapshots(st).len() == 1).await;
    let (_, up) = snapshots(&st).remove(0);
    assert_eq!(server, format!("np-setup-prepared-{}", up.id));
    assert_eq!(site.set_up_on(), [server]);
    assert!(builder_servers(&clouds).await.is_empty());
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_a_diskimage_waits_for_its_upload_on_zookeeper() {
    a_snapshot_of_a_diskimage_waits_for_its_upload(nodepool_tests::Backend::ZooKeeper).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_a_diskimage_waits_for_its_upload_on_sqlite() {
    a_snapshot_of_a_diskimage_waits_for_its_upload(nodepool_tests::Backend::Sqlite).await;
}

/// A builder dies (its runtime, the stand-in for its process, goes away
/// with every task, and its store session lapses) while its setup script
/// runs. Another builder and a launcher clean up after it: its `building`
/// build and `uploading` upload are removed, its setup server deleted (the
/// leak rule), and a new snapshot is made; the cloud holds nothing else
/// of the builders'.
async fn a_dead_builders_snapshot_is_cleaned_up(backend: nodepool_tests::Backend) {
    let site = SnapshotSite::new(backend);
    let cfg = site.config();
    let clouds = Clouds::default();
    // The cloud outlives the builder: made outside its runtime.
    factory(&clouds)(&cfg.providers[0]).unwrap();
    site.touch("hold");
    let rt_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cfg_a = cfg.clone();
    let store_a = rt_a
        .spawn(async move { nodepool_cli::daemon::open_store(&cfg_a).await.unwrap() })
        .await
        .unwrap();
    let a = {
        let _in_a = rt_a.enter();
        site.start(store_a, cfg.clone(), "nb-a", &clouds)
    };
    let (dead_server, _) = until_setup_held(&site, &clouds, 1).await;
    // Read on a session of this runtime: A's goes with A.
    let store_b = site.env.store(&cfg).await;
    let st = store_b.image_state().await.unwrap();
    let dead = st.builds[0].id.clone();
    assert_eq!(st.builds[0].build.state, BuildState::Building);
    rt_a.shutdown_background();
    drop(a);
    // Its connection gone, the script is ended on the server, before it
    // could finish.
    let started = site.lines("setup-started");
    let pid: i32 = started[0]
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    wait_for("the dead builder's setup script ended", LIMIT, || {
        !alive(pid)
    })
    .await;
    site.remove("hold");

    let b = site.start(store_b, cfg.clone(), "nb-b", &clouds);
    let launcher = nodepool_tests::RunningLauncher::start(&site.env, &cfg, "nl01", &clouds).await;
    let st = b
        .until("a new snapshot and the dead one's records gone", |st| {
            snapshots(st).len() == 1
                && !st.builds.iter().any(|x| x.id == dead)
                && st.builds.len() == 1
                && st.uploads.len() == 1
        })
        .await;
    let (_, up) = snapshots(&st).remove(0);
    nodepool_tests::eventually(
        &format!("the dead builder's setup server {dead_server} deleted"),
        LIMIT,
        || async { builder_servers(&clouds).await.is_empty() },
    )
    .await;
    assert_eq!(
        nodepool_images(&clouds).await,
        [up.upload.external_id.clone().unwrap()]
    );
    assert_eq!(
        site.set_up_on(),
        [format!("np-setup-prepared-{}", up.id)],
        "the dead builder's setup never finished"
    );
    assert_eq!(site.lines("setup-started").len(), 2);
    // The server leaves the listing while the delete call runs; the
    // launcher counts the leak when the call returns.
    wait_for("the setup server counted as a deleted leak", LIMIT, || {
        launcher
            .metrics
            .counter("nodepool.provider.sim.leaked.instances")
            >= 1
    })
    .await;
    launcher.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_builders_snapshot_is_cleaned_up_and_made_again_on_zookeeper() {
    a_dead_builders_snapshot_is_cleaned_up(nodepool_tests::Backend::ZooKeeper).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_builders_snapshot_is_cleaned_up_and_made_again_on_sqlite() {
    a_dead_builders_snapshot_is_cleaned_up(nodepool_tests::Backend::Sqlite).await;
}
