//! Cross-checks over the parsed configuration, and diskimage inheritance.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use super::error::ConfigErrorKind as Kind;
use super::parse::{NOVA_METADATA_LIMIT, RawDiskImage};
use super::yaml::{Errors, index, join};
use super::*;

/// Applies `parent` inheritance root-first: elements are appended, env-vars
/// merged (children override), every other key set by a child overrides.
/// Abstract images are only templates and are not returned.
pub(crate) fn resolve_diskimages(raw: &[RawDiskImage], errs: &mut Errors) -> Vec<DiskImage> {
    let mut by_name: HashMap<&str, &RawDiskImage> = HashMap::new();
    for d in raw {
        if by_name.insert(d.name.as_str(), d).is_some() {
            errs.push(
                &join(&d.path, "name"),
                Kind::Duplicate,
                format!("diskimage {:?} is defined more than once", d.name),
            );
        }
    }
    let mut out = Vec::new();
    for d in raw.iter().filter(|d| !d.is_abstract) {
        // Walk up to the root, then apply root-first.
        let mut chain = vec![d];
        let mut seen = HashSet::from([d.name.as_str()]);
        let mut ok = true;
        let mut cur = d;
        while let Some(parent) = &cur.parent {
            match by_name.get(parent.as_str()) {
                Some(p) if !seen.insert(p.name.as_str()) => {
                    errs.push(
                        &join(&cur.path, "parent"),
                        Kind::InvalidValue,
                        format!(
                            "parent chain of diskimage {:?} loops back to {parent:?}",
                            d.name
                        ),
                    );
                    ok = false;
                    break;
                }
                Some(p) => {
                    chain.push(p);
                    cur = p;
                }
                None => {
                    // Reported once per referencing image below.
                    ok = false;
                    break;
                }
            }
        }
        if !ok {
            continue;
        }
        let mut img = DiskImage {
            name: d.name.clone(),
            parent: d.parent.clone(),
            elements: Vec::new(),
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
        };
        for layer in chain.iter().rev() {
            img.elements.extend(layer.elements.iter().cloned());
            for (k, v) in &layer.env_vars {
                img.env_vars.insert(k.clone(), v.clone());
            }
            for (k, v) in &layer.metadata {
                img.metadata.insert(k.clone(), v.clone());
            }
            if let Some(f) = &layer.formats {
                img.formats = f.clone();
            }
            if let Some(r) = &layer.release {
                img.release = r.clone();
            }
            if let Some(a) = layer.rebuild_age {
                img.rebuild_age = a;
            }
            if let Some(t) = layer.build_timeout {
                img.build_timeout = t;
            }
            if let Some(p) = layer.pause {
                img.pause = p;
            }
            if let Some(u) = &layer.username {
                img.username = u.clone();
            }
            if let Some(k) = &layer.private_key {
                img.private_key = Some(k.clone());
            }
            if let Some(p) = &layer.python_path {
                img.python_path = p.clone();
            }
            if let Some(s) = &layer.shell_type {
                img.shell_type = Some(s.clone());
            }
            if let Some(c) = &layer.dib_cmd {
                img.dib_cmd = c.clone();
            }
            if let Some(b) = layer.delete_after_upload {
                img.delete_after_upload = b;
            }
            if let Some(k) = &layer.keep_formats {
                img.keep_formats = k.clone();
            }
        }
        out.push(img);
    }
    for d in raw {
        if let Some(parent) = &d.parent
            && !by_name.contains_key(parent.as_str())
        {
            errs.push(
                &join(&d.path, "parent"),
                Kind::UnknownReference,
                format!("unknown diskimage {parent:?}"),
            );
        }
    }
    out
}

