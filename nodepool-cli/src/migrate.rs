//! `nodepool config-migrate`: reads the legacy file, writes the new
//! nodepool.yaml and clouds.yaml, prints the report on stderr. The
//! rewriting itself is the pure [`nodepool_model::config::migrate`].

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nodepool_model::config::migrate::migrate;

use crate::cli::ConfigMigrate;

/// Carries out `nodepool config-migrate`.
pub fn run(args: &ConfigMigrate, out: &mut dyn Write, err: &mut dyn Write) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.old)
        .with_context(|| format!("reading {}", args.old.display()))?;
    let m = migrate(&text).map_err(|e| anyhow::anyhow!("{}:{e}", args.old.display()))?;
    let clouds_path = args.clouds_output.clone().unwrap_or_else(|| {
        args.output
            .as_deref()
            .and_then(Path::parent)
            .map(|d| d.join("clouds.yaml"))
            .unwrap_or_else(|| PathBuf::from("clouds.yaml"))
    });
    // Check both before writing either, so a refusal leaves nothing half-done.
    for p in args.output.iter().chain([&clouds_path]) {
        if p.exists() && !args.force {
            bail!("{} exists; pass --force to overwrite it", p.display());
        }
    }
    write_private(&clouds_path, &m.clouds)?;
    match &args.output {
        Some(p) => {
            std::fs::write(p, &m.config).with_context(|| format!("writing {}", p.display()))?
        }
        None => out.write_all(m.config.as_bytes())?,
    }
    for line in &m.report {
        writeln!(err, "{line}")?;
    }
    writeln!(
        err,
        "credentials written to {} (mode 0600); check the result with `nodepool -c NEW.yaml config-validate`",
        clouds_path.display()
    )?;
    Ok(())
}

/// Writes a file only its owner can read: it holds cloud passwords.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
