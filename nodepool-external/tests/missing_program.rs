//! A program that is not there: a located configuration error at load,
//! and, when it disappears after the configuration was read, a clear
//! call error (no panic) each time it is needed.

use nodepool_external::ExternalProvider;
use nodepool_model::config::Config;
use nodepool_model::provider::{Provider, ProviderError};

mod support;

use support::config_for;

#[test]
fn a_missing_program_is_a_located_config_error() {
    let yaml = "labels: [{name: small}]\nproviders:\n  - name: ext\n    driver: external\n    command: [/nonexistent/cloud-program, --state, x]\n    pools: []\n";
    let e = Config::from_yaml(yaml).expect_err("the program does not exist");
    let text = e.to_string();
    assert!(
        text.contains(
            "providers[0].command: program \"/nonexistent/cloud-program\" does not exist"
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_gone_after_loading_fails_each_call_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let program = dir.path().join("cloud.sh");
    std::fs::write(&program, "#!/bin/sh\nexit 0\n").expect("write");
    let mut perms = std::fs::metadata(&program).expect("stat").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&program, perms).expect("chmod");
    let config = config_for(&format!("[{:?}]", program.display().to_string()), "");
    std::fs::remove_file(&program).expect("remove");
    let p = ExternalProvider::new(&config.providers[0]).expect("provider");
    for _ in 0..2 {
        let e = p.quota_limits().await.expect_err("no program to run");
        let ProviderError::Transient(m) = &e else {
            panic!("{e:?}");
        };
        assert!(m.contains("op quota_limits"), "{m}");
        assert!(m.contains(&program.display().to_string()), "{m}");
        assert!(m.contains("could not be started"), "{m}");
    }
    assert_eq!(p.program_pid().await, None);
}
