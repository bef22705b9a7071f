//! `build-log-retention`: pruning old build logs of an image.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Deletes all but the newest `retention` logs of `image` in `log_dir`
/// (files named `<image>-<build id>.log`); `None` keeps everything. The
/// builder runtime calls it before each build, as Nodepool does.
///
/// As in Nodepool, at least one log is kept (`Some(0)` keeps one) and
/// "newest" is by modification time (ties: by name). Unlike Nodepool's
/// prefix match, only `<image>-<id>.log` with a build id of hex digits
/// counts, so pruning `ubuntu` never touches `ubuntu-jammy-<id>.log`.
/// Returns the deleted files; the error's message names the directory or
/// file (its kind is the underlying one).
pub fn prune_build_logs(
    log_dir: &Path,
    image: &str,
    retention: Option<u32>,
) -> std::io::Result<Vec<PathBuf>> {
    let Some(keep) = retention else {
        return Ok(Vec::new());
    };
    let keep = keep.max(1) as usize;
    let entries = match std::fs::read_dir(log_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(context(e, "cannot list build logs in", log_dir));
        }
    };
    let prefix = format!("{image}-");
    let mut logs: Vec<(SystemTime, String, PathBuf)> = Vec::new();
    for e in entries {
        let e = e.map_err(|e| context(e, "cannot list build logs in", log_dir))?;
        let Some(name) = e.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let is_ours = name
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(".log"))
            .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()));
        if !is_ours {
            continue;
        }
        let Ok(meta) = e.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        logs.push((mtime, name, e.path()));
    }
    // Newest first.
    logs.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
    let mut deleted = Vec::new();
    for (_, _, path) in logs.into_iter().skip(keep) {
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(log = %path.display(), "deleted old build log");
                deleted.push(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(context(e, "cannot delete build log", &path)),
        }
    }
    Ok(deleted)
}

fn context(e: std::io::Error, what: &str, path: &Path) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn log(dir: &Path, name: &str, age_s: u64) -> PathBuf {
        let p = dir.join(name);
        let f = std::fs::File::create(&p).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(age_s))
            .unwrap();
        p
    }

    #[test]
    fn keeps_the_newest_n_of_this_image_only() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        let ids = ["aa01", "aa02", "aa03", "aa04", "aa05"];
        let paths: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| log(p, &format!("ubuntu-{id}.log"), 100 - i as u64 * 10))
            .collect();
        let other = log(p, "ubuntu-jammy-ff01.log", 1000);
        let unrelated = log(p, "ubuntu-notes.txt", 1000);
        let not_an_id = log(p, "ubuntu-xyz.log", 1000);
        let mut deleted = prune_build_logs(p, "ubuntu", Some(2)).unwrap();
        deleted.sort();
        assert_eq!(deleted, paths[..3]);
        assert!(paths[3].exists() && paths[4].exists());
        assert!(other.exists() && unrelated.exists() && not_an_id.exists());
        // Idempotent.
        assert!(prune_build_logs(p, "ubuntu", Some(2)).unwrap().is_empty());
        // Zero keeps one, like Nodepool.
        assert_eq!(
            prune_build_logs(p, "ubuntu", Some(0)).unwrap(),
            [paths[3].clone()]
        );
        assert!(paths[4].exists());
    }

    #[test]
    fn none_keeps_all_and_a_missing_dir_is_empty() {
        let d = tempfile::tempdir().unwrap();
        let a = log(d.path(), "img-01.log", 30);
        let b = log(d.path(), "img-02.log", 20);
        assert!(prune_build_logs(d.path(), "img", None).unwrap().is_empty());
        assert!(a.exists() && b.exists());
        assert!(
            prune_build_logs(&d.path().join("nope"), "img", Some(1))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn an_unreadable_dir_is_named_in_the_error() {
        let d = tempfile::tempdir().unwrap();
        let f = log(d.path(), "plain-file", 0);
        let e = prune_build_logs(&f, "img", Some(1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot list build logs in") && e.contains("plain-file"),
            "{e}"
        );
    }
}