/// Every check that relates one part of the file to another.
pub(crate) fn cross_check(cfg: &Config, raw_images: &[RawDiskImage], errs: &mut Errors) {
    let abstract_images: HashSet<&str> = raw_images
        .iter()
        .filter(|d| d.is_abstract)
        .map(|d| d.name.as_str())
        .collect();
    let diskimage_names: HashSet<&str> = cfg.diskimages.iter().map(|d| d.name.as_str()).collect();

    let mut label_names = HashSet::new();
    for (i, l) in cfg.labels.iter().enumerate() {
        if !label_names.insert(l.name.as_str()) {
            errs.push(
                &join(&index("labels", i), "name"),
                Kind::Duplicate,
                format!("label {:?} is defined more than once", l.name),
            );
        }
    }

    // Snapshot images' builds are recorded under their name, as
    // diskimages' are: one name, one image, in the whole file.
    let mut snapshot_names: HashMap<&str, String> = HashMap::new();
    for (pi, p) in cfg.providers.iter().enumerate() {
        for (si, img) in p.snapshot_images.iter().enumerate() {
            let ipath = index(&join(&index("providers", pi), "images"), si);
            let npath = join(&ipath, "name");
            if diskimage_names.contains(img.name.as_str())
                || abstract_images.contains(img.name.as_str())
            {
                errs.push(
                    &npath,
                    Kind::Duplicate,
                    format!(
                        "image {:?} is also a diskimage: snapshot images and diskimages share their names (their builds are recorded under it)",
                        img.name
                    ),
                );
            } else if let Some(first) = snapshot_names.get(img.name.as_str()) {
                errs.push(
                    &npath,
                    Kind::Duplicate,
                    format!(
                        "image {:?} is already defined at {first}: a snapshot image belongs to one provider (its builds are recorded under its name)",
                        img.name
                    ),
                );
            } else {
                snapshot_names.insert(img.name.as_str(), ipath.clone());
            }
            let bpath = join(&ipath, "base-image");
            match (
                p.cloud_image(&img.base_image).is_some(),
                p.diskimage(&img.base_image).is_some(),
            ) {
                (true, true) => errs.push(
                    &bpath,
                    Kind::Conflict,
                    format!(
                        "{:?} is both a cloud image and a diskimage of this provider: rename one",
                        img.base_image
                    ),
                ),
                (false, false) => errs.push(
                    &bpath,
                    Kind::UnknownReference,
                    format!(
                        "unknown base image {:?}: name one of {} or {}",
                        img.base_image,
                        join(&index("providers", pi), "cloud-images"),
                        join(&index("providers", pi), "diskimages")
                    ),
                ),
                _ => {}
            }
        }
    }

    let mut provider_names = HashSet::new();
    for (pi, p) in cfg.providers.iter().enumerate() {
        let ppath = index("providers", pi);
        if !provider_names.insert(p.name.as_str()) {
            errs.push(
                &join(&ppath, "name"),
                Kind::Duplicate,
                format!("provider {:?} is defined more than once", p.name),
            );
        }
        let mut seen = HashSet::new();
        for (di, d) in p.diskimages.iter().enumerate() {
            let path = join(&index(&join(&ppath, "diskimages"), di), "name");
            if !seen.insert(d.name.as_str()) {
                errs.push(
                    &path,
                    Kind::Duplicate,
                    format!("diskimage {:?} is listed twice", d.name),
                );
            }
            if abstract_images.contains(d.name.as_str()) {
                errs.push(
                    &path,
                    Kind::InvalidValue,
                    format!("diskimage {:?} is abstract and is never built", d.name),
                );
            } else if !diskimage_names.contains(d.name.as_str()) {
                errs.push(
                    &path,
                    Kind::UnknownReference,
                    format!("unknown diskimage {:?}", d.name),
                );
            }
        }
        let mut seen = HashSet::new();
        for (ci, c) in p.cloud_images.iter().enumerate() {
            if !seen.insert(c.name.as_str()) {
                errs.push(
                    &join(&index(&join(&ppath, "cloud-images"), ci), "name"),
                    Kind::Duplicate,
                    format!("cloud image {:?} is listed twice", c.name),
                );
            }
        }
        if let Driver::Static(hosts) = &p.driver {
            super::static_nodes::validate(p, hosts, &ppath, &label_names, errs);
        }
        let mut pool_names = HashSet::new();
        for (qi, pool) in p.pools.iter().enumerate() {
            let qpath = index(&join(&ppath, "pools"), qi);
            if !pool_names.insert(pool.name.as_str()) {
                errs.push(
                    &join(&qpath, "name"),
                    Kind::Duplicate,
                    format!(
                        "pool {:?} is defined more than once in provider {:?}",
                        pool.name, p.name
                    ),
                );
            }
            if matches!(p.driver, Driver::Static(_)) {
                // Its labels come from its hosts, checked there.
                continue;
            }
            let mut pool_labels = HashSet::new();
            for (li, l) in pool.labels.iter().enumerate() {
                let lpath = index(&join(&qpath, "labels"), li);
                if !pool_labels.insert(l.name.as_str()) {
                    errs.push(
                        &join(&lpath, "name"),
                        Kind::Duplicate,
                        format!("label {:?} is listed twice in this pool", l.name),
                    );
                }
                if !label_names.contains(l.name.as_str()) {
                    errs.push(
                        &join(&lpath, "name"),
                        Kind::UnknownReference,
                        format!("unknown label {:?} (not in the top-level `labels`)", l.name),
                    );
                }
                match &l.image {
                    ImageSource::DiskImage(d) if p.snapshot_image(d).is_some() => {
                        let groups = format!("{},{},{}", p.name, d, l.name);
                        check_groups(&groups, &lpath, errs);
                    }
                    ImageSource::DiskImage(d) if snapshot_names.contains_key(d.as_str()) => {
                        errs.push(
                            &join(&lpath, "diskimage"),
                            Kind::UnknownReference,
                            format!(
                                "image {d:?} is a snapshot image of another provider ({}); a pool label boots its own provider's images",
                                snapshot_names[d.as_str()]
                            ),
                        );
                    }
                    ImageSource::DiskImage(d) => {
                        let path = join(&lpath, "diskimage");
                        if abstract_images.contains(d.as_str()) {
                            errs.push(
                                &path,
                                Kind::InvalidValue,
                                format!("diskimage {d:?} is abstract and is never built"),
                            );
                        } else if !diskimage_names.contains(d.as_str()) {
                            errs.push(
                                &path,
                                Kind::UnknownReference,
                                format!("unknown diskimage {d:?}"),
                            );
                        } else if p.diskimage(d).is_none() {
                            errs.push(
                                &path,
                                Kind::UnknownReference,
                                format!(
                                    "diskimage {d:?} is not uploaded to provider {:?}; add it to {}",
                                    p.name,
                                    join(&ppath, "diskimages")
                                ),
                            );
                        }
                        let groups = format!("{},{},{}", p.name, d, l.name);
                        check_groups(&groups, &lpath, errs);
                    }
                    ImageSource::CloudImage(c) => {
                        if p.cloud_image(c).is_none() {
                            errs.push(
                                &join(&lpath, "cloud-image"),
                                Kind::UnknownReference,
                                format!(
                                    "unknown cloud image {c:?} (not in {})",
                                    join(&ppath, "cloud-images")
                                ),
                            );
                        }
                        let groups = format!("{},{},{}", p.name, c, l.name);
                        check_groups(&groups, &lpath, errs);
                    }
                    ImageSource::Static => {}
                }
            }
        }
    }

    for (ti, t) in cfg.targets.iter().enumerate() {
        let tpath = index("targets", ti);
        let mut seen = HashSet::new();
        for (li, l) in t.labels.iter().enumerate() {
            let path = join(&index(&join(&tpath, "labels"), li), "name");
            if !seen.insert(l.name.as_str()) {
                errs.push(
                    &path,
                    Kind::Duplicate,
                    format!("label {:?} is listed twice", l.name),
                );
            }
            if !label_names.contains(l.name.as_str()) {
                errs.push(
                    &path,
                    Kind::UnknownReference,
                    format!("unknown label {:?} (not in the top-level `labels`)", l.name),
                );
            }
        }
    }
    let mut target_names = HashSet::new();
    for (ti, t) in cfg.targets.iter().enumerate() {
        if !target_names.insert(t.name.as_str()) {
            errs.push(
                &join(&index("targets", ti), "name"),
                Kind::Duplicate,
                format!("target {:?} is defined more than once", t.name),
            );
        }
    }
}

