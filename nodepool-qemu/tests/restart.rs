//! VMs outlive their launcher: a new provider instance finds them running,
//! and after kill -9 of a launcher the leak rule deletes its VMs, leaving
//! no process and no file behind.

use std::time::Duration;

use nodepool_core::planner::leaks::{KnownNodes, LeakReason, leaked_servers};
use nodepool_model::conformance::provider::{Harness, random_node_id, spec_for};
use nodepool_model::provider::{InstanceStatus, Provider};

mod support;

use support::{Local, eventually, qemu_alive, vm_of_a_killed_launcher};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_launcher_finds_its_running_vms() {
    let host = Local::new();
    let first = Harness::provider(&host).await;
    let node = random_node_id();
    let spec = spec_for(&host, first.as_ref(), &node, host.label());
    let id = first.create_instance(&spec).await.expect("create");
    let before = first.wait_for_instance(&id, &spec).await.expect("wait");
    let port = first.connection_port(&before).expect("port");
    drop(first);
    let second = host.provider();
    let found = second
        .list_instances()
        .await
        .expect("list")
        .into_iter()
        .find(|i| i.external_id == id)
        .expect("the new provider lists the VM");
    assert_eq!(found.status, InstanceStatus::Active);
    assert_eq!(found.node_id(), Some(node));
    assert_eq!(found.name, spec.name);
    assert_eq!(second.connection_port(&found), Some(port));
    let pids = host.vm_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    second.delete_instance(&id).await.expect("delete");
    assert!(!qemu_alive(pids[0]), "the VM process is gone");
    assert!(second.list_instances().await.expect("list").is_empty());
}

/// A VM whose process died (killed, crashed) is in ERROR, and deleting it
/// removes its files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_whose_process_died_is_in_error() {
    let host = Local::new();
    let p = Harness::provider(&host).await;
    let spec = spec_for(&host, p.as_ref(), &random_node_id(), host.label());
    let id = p.create_instance(&spec).await.expect("create");
    let pid = host.vm_pids()[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the VM");
    eventually("the VM's process is gone", || !qemu_alive(pid)).await;
    let inst = p
        .get_instance(&id)
        .await
        .expect("get")
        .expect("still listed");
    assert!(
        matches!(inst.status, InstanceStatus::Error(_)),
        "{:?}",
        inst.status
    );
    let e = p.wait_for_instance(&id, &spec).await.expect_err("failed");
    assert!(e.to_string().contains("the qemu process is gone"), "{e}");
    p.delete_instance(&id).await.expect("delete");
    assert!(!host.image_dir.join("servers").join(&id).exists());
}

/// kill -9 of a launcher process that started a VM: the VM keeps running
/// (its own session); the next launcher's provider lists it, the leak rule
/// finds it (its node is not in the store) and deleting it leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_of_a_launcher_the_leak_rule_deletes_its_vms() {
    let host = Local::new();
    let node = random_node_id();
    let id = vm_of_a_killed_launcher(&host, &node).await;
    let pids = host.vm_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    assert!(qemu_alive(pids[0]), "the VM outlives its launcher");

    let next = host.provider();
    let listing = next.list_instances().await.expect("list");
    let leaks = leaked_servers("local", &listing, &KnownNodes::new(&[]));
    assert_eq!(leaks.len(), 1, "{leaks:?}");
    assert_eq!(leaks[0].instance.external_id, id);
    assert_eq!(leaks[0].reason, LeakReason::UnknownNode { node });
    assert_eq!(leaks[0].instance.status, InstanceStatus::Active);
    for leak in &leaks {
        tokio::time::timeout(
            Duration::from_secs(60),
            next.delete_instance(&leak.instance.external_id),
        )
        .await
        .expect("delete in time")
        .expect("delete");
    }
    assert!(!qemu_alive(pids[0]), "no VM process is left");
    let left: Vec<_> = std::fs::read_dir(host.image_dir.join("servers"))
        .expect("servers dir")
        .collect();
    assert!(left.is_empty(), "no server files are left: {left:?}");
}

/// A VM whose server directory was removed (by hand, or a crash between
/// the last steps of a delete) can no longer be listed or deleted: the
/// next provider kills it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_whose_files_are_gone_is_killed_by_the_next_provider() {
    let host = Local::new();
    let p = Harness::provider(&host).await;
    let spec = spec_for(&host, p.as_ref(), &random_node_id(), host.label());
    let id = p.create_instance(&spec).await.expect("create");
    let pid = host.vm_pids()[0];
    std::fs::remove_dir_all(host.image_dir.join("servers").join(&id)).expect("rm -rf");
    assert!(qemu_alive(pid), "removing its files does not stop the VM");
    assert_eq!(p.get_instance(&id).await.expect("get"), None);
    let _next = host.provider();
    eventually("the orphaned VM is killed", || !qemu_alive(pid)).await;
}

/// Uploads interrupted by the death of their process leave a partial
/// directory: the next provider removes it, and never a live process's.
#[test]
fn partial_uploads_of_dead_processes_are_swept() {
    let host = Local::new();
    let images = host.image_dir.join("images");
    // Beyond any pid_max: never a live process.
    let dead = images.join(".partial-999999999-0000");
    let live = images.join(format!(".partial-{}-0001", std::process::id()));
    for d in [&dead, &live] {
        std::fs::create_dir_all(d).expect("mkdir");
        std::fs::write(d.join("disk.qcow2"), b"half").expect("write");
    }
    let p = host.provider();
    assert!(!dead.exists(), "a dead process's partial upload is removed");
    assert!(live.exists(), "a live process's upload is left alone");
    drop(p);
}
