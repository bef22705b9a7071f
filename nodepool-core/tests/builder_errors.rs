//! The builder runtime when the image build itself fails for local I/O
//! (the disk filled mid-build): the one failure here that no real part can
//! be made to produce on demand, so the `ImageBuilder` is a mockall mock
//! with exactly two expected builds, in order: the first writes half an
//! image and fails with `ENOSPC`, the second writes the image and its
//! checksum files. Everything else is real: the runtime, the in-memory
//! store, the simulated cloud receiving (and checksumming) the upload, on
//! tokio's paused clock.
//!
//! What must hold: the failed build is recorded `failed` with the error as
//! its log tail and its half-written file removed; no build is tried again
//! before the retry delay; the build after it is uploaded with the
//! checksums the cloud verified.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use mockall::Sequence;
use nodepool_core::builder::{Builder, BuilderSettings};
use nodepool_core::config::Config;
use nodepool_core::image_builder::{Artifact, BuildArtifacts, BuildError, BuildSpec, ImageBuilder};
use nodepool_core::launcher::{Clock, ProviderFactory};
use nodepool_core::model::{BuildState, UploadState};
use nodepool_core::provider::Provider;
use nodepool_core::store::{ImageState, Store};
use nodepool_model::store::MemoryStore;
use nodepool_simulated::SimulatedProvider;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mockall::mock! {
    Dib {}

    #[async_trait]
    impl ImageBuilder for Dib {
        async fn build(
            &self,
            spec: &BuildSpec,
            cancel: CancellationToken,
        ) -> Result<BuildArtifacts, BuildError>;
    }
}

impl std::fmt::Debug for MockDib {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MockDib")
    }
}

/// The image the second build writes, and its digests (from `md5sum` and
/// `sha256sum`).
const IMAGE_BYTES: &[u8] = b"nodepool simulated image\n";
const IMAGE_MD5: &str = "76e40e14e3d189857637e8bcf0451229";
const IMAGE_SHA256: &str = "99709199ffe835543ab605e044495f883cc51d49ce1d1bbeca0b9c519a265420";

/// The error a full disk gives the build, as `std::io::Error` shows it.
const ENOSPC: &str = "writing the image: No space left on device (os error 28)";

/// The planner's delay before a failed build is retried
/// (`planner::images::BUILD_RETRY_SECS`).
const BUILD_RETRY: Duration = Duration::from_secs(300);

fn config(dir: &Path) -> Config {
    let yaml = format!(
        r#"images-dir: {dir}/images
build-log-dir: {dir}/logs
labels:
  - name: small
diskimages:
  - name: deb
    elements: [debian-minimal]
    formats: [qcow2]
providers:
  - name: sim
    driver: simulated
    diskimages: [{{name: deb}}]
    pools:
      - name: main
        max-servers: 1
        labels: [{{name: small, diskimage: deb, flavor-name: "Fake Flavor"}}]
"#,
        dir = dir.display()
    );
    Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("test config is invalid: {e}"))
}