/// Ready scripts and the keys that run them (seeds 002 and 003): resolves
/// `script-dir` and `private-key` paths against `base_dir` (the
/// configuration file's directory), and for each pool label with a ready
/// script checks that the file exists in `script-dir` and that its image
/// names a login (`username`, `private-key`) whose key can be read. Keys
/// no ready script uses are not read: a migrated file may keep a seed's
/// `$HOME/.ssh/id_rsa` placeholder.
pub(crate) fn ready_scripts(
    cfg: &mut Config,
    raw_images: &[RawDiskImage],
    base_dir: Option<&Path>,
    errs: &mut Errors,
) {
    let resolve = |p: &Path| match base_dir {
        Some(base) if p.is_relative() => base.join(p),
        _ => p.to_owned(),
    };
    if let Some(dir) = &mut cfg.script_dir {
        *dir = resolve(dir);
    }
    for d in &mut cfg.diskimages {
        if let Some(k) = &mut d.private_key {
            *k = resolve(k);
        }
    }
    for c in cfg
        .providers
        .iter_mut()
        .flat_map(|p| p.cloud_images.iter_mut())
    {
        if let Some(k) = &mut c.private_key {
            *k = resolve(k);
        }
    }
    for img in cfg
        .providers
        .iter_mut()
        .flat_map(|p| p.snapshot_images.iter_mut())
    {
        img.private_key = resolve(&img.private_key);
    }
    image_validations(cfg, raw_images, errs);
    snapshot_scripts(cfg, errs);
    let mut keys_checked = HashSet::new();
    let script_dir = cfg.script_dir.clone();
    for (pi, p) in cfg.providers.iter_mut().enumerate() {
        if matches!(p.driver, Driver::Static(_)) {
            continue;
        }
        let ppath = index("providers", pi);
        for (qi, pool) in p.pools.iter_mut().enumerate() {
            let qpath = index(&join(&ppath, "pools"), qi);
            for (li, l) in pool.labels.iter().enumerate() {
                let Some(rs) = pool.ready_scripts.get_mut(&l.name) else {
                    continue;
                };
                resolve_script("ready script", rs, script_dir.as_deref(), errs);
                // The login comes from the image the label boots.
                let login = match &l.image {
                    ImageSource::CloudImage(c) => p
                        .cloud_images
                        .iter()
                        .position(|ci| &ci.name == c)
                        .map(|ci| {
                            let img = &p.cloud_images[ci];
                            (
                                img.username.is_some(),
                                img.private_key.clone(),
                                index(&join(&ppath, "cloud-images"), ci),
                            )
                        }),
                    ImageSource::DiskImage(d) if p.snapshot_images.iter().any(|i| &i.name == d) => {
                        p.snapshot_images
                            .iter()
                            .find(|img| &img.name == d)
                            .map(|img| {
                                (
                                    true,
                                    Some(img.private_key.clone()),
                                    img.configured_at.clone(),
                                )
                            })
                    }
                    ImageSource::DiskImage(d) => {
                        cfg.diskimages.iter().find(|img| &img.name == d).map(|img| {
                            let at = raw_images.iter().find(|r| &r.name == d).map_or_else(
                                || format!("diskimages[name={d}]"),
                                |r| r.path.clone(),
                            );
                            (true, img.private_key.clone(), at)
                        })
                    }
                    ImageSource::Static => None,
                };
                // An unknown image was reported by the cross-checks.
                let Some((has_user, key, image_path)) = login else {
                    continue;
                };
                let has_key = key.is_some();
                if let Some(key) = key
                    && keys_checked.insert(key.clone())
                    && let Err(e) = std::fs::File::open(&key)
                {
                    errs.push(
                        &join(&image_path, "private-key"),
                        Kind::InvalidValue,
                        format!(
                            "cannot read private key {} (ready script {:?} logs in with it): {e}",
                            key.display(),
                            rs.name
                        ),
                    );
                }
                let missing: Vec<&str> = [("`username`", has_user), ("`private-key`", has_key)]
                    .into_iter()
                    .filter(|(_, has)| !has)
                    .map(|(k, _)| k)
                    .collect();
                if !missing.is_empty() {
                    errs.push(
                        &index(&join(&qpath, "labels"), li),
                        Kind::Conflict,
                        format!(
                            "ready script {:?} ({}) runs as the image's login: set {} on {image_path}",
                            rs.name,
                            rs.configured_at,
                            missing.join(" and ")
                        ),
                    );
                }
            }
        }
    }
}

