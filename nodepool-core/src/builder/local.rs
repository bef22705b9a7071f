//! The builder's own disk: its id file, the image files in `images-dir`,
//! their checksum files, and cloud image names.
//!
//! Everything here is blocking filesystem work on one directory; callers
//! in async code run it with `spawn_blocking`.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

use crate::planner::images::BuildKey;

/// Name of the file holding the builder id, in `images-dir`.
pub const BUILDER_ID_FILE: &str = "builder_id.txt";

/// Shortest build id recognised in a file name. Modern ids are 32 hex
/// digits, legacy ones 10 digits; shorter hex runs (`ubuntu-22.04`) are
/// parts of image names, never ids.
const MIN_BUILD_ID_LEN: usize = 8;

/// Reads the builder id from `<images-dir>/builder_id.txt`, creating it
/// with a new uuid4 (with dashes and no newline, as Python Nodepool
/// writes it) when missing or empty.
pub fn builder_id(images_dir: &Path) -> io::Result<String> {
    let path = images_dir.join(BUILDER_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(context(e, "cannot read", &path)),
    }
    std::fs::create_dir_all(images_dir).map_err(|e| context(e, "cannot create", images_dir))?;
    let id = uuid::Uuid::new_v4().hyphenated().to_string();
    std::fs::write(&path, &id).map_err(|e| context(e, "cannot write", &path))?;
    Ok(id)
}

/// The output base of a build: `<images-dir>/<image>-<build id>` (files
/// are `<base>.<format>`).
pub fn output_base(images_dir: &Path, image: &str, build: &str) -> PathBuf {
    images_dir.join(format!("{image}-{build}"))
}

/// The log of a build: `<build-log-dir>/<image>-<build id>.log`.
pub fn log_path(log_dir: &Path, image: &str, build: &str) -> PathBuf {
    log_dir.join(format!("{image}-{build}.log"))
}

/// The file of one format of a build.
pub fn image_file(images_dir: &Path, image: &str, build: &str, format: &str) -> PathBuf {
    images_dir.join(format!("{image}-{build}.{format}"))
}

/// Splits a file name `<image>-<build id>.<rest>` of the images directory.
/// The build id is the hex run after the last `-` that is followed by a
/// `.`, so image names may contain `-` and `.`, and `<rest>` may contain
/// `-` (`qcow2-new`).
pub fn parse_file_name(name: &str) -> Option<(&str, &str, &str)> {
    let mut end = name.len();
    while let Some(dash) = name[..end].rfind('-') {
        let after = &name[dash + 1..];
        if let Some(dot) = after.find('.') {
            let id = &after[..dot];
            if id.len() >= MIN_BUILD_ID_LEN && id.bytes().all(|b| b.is_ascii_hexdigit()) && dash > 0
            {
                return Some((&name[..dash], id, &after[dot + 1..]));
            }
        }
        end = dash;
    }
    None
}

/// The builds with files in `images_dir`, with the image formats present
/// (files `<base>.<format>`; checksum files, `-new` partial files and the
/// `.d` manifest directory count for the build but are not formats).
/// Hidden entries (the DIB work directory) and the id file are skipped.
/// A missing directory has no builds.
pub fn scan(images_dir: &Path) -> io::Result<BTreeMap<BuildKey, BTreeSet<String>>> {
    let mut out: BTreeMap<BuildKey, BTreeSet<String>> = BTreeMap::new();
    let entries = match std::fs::read_dir(images_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(context(e, "cannot list", images_dir)),
    };
    for e in entries {
        let e = e.map_err(|e| context(e, "cannot list", images_dir))?;
        let Ok(name) = e.file_name().into_string() else {
            continue;
        };
        if name.starts_with('.') || name == BUILDER_ID_FILE {
            continue;
        }
        let Some((image, build, rest)) = parse_file_name(&name) else {
            continue;
        };
        let formats = out.entry((image.to_owned(), build.to_owned())).or_default();
        let is_file = e.file_type().map(|t| t.is_file()).unwrap_or(false);
        if is_file && !rest.is_empty() && !rest.contains('.') && !rest.ends_with("-new") {
            formats.insert(rest.to_owned());
        }
    }
    Ok(out)
}

/// Deletes files of a build: all of them (`None`: every
/// `<image>-<build>.*`, the manifest directory included), or those of the
/// listed formats (the image, its checksums and any partial `-new` file).
/// Returns what was deleted.
pub fn delete_build_files(
    images_dir: &Path,
    image: &str,
    build: &str,
    formats: Option<&[String]>,
) -> io::Result<Vec<PathBuf>> {
    let prefix = format!("{image}-{build}.");
    let entries = match std::fs::read_dir(images_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(context(e, "cannot list", images_dir)),
    };
    let mut deleted = Vec::new();
    for e in entries {
        let e = e.map_err(|e| context(e, "cannot list", images_dir))?;
        let Ok(name) = e.file_name().into_string() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        if let Some(formats) = formats {
            let format = rest.split('.').next().unwrap_or(rest);
            let format = format.strip_suffix("-new").unwrap_or(format);
            if !formats.iter().any(|f| f == format) {
                continue;
            }
        }
        let path = e.path();
        let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let r = if is_dir {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match r {
            Ok(()) => deleted.push(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(context(e, "cannot delete", &path)),
        }
    }
    Ok(deleted)
}

/// The digest in a checksum file (`<hex>  <path>` as `md5sum` writes it),
/// if the file exists and has the right shape.
pub fn read_checksum(path: &Path, hex_len: usize) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let word = text.split_whitespace().next()?.trim_start_matches('\\');
    (word.len() == hex_len && word.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| word.to_ascii_lowercase())
}

/// Formats a provider's `image-name-format` as Python's `str.format`
/// does for the fields Nodepool passes (`{image_name}`, `{upload_id}`,
/// `{timestamp}`; `{{` and `}}` are literal braces; a format spec after
/// `:` is ignored). Unknown fields are left as written (the configuration
/// check rejects them).
pub fn format_image_name(format: &str, image: &str, upload_id: &str, timestamp: i64) -> String {
    let mut out = String::with_capacity(format.len() + image.len());
    let mut rest = format;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("{{") {
            out.push('{');
            rest = r;
        } else if let Some(r) = rest.strip_prefix("}}") {
            out.push('}');
            rest = r;
        } else if rest.starts_with('{')
            && let Some(end) = rest.find('}')
        {
            let inner = &rest[1..end];
            let field = inner.split([':', '!']).next().unwrap_or("");
            match field {
                "image_name" => out.push_str(image),
                "upload_id" => out.push_str(upload_id),
                "timestamp" => out.push_str(&timestamp.to_string()),
                _ => out.push_str(&rest[..=end]),
            }
            rest = &rest[end + 1..];
        } else {
            let mut chars = rest.chars();
            if let Some(c) = chars.next() {
                out.push(c);
            }
            rest = chars.as_str();
        }
    }
    out
}

