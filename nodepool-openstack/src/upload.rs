//! Streaming a file as a request body, hashing it on the way.
//!
//! A blocking thread reads the file in [`CHUNK`]-sized chunks, hashes them
//! when asked, and hands them over a channel of [`CHANNEL_DEPTH`] chunks to
//! the HTTP body. So memory is bounded by a few MiB whatever the file size,
//! hashing runs beside the network send instead of in front of it, and a
//! slow cloud simply makes the reader wait (BENCHMARKS.md: 13 MiB peak RSS
//! for a 2 GiB upload).

use std::io::Read;
use std::path::PathBuf;
use std::sync::Mutex;

use bytes::Bytes;
use md5::{Digest, Md5};
use nodepool_model::provider::UploadProgress;
use sha2::Sha256;

/// Bytes read and sent per chunk.
pub const CHUNK: usize = 256 << 10;
/// Chunks buffered between the reader thread and the HTTP body.
pub const CHANNEL_DEPTH: usize = 16;

/// Digests of a file, as sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digests {
    /// Bytes sent.
    pub bytes: u64,
    /// MD5, lowercase hex.
    pub md5: String,
    /// SHA-256, lowercase hex (when asked for).
    pub sha256: Option<String>,
}

/// Where a streamed body leaves the digests of what it read.
#[derive(Debug)]
pub struct UploadHashes {
    sha256: bool,
    done: Mutex<Option<Digests>>,
}

impl UploadHashes {
    /// Hashes to compute: MD5 always (Glance reports it as `checksum`),
    /// SHA-256 when asked.
    pub fn new(sha256: bool) -> Self {
        UploadHashes {
            sha256,
            done: Mutex::new(None),
        }
    }

    /// The digests of the last attempt that read the whole file.
    pub fn digests(&self) -> Option<Digests> {
        self.done.lock().ok().and_then(|d| d.clone())
    }

    fn store(&self, d: Digests) {
        if let Ok(mut slot) = self.done.lock() {
            *slot = Some(d);
        }
    }
}

/// A body streaming `path` (which must be `len` bytes long), counting in
/// `sent` the bytes handed to the connection.
pub fn file_body(
    path: PathBuf,
    len: u64,
    hashes: Option<std::sync::Arc<UploadHashes>>,
    sent: Option<UploadProgress>,
) -> reqwest::Body {
    use futures::StreamExt as _;
    // A new attempt sends the whole file again.
    if let Some(s) = &sent {
        s.reset();
    }
    reqwest::Body::wrap_stream(file_stream(path, len, hashes).inspect(move |chunk| {
        if let (Some(s), Ok(bytes)) = (&sent, chunk) {
            s.add(bytes.len() as u64);
        }
    }))
}

/// The chunks of `path`, read and hashed on a blocking thread.
pub fn file_stream(
    path: PathBuf,
    len: u64,
    hashes: Option<std::sync::Arc<UploadHashes>>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(CHANNEL_DEPTH);
    tokio::task::spawn_blocking(move || {
        let send_err = |e: std::io::Error| {
            let _ = tx.blocking_send(Err(e));
        };
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                return send_err(std::io::Error::new(
                    e.kind(),
                    format!("cannot open {}: {e}", path.display()),
                ));
            }
        };
        let mut md5 = Md5::new();
        let mut sha = hashes.as_ref().filter(|h| h.sha256).map(|_| Sha256::new());
        let mut total = 0u64;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let mut filled = 0;
            // Fill the whole chunk so that the HTTP layer gets few, large writes.
            while filled < CHUNK {
                match f.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return send_err(e),
                }
            }
            if filled == 0 {
                break;
            }
            buf.truncate(filled);
            total += filled as u64;
            if total > len {
                return send_err(std::io::Error::other(format!(
                    "{} grew while it was uploaded (more than {len} bytes)",
                    path.display()
                )));
            }
            if hashes.is_some() {
                md5.update(&buf);
                if let Some(s) = sha.as_mut() {
                    s.update(&buf);
                }
            }
            // Stored before the last chunk is handed over: the server may
            // answer as soon as it has every byte, before this thread
            // reads the end of the file.
            if total == len
                && let Some(h) = &hashes
            {
                h.store(Digests {
                    bytes: total,
                    md5: hex::encode(std::mem::take(&mut md5).finalize()),
                    sha256: sha.take().map(|s| hex::encode(s.finalize())),
                });
            }
            if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                // The request was abandoned (timeout, error): stop reading.
                return;
            }
        }
        if len == 0
            && let Some(h) = &hashes
        {
            // An empty file: no chunk carried the digests.
            h.store(Digests {
                bytes: 0,
                md5: hex::encode(md5.finalize()),
                sha256: sha.map(|s| hex::encode(s.finalize())),
            });
        }
        if total != len {
            send_err(std::io::Error::other(format!(
                "{} has {total} bytes, expected {len}",
                path.display()
            )));
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn hashes_what_it_streams() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..(CHUNK * 2 + 17)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let h = Arc::new(UploadHashes::new(true));
        let mut got = Vec::new();
        use futures::StreamExt;
        let mut s = Box::pin(file_stream(p.clone(), data.len() as u64, Some(h.clone())));
        while let Some(chunk) = s.next().await {
            got.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(got, data);
        let d = h.digests().unwrap();
        assert_eq!(d.bytes, data.len() as u64);
        assert_eq!(d.md5, hex::encode(Md5::digest(&data)));
        assert_eq!(d.sha256, Some(hex::encode(Sha256::digest(&data))));
    }

    #[tokio::test]
    async fn wrong_length_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        let h = Arc::new(UploadHashes::new(false));
        use futures::StreamExt;
        let items: Vec<_> = file_stream(p, 10, Some(h.clone())).collect().await;
        assert!(items.last().unwrap().is_err());
        assert!(h.digests().is_none());
    }
}