/// Finds a script in `script-dir`, reporting it where it was named when
/// there is no `script-dir` or no such file.
fn resolve_script(what: &str, rs: &mut ReadyScript, script_dir: Option<&Path>, errs: &mut Errors) {
    match script_dir {
        None => errs.push(
            &rs.configured_at,
            Kind::Conflict,
            format!(
                "{what} {:?} needs `script-dir`, the directory it is read from",
                rs.name
            ),
        ),
        Some(dir) => {
            rs.path = dir.join(&rs.name);
            if !rs.path.is_file() {
                errs.push(
                    &rs.configured_at,
                    Kind::InvalidValue,
                    format!(
                        "{what} {:?} not found: {} is not a file",
                        rs.name,
                        rs.path.display()
                    ),
                );
            }
        }
    }
}

/// A provider diskimage's `validate`: its script must exist, the diskimage
/// must have a `private-key` to log in with, and a pool label of the
/// provider must boot the image (the test server is one of its servers).
fn image_validations(cfg: &mut Config, raw_images: &[RawDiskImage], errs: &mut Errors) {
    let script_dir = cfg.script_dir.clone();
    let diskimages = cfg.diskimages.clone();
    for (pi, p) in cfg.providers.iter_mut().enumerate() {
        let ppath = index("providers", pi);
        let booted: HashSet<String> = p
            .pools
            .iter()
            .flat_map(|pool| pool.labels.iter())
            .filter_map(|l| match &l.image {
                ImageSource::DiskImage(d) => Some(d.clone()),
                _ => None,
            })
            .collect();
        for (di, pdi) in p.diskimages.iter_mut().enumerate() {
            let Some(v) = &mut pdi.validate else {
                continue;
            };
            let vpath = join(&index(&join(&ppath, "diskimages"), di), "validate");
            resolve_script("validation script", v, script_dir.as_deref(), errs);
            if let Some(d) = diskimages.iter().find(|d| d.name == pdi.name)
                && d.private_key.is_none()
            {
                let at = raw_images.iter().find(|r| r.name == d.name).map_or_else(
                    || format!("diskimages[name={}]", d.name),
                    |r| r.path.clone(),
                );
                errs.push(
                    &vpath,
                    Kind::Conflict,
                    format!(
                        "validation script {:?} runs as the image's login: set `private-key` on {at}",
                        v.name
                    ),
                );
            }
            if !booted.contains(&pdi.name) {
                errs.push(
                    &vpath,
                    Kind::Conflict,
                    format!(
                        "the test server is booted with a pool label of this provider, but no pool label uses image {:?}",
                        pdi.name
                    ),
                );
            }
        }
    }
}

