//! The documentation builds, its links resolve, and the configuration
//! reference is the one generated from the parser's table.

use std::path::{Path, PathBuf};

use nodepool_docs::{BuildError, build, config_reference};

fn docs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating a scratch directory");
    dir
}

#[test]
fn the_docs_build_and_every_link_resolves() {
    let out = scratch("site");
    let pages = build(&docs_dir(), &out).unwrap_or_else(|e| panic!("{e}"));
    assert!(pages.len() >= 10, "only {} pages", pages.len());
    let index = std::fs::read_to_string(out.join("index.html")).expect("index.html written");
    assert!(index.contains("href=\"configuration.html\""), "{index}");
    let config = std::fs::read_to_string(out.join("configuration.html")).expect("page written");
    assert!(
        config.contains("<h3 id=\"providers\">"),
        "headings carry their anchors"
    );
}

#[test]
fn configuration_md_is_the_generated_reference() {
    let committed = std::fs::read_to_string(docs_dir().join("configuration.md"))
        .expect("docs/configuration.md exists");
    assert!(
        committed == config_reference(),
        "docs/configuration.md is stale: cargo run -p nodepool-docs -- config-reference > docs/configuration.md"
    );
}

#[test]
fn broken_links_are_reported_with_file_and_line() {
    let docs = scratch("broken-docs");
    let write = |name: &str, text: &str| std::fs::write(docs.join(name), text).expect("writing");
    write(
        "index.md",
        "# Docs\n\n- [a](a.md)\n- [config](configuration.md)\n",
    );
    write(
        "a.md",
        "# Page A\n\n## Right here\n\n[ok](#right-here) [ok](a.md#page-a)\n\n\
         [gone](missing.md)\n\n[bad](#nowhere)\n\n[out](../README.md)\n\n[web](https://example.org/x)\n",
    );
    write("orphan.md", "# Orphan\n");
    write("configuration.md", "# stale\n");
    let err = build(&docs, &scratch("broken-site")).expect_err("broken links fail the build");
    let BuildError::Problems(problems) = err else {
        panic!("expected problems, got {err}");
    };
    let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            "docs/a.md:7: broken link `missing.md`: no page docs/missing.md",
            "docs/a.md:9: broken link `#nowhere`: docs/a.md has no heading with anchor #nowhere",
            "docs/a.md:11: broken link `../README.md`: links must stay in docs/ (pages are side by side); name code as `path` instead",
            "docs/index.md:1: docs/orphan.md is not linked from the table of contents",
            "docs/configuration.md:1: differs from the parser's table; regenerate it with `cargo run -p nodepool-docs -- config-reference > docs/configuration.md`",
        ]
    );
}