fn context(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_split_at_the_build_id() {
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            parse_file_name(&format!("ubuntu-jammy-{id}.qcow2")),
            Some(("ubuntu-jammy", id, "qcow2"))
        );
        assert_eq!(
            parse_file_name(&format!("ubuntu-22.04-{id}.qcow2.md5")),
            Some(("ubuntu-22.04", id, "qcow2.md5"))
        );
        assert_eq!(
            parse_file_name(&format!("deb-{id}.qcow2-new")),
            Some(("deb", id, "qcow2-new"))
        );
        assert_eq!(
            parse_file_name("tiny-0000000042.d"),
            Some(("tiny", "0000000042", "d"))
        );
        assert_eq!(parse_file_name("ubuntu-22.04.qcow2"), None);
        assert_eq!(parse_file_name("builder_id.txt"), None);
        assert_eq!(parse_file_name("-0123abcd.raw"), None);
    }

    #[test]
    fn scan_finds_formats_and_delete_removes_them() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        let id = "5eed0001";
        for f in [
            "img-5eed0001.qcow2",
            "img-5eed0001.qcow2.md5",
            "img-5eed0001.qcow2.sha256",
            "img-5eed0001.raw",
            "img-5eed0001.raw-new",
            "other-aaaabbbb.vhd",
            "notes.txt",
            BUILDER_ID_FILE,
        ] {
            std::fs::write(p.join(f), b"x").unwrap();
        }
        std::fs::create_dir_all(p.join("img-5eed0001.d/dib-manifests")).unwrap();
        std::fs::create_dir_all(p.join(".dib-tmp/img-5eed0001")).unwrap();
        let found = scan(p).unwrap();
        let formats = |i: &str, b: &str| found[&(i.to_owned(), b.to_owned())].clone();
        assert_eq!(
            formats("img", id),
            BTreeSet::from(["qcow2".to_owned(), "raw".to_owned()])
        );
        assert_eq!(
            formats("other", "aaaabbbb"),
            BTreeSet::from(["vhd".to_owned()])
        );
        assert_eq!(found.len(), 2);

        let gone = delete_build_files(p, "img", id, Some(&["raw".to_owned()])).unwrap();
        assert_eq!(gone.len(), 2, "{gone:?}");
        assert_eq!(
            formats_after(p, "img", id),
            BTreeSet::from(["qcow2".to_owned()])
        );
        delete_build_files(p, "img", id, None).unwrap();
        assert!(
            !scan(p)
                .unwrap()
                .contains_key(&("img".to_owned(), id.to_owned()))
        );
        assert!(p.join("other-aaaabbbb.vhd").exists() && p.join("notes.txt").exists());
        assert!(p.join(".dib-tmp/img-5eed0001").exists());
    }

    fn formats_after(p: &Path, i: &str, b: &str) -> BTreeSet<String> {
        scan(p).unwrap()[&(i.to_owned(), b.to_owned())].clone()
    }

    #[test]
    fn builder_id_is_created_once() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("images");
        let a = builder_id(&dir).unwrap();
        assert_eq!(a.len(), 36);
        assert_eq!(builder_id(&dir).unwrap(), a);
        assert_eq!(
            std::fs::read_to_string(dir.join(BUILDER_ID_FILE)).unwrap(),
            a
        );
    }

    #[test]
    fn image_names_format_like_python() {
        assert_eq!(
            format_image_name("{image_name}-{timestamp}", "deb", "0000000001", 1700000000),
            "deb-1700000000"
        );
        assert_eq!(
            format_image_name("np-{image_name}-{upload_id}{{x}}", "deb", "0000000007", 1),
            "np-deb-0000000007{x}"
        );
        assert_eq!(format_image_name("ü{timestamp:d}", "d", "1", 5), "ü5");
    }

    #[test]
    fn checksum_files_are_read_strictly() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("x.md5");
        std::fs::write(&f, "D41D8CD98F00B204E9800998ECF8427E  /x\n").unwrap();
        assert_eq!(
            read_checksum(&f, 32).as_deref(),
            Some("d41d8cd98f00b204e9800998ecf8427e")
        );
        assert_eq!(read_checksum(&f, 64), None);
        assert_eq!(read_checksum(&d.path().join("missing"), 32), None);
    }
}
