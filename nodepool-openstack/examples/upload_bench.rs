//! Upload benchmark: the streamed `PUT /v2/images/{id}/file` alone (what
//! `curl -T` does), then one whole `OpenStackProvider::upload_image`
//! (create, PUT, wait for active, checks), reporting times, throughput and
//! this process's peak RSS.
//!
//! ```text
//! cargo run --release -p nodepool-openstack --example upload_bench -- \
//!     CLOUDS_YAML CLOUD FILE [FORMAT]
//! ```
//!
//! `nodepool-openstack/bench/upload.sh` runs it next to `curl -T` of the
//! same file to the same Glance and prints both.

use std::time::{Duration, Instant};

use indexmap::IndexMap;
use nodepool_model::provider::{ImageUploadSpec, Provider};
use nodepool_openstack::api::image::{CreateImage, DeleteImage, UploadImageData};
use nodepool_openstack::{CloudsLoader, OpenStackProvider, ProviderOptions};

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // RUST_LOG=nodepool_openstack=debug shows each API call with its time.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: upload_bench CLOUDS_YAML CLOUD FILE [FORMAT]");
        std::process::exit(2);
    }
    let cloud = CloudsLoader::file(&args[1]).load(Some(&args[2]), None)?;
    let file = std::path::PathBuf::from(&args[3]);
    let format = args.get(4).cloned().unwrap_or_else(|| "raw".into());
    let len = std::fs::metadata(&file)?.len();
    let p = OpenStackProvider::new("bench", cloud, ProviderOptions::default())?;
    let mut properties = IndexMap::new();
    properties.insert("nodepool_build_id".to_owned(), "bench".to_owned());
    let spec = ImageUploadSpec {
        name: format!("testbed-bench-{}", std::process::id()),
        path: file,
        format,
        properties,
        md5: None,
        sha256: None,
        timeout: Duration::from_secs(3600),
        sent: Default::default(),
    };
    // 1. The data transfer alone, measured like `curl -T`: PUT /file.
    let client = p.client();
    let img = client
        .execute(&CreateImage {
            name: format!("testbed-bench-put-{}", std::process::id()),
            disk_format: spec.format.clone(),
            properties: IndexMap::new(),
        })
        .await?;
    let rss_before = peak_rss_kib().unwrap_or(0);
    let started = Instant::now();
    client
        .execute(&UploadImageData {
            id: img.id.clone(),
            path: spec.path.clone(),
            len,
            hashes: None,
            sent: None,
            timeout: Duration::from_secs(3600),
        })
        .await?;
    let put_secs = started.elapsed().as_secs_f64();
    client.execute(&DeleteImage(&img.id)).await?;
    println!(
        "nodepool-openstack PUT: {len} bytes in {put_secs:.2} s = {:.1} MiB/s",
        len as f64 / 1_048_576.0 / put_secs
    );
    // 2. The whole upload_image: create, PUT, wait for active, checks.
    let started = Instant::now();
    let id = p.upload_image(&spec).await?;
    let secs = started.elapsed().as_secs_f64();
    let rss = peak_rss_kib().unwrap_or(0);
    p.delete_image(&id).await?;
    println!(
        "nodepool-openstack upload: {len} bytes in {secs:.2} s = {:.1} MiB/s; peak RSS {:.1} MiB (before the upload {:.1} MiB)",
        len as f64 / 1_048_576.0 / secs,
        rss as f64 / 1024.0,
        rss_before as f64 / 1024.0
    );
    Ok(())
}
