//! Nothing a test starts outlives it, even when the test binary is killed outright
//! (SIGKILL runs no destructor, so `kill_on_drop` cannot help): the harness starts every
//! child to die with it (`PR_SET_PDEATHSIG`, through setpriv).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use thaw_benches::harness::*;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Set for the copy of this test binary that plays the test being killed.
const HELPER: &str = "THAW_ORPHANS_HELPER";

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'))
    })
}

/// The test that gets killed: starts a test app and a queue-proxy through the harness,
/// prints their pids, and waits to be killed. Run only by the test below.
#[tokio::test]
#[ignore = "run by a_killed_test_binary_takes_its_children_with_it"]
async fn helper_holding_children() {
    if std::env::var_os(HELPER).is_none() {
        return;
    }
    let app = App::start(&[]).await;
    let qp = QueueProxy::start(app.port(), &[]).await;
    println!("pids {} {}", app.pid(), qp.pid());
    tokio::time::sleep(Duration::from_secs(120)).await;
}

#[tokio::test]
async fn a_killed_test_binary_takes_its_children_with_it() {
    if !thaw_shared::lifeline::available() {
        eprintln!("skipping: setpriv (util-linux) with --pdeathsig is not installed");
        return;
    }
    let mut helper = child(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_holding_children",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(HELPER, "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(helper.stdout.take().unwrap()).lines();
    let pids: Vec<u32> = tokio::time::timeout(EVENTUALLY, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            // libtest prints `test helper_holding_children ... ` on the same line.
            if let Some((_, rest)) = line.split_once("pids ") {
                return rest.split(' ').map(|p| p.parse().unwrap()).collect();
            }
        }
        panic!("the helper exited without starting its children");
    })
    .await
    .expect("the helper reported its children in time");
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|p| alive(*p)), "{pids:?}");

    helper.start_kill().unwrap();
    helper.wait().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "children outlived the killed test binary by 5 s: {pids:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
