//! `nodepool-docs`: generates the configuration reference and builds the
//! documentation site.
//!
//! ```text
//! nodepool-docs config-reference          print docs/configuration.md
//! nodepool-docs build [DOCS [OUT]]        check docs/ and render it into target/docs
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Paths are relative to the workspace root, wherever cargo runs us from.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().unwrap_or(manifest);
    match args.first().map(String::as_str) {
        Some("config-reference") if args.len() == 1 => {
            print!("{}", nodepool_docs::config_reference());
            ExitCode::SUCCESS
        }
        Some("build") if args.len() <= 3 => {
            let docs = args.get(1).map_or_else(|| root.join("docs"), PathBuf::from);
            let out = args
                .get(2)
                .map_or_else(|| root.join("target/docs"), PathBuf::from);
            match nodepool_docs::build(&docs, &out) {
                Ok(pages) => {
                    println!(
                        "{} pages checked and written to {}",
                        pages.len(),
                        out.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => {
            eprintln!(
                "usage: nodepool-docs config-reference | nodepool-docs build [DOCS_DIR [OUT_DIR]]"
            );
            ExitCode::from(2)
        }
    }
}