/// A snapshot image's scripts must be in `script-dir` and its key
/// readable: the builder runs `setup` (and `validate`) with them.
fn snapshot_scripts(cfg: &mut Config, errs: &mut Errors) {
    let script_dir = cfg.script_dir.clone();
    let mut keys_checked = HashSet::new();
    for p in &mut cfg.providers {
        for img in &mut p.snapshot_images {
            resolve_script("setup script", &mut img.setup, script_dir.as_deref(), errs);
            if let Some(v) = &mut img.validate {
                resolve_script("validation script", v, script_dir.as_deref(), errs);
            }
            if keys_checked.insert(img.private_key.clone())
                && let Err(e) = std::fs::File::open(&img.private_key)
            {
                errs.push(
                    &join(&img.configured_at, "private-key"),
                    Kind::InvalidValue,
                    format!(
                        "cannot read private key {} (setup script {:?} logs in with it): {e}",
                        img.private_key.display(),
                        img.setup.name
                    ),
                );
            }
        }
    }
}

/// The `groups` server metadata value is `<provider>,<image>,<label>`; it
/// must fit Nova's limit, or every launch of this label would fail.
fn check_groups(groups: &str, label_path: &str, errs: &mut Errors) {
    if groups.len() > NOVA_METADATA_LIMIT {
        errs.push(
            label_path,
            Kind::InvalidValue,
            format!(
                "the server metadata `groups` value \"<provider>,<image>,<label>\" would be {} bytes; Nova allows {NOVA_METADATA_LIMIT}",
                groups.len()
            ),
        );
    }
}
