//! Glance's side of an upload: the file is read as the cloud would receive
//! it (in 1 MiB chunks, off the async workers, stopped when the upload is
//! dropped) and hashed, so the checksums the builder gave are checked
//! against the bytes.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use md5::Md5;
use nodepool_model::provider::UploadProgress;
use sha2::{Digest, Sha256};

/// Stops the blocking file read when the upload is dropped or times out.
pub(crate) struct CancelOnDrop(pub(crate) Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What reading an upload's file found.
pub(crate) struct Digests {
    pub(crate) len: u64,
    pub(crate) md5: Option<String>,
    pub(crate) sha256: Option<String>,
}

/// Reads a file in 1 MiB chunks (constant memory), hashing only what was
/// asked for.
pub(crate) fn digest_file(
    path: &Path,
    md5: bool,
    sha256: bool,
    stop: &AtomicBool,
    sent: &UploadProgress,
) -> std::io::Result<Digests> {
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut m = md5.then(Md5::new);
    let mut s = sha256.then(Sha256::new);
    let mut len = 0u64;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("upload cancelled"));
        }
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let chunk = &buf[..n];
        if let Some(m) = &mut m {
            m.update(chunk);
        }
        if let Some(s) = &mut s {
            s.update(chunk);
        }
        len += n as u64;
        sent.add(n as u64);
    }
    Ok(Digests {
        len,
        md5: m.map(|m| hex::encode(m.finalize())),
        sha256: s.map(|s| hex::encode(s.finalize())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    fn md5(data: &[u8]) -> String {
        hex::encode(Md5::digest(data))
    }

    fn sha256(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    #[test]
    fn md5_vectors() {
        assert_eq!(md5(b""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(md5(b"abc"), "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(
            md5(
                b"12345678901234567890123456789012345678901234567890123456789012345678901234567890"
            ),
            "57edf4a22be3c955ac49da2e2107b67a"
        );
        assert_eq!(
            md5(b"The quick brown fox jumps over the lazy dog"),
            "9e107d9d372bb6826bd81d3542a419d6"
        );
    }

    #[test]
    fn sha256_vectors() {
        assert_eq!(
            sha256(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            sha256(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        let million_a = vec![b'a'; 1_000_000];
        assert_eq!(
            sha256(&million_a),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
        assert_eq!(md5(&million_a), "7707d6ae4e027c70eea2a935c2296f21");
    }

    #[test]
    fn digest_file_reads_every_chunk() {
        // More than one 1 MiB read, ending in a partial one.
        let data: Vec<u8> = (0..(5u32 << 19) + 13)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("image");
        std::fs::write(&path, &data).expect("write");
        let sent = UploadProgress::default();
        let d = digest_file(&path, true, true, &AtomicBool::new(false), &sent).expect("digest");
        assert_eq!(d.len, data.len() as u64);
        assert_eq!(sent.get(), d.len, "every byte read is counted as sent");
        assert_eq!(d.md5.as_deref(), Some(md5(&data).as_str()));
        assert_eq!(d.sha256.as_deref(), Some(sha256(&data).as_str()));
        let only = digest_file(&path, false, true, &AtomicBool::new(false), &sent).expect("digest");
        assert_eq!(only.md5, None);
        assert!(digest_file(&path, true, false, &AtomicBool::new(true), &sent).is_err());
    }
}
