//! Values for unit tests.

use std::path::PathBuf;
use std::time::Duration;

use indexmap::IndexMap;
use nodepool_model::config::DiskImage;
use nodepool_model::image_builder::BuildSpec;

/// A diskimage with the reference's defaults and one element.
pub fn diskimage(name: &str) -> DiskImage {
    DiskImage {
        name: name.into(),
        parent: None,
        elements: vec!["debian-minimal".into()],
        env_vars: IndexMap::new(),
        formats: Vec::new(),
        release: String::new(),
        rebuild_age: Duration::from_secs(86_400),
        build_timeout: Duration::from_secs(8 * 3600),
        pause: false,
        username: "zuul".into(),
        private_key: None,
        python_path: "auto".into(),
        shell_type: None,
        dib_cmd: "disk-image-create".into(),
        delete_after_upload: false,
        keep_formats: Vec::new(),
        metadata: IndexMap::new(),
    }
}

/// A spec for `image` with build id `7` unless `base` says otherwise.
pub fn spec(image: DiskImage, formats: &[&str], base: &str) -> BuildSpec {
    let base = PathBuf::from(base);
    let build_id = base
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix(&format!("{}-", image.name)))
        .unwrap_or("7")
        .to_owned();
    BuildSpec {
        image,
        build_id,
        formats: formats.iter().map(|f| f.to_string()).collect(),
        output_base: base.clone(),
        log_path: base.with_extension("log"),
        elements_dir: None,
        timeout: Duration::from_secs(60),
        progress: Default::default(),
    }
}
