//! Uploaded images: `<image-dir>/images/<id>/` with `image.json` (name,
//! properties) and `disk.qcow2`. An upload is written into a
//! `.partial-<pid>-<id>` directory and renamed into place once complete,
//! so a listing never sees half an image; partial directories of dead
//! processes are swept when a provider starts.

use std::io::Read;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use md5::Digest as _;
use nodepool_model::provider::{CloudImageInfo, ImageUploadSpec, ProviderError, SnapshotSpec};
use serde::{Deserialize, Serialize};

/// `image.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ImageRecord {
    pub id: String,
    pub name: String,
    pub properties: IndexMap<String, String>,
}

pub(crate) const RECORD: &str = "image.json";
/// The image's disk, always qcow2 (uploads are converted).
pub(crate) const DISK: &str = "disk.qcow2";
const PARTIAL: &str = ".partial-";

impl ImageRecord {
    pub(crate) fn info(&self) -> CloudImageInfo {
        CloudImageInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            status: "active".into(),
            properties: self.properties.clone(),
        }
    }
}

/// Every complete image.
pub(crate) fn list(images: &Path) -> Vec<ImageRecord> {
    let Ok(entries) = std::fs::read_dir(images) else {
        return Vec::new();
    };
    let mut out: Vec<ImageRecord> = entries
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path().join(RECORD)).ok()?;
            serde_json::from_str(&text).ok()
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// Removes partial uploads whose uploading process is gone.
pub(crate) fn sweep_partials(images: &Path) {
    let Ok(entries) = std::fs::read_dir(images) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PARTIAL) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            tracing::info!(dir = %e.path().display(), "removing an upload left by a dead process");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn digests(path: &Path) -> std::io::Result<(String, String)> {
    let mut f = std::fs::File::open(path)?;
    let mut md5 = md5::Md5::new();
    let mut sha = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        md5.update(&buf[..n]);
        sha.update(&buf[..n]);
    }
    Ok((hex::encode(md5.finalize()), hex::encode(sha.finalize())))
}

/// QEMU's name of an upload format.
fn qemu_format(format: &str) -> Result<&'static str, String> {
    match format {
        "qcow2" => Ok("qcow2"),
        "raw" => Ok("raw"),
        "vhd" | "vpc" => Ok("vpc"),
        "vmdk" => Ok("vmdk"),
        other => Err(format!(
            "unsupported image format {other:?} (qcow2, raw, vhd, vmdk)"
        )),
    }
}

/// Checks the file's checksums, converts it to qcow2 in a partial
/// directory and renames that into place: returns the image id.
pub(crate) async fn upload(
    provider: &str,
    qemu_img: &Path,
    images: &Path,
    spec: &ImageUploadSpec,
) -> Result<String, ProviderError> {
    let fail = |why: String| {
        ProviderError::Other(format!(
            "provider {provider}: upload of {} ({}): {why}",
            spec.name,
            spec.path.display()
        ))
    };
    let format = qemu_format(&spec.format).map_err(|w| {
        ProviderError::InvalidRequest(format!("provider {provider}: image {}: {w}", spec.name))
    })?;
    if spec.md5.is_some() || spec.sha256.is_some() {
        let path = spec.path.clone();
        let (md5, sha256) = tokio::task::spawn_blocking(move || digests(&path))
            .await
            .map_err(|e| fail(format!("checksum task: {e}")))?
            .map_err(|e| fail(e.to_string()))?;
        for (what, want, got) in [("MD5", &spec.md5, md5), ("SHA-256", &spec.sha256, sha256)] {
            if let Some(want) = want
                && !want.eq_ignore_ascii_case(&got)
            {
                return Err(fail(format!(
                    "{what} mismatch: expected {want}, the file has {got}"
                )));
            }
        }
    }
    let source = Source {
        path: &spec.path,
        format,
        in_use: false,
    };
    store(qemu_img, images, &source, &spec.name, &spec.properties)
        .await
        .map_err(fail)
}

/// Stores a server's disk (its overlay, flattened with its backing image)
/// as a new image: returns the image id. The caller keeps the disk still
/// while this runs (see `QemuProvider::snapshot_instance`).
pub(crate) async fn snapshot(
    qemu_img: &Path,
    images: &Path,
    overlay: &Path,
    spec: &SnapshotSpec,
) -> Result<String, String> {
    let source = Source {
        path: overlay,
        format: "qcow2",
        // The VM holds QEMU's write lock on its overlay.
        in_use: true,
    };
    store(qemu_img, images, &source, &spec.name, &spec.properties).await
}

/// What an image is made from.
struct Source<'a> {
    path: &'a Path,
    format: &'a str,
    /// Open (and locked) by a running VM: read it with `-U` (force share).
    in_use: bool,
}

/// Converts `source` to qcow2 in a partial directory and renames that
/// into place, so a listing never sees half an image: returns the id.
async fn store(
    qemu_img: &Path,
    images: &Path,
    source: &Source<'_>,
    name: &str,
    properties: &IndexMap<String, String>,
) -> Result<String, String> {
    let id = uuid::Uuid::new_v4().to_string();
    let partial = images.join(format!("{PARTIAL}{}-{id}", std::process::id()));
    std::fs::create_dir_all(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
    let record = ImageRecord {
        id: id.clone(),
        name: name.to_owned(),
        properties: properties.clone(),
    };
    let result = convert_into(qemu_img, source, &record, &partial, &images.join(&id)).await;
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    result.map(|()| id)
}

async fn convert_into(
    qemu_img: &Path,
    source: &Source<'_>,
    record: &ImageRecord,
    partial: &Path,
    target: &PathBuf,
) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new(qemu_img);
    cmd.args(["convert", "-q"]);
    if source.in_use {
        cmd.arg("-U");
    }
    let out = cmd
        .args(["-f", source.format, "-O", "qcow2"])
        .arg(source.path)
        .arg(partial.join(DISK))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("{} cannot be run: {e}", qemu_img.display()))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img convert failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let json = serde_json::to_vec_pretty(record).map_err(|e| e.to_string())?;
    std::fs::write(partial.join(RECORD), json).map_err(|e| e.to_string())?;
    std::fs::rename(partial, target)
        .map_err(|e| format!("{} → {}: {e}", partial.display(), target.display()))
}
