//! The state file's files: the JSON state, replaced atomically; a lock
//! file beside it, locked exclusively around every operation; and the
//! temporary file a write goes through.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use nodepool_model::provider::ProviderError;

use super::format::{FILE_VERSION, FileDoc};

/// The files of a file-backed cloud.
pub(super) struct StateFile {
    /// The state (JSON), replaced by rename so a reader never sees half of
    /// it, even when a writer is killed.
    pub(super) path: PathBuf,
    /// Locked exclusively around every operation. A separate file because
    /// the rename replaces the state file's inode, and a lock on a replaced
    /// inode excludes nobody.
    lock: PathBuf,
    /// Written, then renamed over `path` (only under the lock, so one name
    /// suffices; a killed writer's leftover is truncated by the next).
    tmp: PathBuf,
    /// Whether this provider applied its configuration (quota, failure
    /// rates, cloud images) to the file yet: done once, by its first
    /// operation.
    pub(super) opened: AtomicBool,
}

impl StateFile {
    pub(super) fn new(path: PathBuf) -> Self {
        let beside = |suffix: &str| {
            let mut s = path.as_os_str().to_owned();
            s.push(suffix);
            PathBuf::from(s)
        };
        StateFile {
            lock: beside(".lock"),
            tmp: beside(".tmp"),
            path,
            opened: AtomicBool::new(false),
        }
    }

    pub(super) fn io_error(
        &self,
        what: &str,
        path: &Path,
        e: impl std::fmt::Display,
    ) -> ProviderError {
        ProviderError::Other(format!(
            "simulated cloud state file {}: {what} {}: {e}",
            self.path.display(),
            path.display()
        ))
    }

    /// Opens the lock file, creating it (and its directory) when missing.
    fn open_lock(&self) -> Result<File, ProviderError> {
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.lock)
        };
        match open() {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = self.lock.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| self.io_error("creating the directory of", &self.lock, e))?;
                }
                open().map_err(|e| self.io_error("opening", &self.lock, e))
            }
            Err(e) => Err(self.io_error("opening", &self.lock, e)),
        }
    }

    /// The exclusive lock, without blocking an async worker while another
    /// process holds it. Released when the returned file is dropped (or
    /// the process dies).
    pub(super) async fn lock_async(&self) -> Result<File, ProviderError> {
        let file = self.open_lock()?;
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(e)) => return Err(self.io_error("locking", &self.lock, e)),
        }
        let locked = tokio::task::spawn_blocking(move || file.lock().map(|()| file))
            .await
            .map_err(|e| self.io_error("waiting for the lock on", &self.lock, e))?;
        locked.map_err(|e| self.io_error("locking", &self.lock, e))
    }

    /// The exclusive lock, blocking the thread (for the synchronous hooks).
    pub(super) fn lock_blocking(&self) -> Result<File, ProviderError> {
        let file = self.open_lock()?;
        file.lock()
            .map_err(|e| self.io_error("locking", &self.lock, e))?;
        Ok(file)
    }

    /// Reads the file (missing or empty: no cloud yet).
    pub(super) fn read(&self) -> Result<(Vec<u8>, FileDoc), ProviderError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(self.io_error("reading", &self.path, e)),
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok((bytes, FileDoc::default()));
        }
        let doc: FileDoc =
            serde_json::from_slice(&bytes).map_err(|e| self.io_error("parsing", &self.path, e))?;
        if doc.version != FILE_VERSION {
            return Err(self.io_error(
                "reading",
                &self.path,
                format!(
                    "format version {} (this build reads {FILE_VERSION})",
                    doc.version
                ),
            ));
        }
        Ok((bytes, doc))
    }

    /// Replaces the file's contents atomically (temp file + rename). No
    /// fsync: the file must survive killed processes, not power loss.
    pub(super) fn write(&self, bytes: &[u8]) -> Result<(), ProviderError> {
        std::fs::write(&self.tmp, bytes).map_err(|e| self.io_error("writing", &self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path)
            .map_err(|e| self.io_error("renaming onto", &self.tmp, e))
    }
}
