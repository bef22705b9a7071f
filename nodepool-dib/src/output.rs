//! Collecting a finished build's files: sizes and checksums.
//!
//! With `--checksum` diskimage-builder writes `<file>.md5` and
//! `<file>.sha256` (each `<hex>  <path>`, as `md5sum` prints it) for every
//! format that goes through its conversion step; those are verified
//! against the file, so a truncated or swapped file is caught here rather
//! than by a cloud after a multi-hour upload. For formats it does not
//! checksum (tar, aci, squashfs, docker) and for files we made ourselves
//! (a converted vhd) the sums are computed and the same files written, so
//! every artifact on disk looks alike.

use std::io::Read;
use std::path::{Path, PathBuf};

use md5::{Digest, Md5};
use nodepool_model::image_builder::Artifact;
use sha2::Sha256;

use crate::command::with_suffix;

/// Formats diskimage-builder writes without checksum files.
pub const UNCHECKSUMMED_FORMATS: &[&str] = &["tar", "aci", "squashfs", "docker"];

/// Size and digests of one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSums {
    /// Bytes.
    pub size: u64,
    /// MD5, lowercase hex.
    pub md5: String,
    /// SHA-256, lowercase hex.
    pub sha256: String,
}

/// Reads `path` once, computing both digests.
pub fn file_sums(path: &Path) -> std::io::Result<FileSums> {
    let mut f = std::fs::File::open(path)?;
    let mut md5 = Md5::new();
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        md5.update(&buf[..n]);
        sha.update(&buf[..n]);
        size += n as u64;
    }
    Ok(FileSums {
        size,
        md5: hex::encode(md5.finalize()),
        sha256: hex::encode(sha.finalize()),
    })
}

/// The digest in a checksum file (`<hex>  <path>`), checked for shape.
pub fn read_checksum_file(path: &Path, hex_len: usize) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    // md5sum prefixes the line with '\' when the file name needed escaping.
    let word = text
        .split_whitespace()
        .next()
        .map(|w| w.trim_start_matches('\\'))
        .unwrap_or("");
    if word.len() != hex_len || !word.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{} does not start with a {hex_len}-digit hex digest",
            path.display()
        ));
    }
    Ok(word.to_ascii_lowercase())
}

/// Writes a checksum file as `md5sum`/`sha256sum` do.
fn write_checksum_file(path: &Path, hex: &str, file: &Path) -> Result<(), String> {
    std::fs::write(path, format!("{hex}  {}\n", file.display()))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Collects one format's file. `ours`: compute and write the checksum files
/// instead of verifying DIB's. Blocking (reads the whole file).
pub fn collect_format(base: &Path, format: &str, ours: bool) -> Result<Artifact, String> {
    let path: PathBuf = with_suffix(base, &format!(".{format}"));
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(format!("{} is not a regular file", path.display())),
        Err(e) => return Err(format!("{} was not written: {e}", path.display())),
    }
    let sums = file_sums(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let md5_path = with_suffix(&path, ".md5");
    let sha_path = with_suffix(&path, ".sha256");
    if ours || UNCHECKSUMMED_FORMATS.contains(&format) {
        write_checksum_file(&md5_path, &sums.md5, &path)?;
        write_checksum_file(&sha_path, &sums.sha256, &path)?;
    } else {
        for (file, len, actual, name) in [
            (&md5_path, 32, &sums.md5, "md5"),
            (&sha_path, 64, &sums.sha256, "sha256"),
        ] {
            let expected = read_checksum_file(file, len)?;
            if &expected != actual {
                return Err(format!(
                    "{} has {name} {actual} but {} says {expected}",
                    path.display(),
                    file.display()
                ));
            }
        }
    }
    Ok(Artifact {
        format: format.to_owned(),
        path,
        size: sums.size,
        md5: Some(sums.md5),
        sha256: Some(sums.sha256),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_MD5: &str = "d41d8cd98f00b204e9800998ecf8427e";
    const EMPTY_SHA: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn sums_of_known_content() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("x");
        std::fs::write(&f, "").unwrap();
        assert_eq!(
            file_sums(&f).unwrap(),
            FileSums {
                size: 0,
                md5: EMPTY_MD5.into(),
                sha256: EMPTY_SHA.into()
            }
        );
        std::fs::write(&f, "abc").unwrap();
        let s = file_sums(&f).unwrap();
        assert_eq!(s.md5, "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(
            s.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn verifies_dib_checksums_and_names_the_mismatch() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("img-1");
        let img = d.path().join("img-1.qcow2");
        std::fs::write(&img, "").unwrap();
        std::fs::write(
            d.path().join("img-1.qcow2.md5"),
            format!("{EMPTY_MD5}  {}\n", img.display()),
        )
        .unwrap();
        std::fs::write(
            d.path().join("img-1.qcow2.sha256"),
            format!("{}  {}\n", EMPTY_SHA.to_uppercase(), img.display()),
        )
        .unwrap();
        let a = collect_format(&base, "qcow2", false).unwrap();
        assert_eq!(
            (a.size, a.md5.as_deref(), a.sha256.as_deref()),
            (0, Some(EMPTY_MD5), Some(EMPTY_SHA))
        );

        std::fs::write(&img, "changed").unwrap();
        let e = collect_format(&base, "qcow2", false).unwrap_err();
        assert!(
            e.contains("img-1.qcow2 has md5") && e.contains(&format!("says {EMPTY_MD5}")),
            "{e}"
        );

        std::fs::write(d.path().join("img-1.qcow2.md5"), "garbage\n").unwrap();
        let e = collect_format(&base, "qcow2", false).unwrap_err();
        assert!(
            e.contains("img-1.qcow2.md5 does not start with a 32-digit hex digest"),
            "{e}"
        );

        std::fs::remove_file(d.path().join("img-1.qcow2.md5")).unwrap();
        let e = collect_format(&base, "qcow2", false).unwrap_err();
        assert!(
            e.contains("cannot read") && e.contains("img-1.qcow2.md5"),
            "{e}"
        );

        let e = collect_format(&base, "raw", false).unwrap_err();
        assert!(e.contains("img-1.raw was not written"), "{e}");
    }

    #[test]
    fn tar_gets_checksum_files_written() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("img-1");
        std::fs::write(d.path().join("img-1.tar"), "abc").unwrap();
        let a = collect_format(&base, "tar", false).unwrap();
        assert_eq!(a.size, 3);
        let md5 = read_checksum_file(&d.path().join("img-1.tar.md5"), 32).unwrap();
        assert_eq!(Some(md5), a.md5);
        let text = std::fs::read_to_string(d.path().join("img-1.tar.sha256")).unwrap();
        assert_eq!(
            text,
            format!("{}  {}\n", a.sha256.unwrap(), a.path.display())
        );
    }
}