fn file(spec: &BuildSpec, suffix: &str) -> PathBuf {
    let mut p = spec.output_base.clone().into_os_string();
    p.push(format!(".{suffix}"));
    PathBuf::from(p)
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Files of `build` in the images directory.
fn files_of(images: &Path, build: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(images)
        .expect("images dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(build))
        .collect();
    v.sort();
    v
}

/// Polls the store's image state every 100 ms of virtual time until `f`
/// holds (bounded).
async fn until(store: &Store, what: &str, f: impl Fn(&ImageState) -> bool) -> ImageState {
    let deadline = Instant::now() + Duration::from_secs(1200);
    loop {
        let st = store.image_state().await.expect("image state");
        if f(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{what}: not reached: {st:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_build_failing_for_a_full_disk_is_recorded_cleaned_up_and_retried_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let images = dir.path().join("images");

    let builds = Arc::new(AtomicUsize::new(0));
    let mut dib = MockDib::new();
    let mut order = Sequence::new();
    let counted = builds.clone();
    dib.expect_build()
        .withf(|spec, _| spec.image.name == "deb" && spec.formats == ["qcow2"])
        .times(1)
        .in_sequence(&mut order)
        .returning(move |spec, _| {
            counted.fetch_add(1, Ordering::SeqCst);
            // Half an image, then the disk is full.
            write(&file(spec, "qcow2"), &IMAGE_BYTES[..8]);
            Err(BuildError::Io(ENOSPC.into()))
        });
    let counted = builds.clone();
    dib.expect_build()
        .withf(|spec, _| spec.image.name == "deb")
        .times(1)
        .in_sequence(&mut order)
        .returning(move |spec, _| {
            counted.fetch_add(1, Ordering::SeqCst);
            let path = file(spec, "qcow2");
            write(&path, IMAGE_BYTES);
            write(
                &file(spec, "qcow2.md5"),
                format!("{IMAGE_MD5}  x\n").as_bytes(),
            );
            write(
                &file(spec, "qcow2.sha256"),
                format!("{IMAGE_SHA256}  x\n").as_bytes(),
            );
            Ok(BuildArtifacts {
                artifacts: vec![Artifact {
                    format: "qcow2".into(),
                    path,
                    size: IMAGE_BYTES.len() as u64,
                    md5: Some(IMAGE_MD5.into()),
                    sha256: Some(IMAGE_SHA256.into()),
                }],
            })
        });

    let clouds: Arc<Mutex<BTreeMap<String, Arc<SimulatedProvider>>>> = Arc::default();
    let registry = clouds.clone();
    let factory: ProviderFactory = Arc::new(move |pc| {
        let mut reg = registry.lock().map_err(|_| "poisoned".to_string())?;
        if let Some(p) = reg.get(&pc.name) {
            return Ok(p.clone() as Arc<dyn Provider>);
        }
        let p = Arc::new(SimulatedProvider::new(pc).map_err(|e| e.to_string())?);
        reg.insert(pc.name.clone(), p.clone());
        Ok(p as Arc<dyn Provider>)
    });
    let store = Store::new(Arc::new(MemoryStore::new()));
    let builder = Builder::new(
        store.clone(),
        factory,
        Arc::new(dib),
        BuilderSettings {
            hostname: "nb01".into(),
            max_pass_interval: Duration::from_secs(1),
            clock: Clock::tokio(),
            ..BuilderSettings::default()
        },
    );
    let (_config, rx) = tokio::sync::watch::channel(Arc::new(cfg));
    let stop = CancellationToken::new();
    let task = tokio::spawn(builder.run(rx, stop.clone()));

    let st = until(&store, "the first build recorded failed", |st| {
        st.builds
            .iter()
            .any(|b| b.build.state == BuildState::Failed)
    })
    .await;
    let failed_at = Instant::now();
    let failed = &st.builds[0];
    let tail: String = failed.build.extra["log_tail"]
        .decode()
        .expect("the log tail is a string");
    assert!(tail.contains("No space left on device"), "{tail}");
    let failed_id = failed.id.clone();
    // The half-written image goes with the failed build.
    let mut left = files_of(&images, &failed_id);
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = files_of(&images, &failed_id);
    }
    assert_eq!(left, Vec::<String>::new(), "files of the failed build");

    // No retry before the delay (the failed record holds the image back).
    tokio::time::sleep(BUILD_RETRY - Duration::from_secs(5)).await;
    assert_eq!(builds.load(Ordering::SeqCst), 1, "built again too early");
    assert!(st.uploads.is_empty());

    let st = until(&store, "the next build uploaded", |st| {
        st.uploads
            .iter()
            .any(|u| u.provider == "sim" && u.upload.state == UploadState::Ready)
    })
    .await;
    assert!(failed_at.elapsed() >= BUILD_RETRY);
    assert_eq!(builds.load(Ordering::SeqCst), 2);
    let ready: Vec<_> = st
        .builds
        .iter()
        .filter(|b| b.build.state == BuildState::Ready)
        .collect();
    assert_eq!(ready.len(), 1, "{st:#?}");
    assert_ne!(ready[0].id, failed_id);
    assert!(
        !st.builds.iter().any(|b| b.id == failed_id),
        "the failed record is gone once retried"
    );
    let cloud = clouds
        .lock()
        .expect("lock")
        .get("sim")
        .cloned()
        .expect("the builder made the cloud");
    let uploaded = cloud.list_images().await.expect("images");
    assert_eq!(uploaded.len(), 1, "{uploaded:?}");
    // The cloud hashed what it received and checked both digests.
    assert_eq!(
        uploaded[0].properties["owner_specified.openstack.sha256"],
        IMAGE_SHA256
    );
    assert_eq!(
        uploaded[0].properties["owner_specified.openstack.md5"],
        IMAGE_MD5
    );

    stop.cancel();
    // The mock checks on drop that each build was asked for exactly once.
    task.await.expect("builder task").expect("builder ran");
}
