//! Issue "Leader failover in under a second, without spurious elections": the short election
//! timing must not cost stability. Two busy loops take the machine's two cores for ten minutes
//! while a writer works on a mount; no brick may stand for election (the term stays put).

use mortar_tests::workload::Writer;
use mortar_tests::Cluster;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Busy loops at the bricks' own priority, killed when dropped (even on a failed assertion).
struct BusyLoops(Vec<Child>);

impl BusyLoops {
    fn start(n: usize) -> BusyLoops {
        BusyLoops(
            (0..n)
                .map(|_| {
                    Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .spawn()
                        .expect("start a busy loop")
                })
                .collect(),
        )
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_busy_loops_for_ten_minutes_cause_no_election() {
    let run_for = Duration::from_secs(
        std::env::var("MORTAR_STABILITY_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(600),
    );
    let c = Cluster::start(3);
    c.create_volume("www", 64 * 1024).await;
    let m = c.mount("www", "mnt", "").await;
    let w = Writer::start(&m.path.join("app"));
    w.progresses("the workload to start").await;
    let leader = c.leader_index().await;
    let before = c.statuses().await;
    let term = before[leader].as_ref().expect("leader status").term;
    let busy = BusyLoops::start(2);
    let started = Instant::now();
    let mut samples = 0;
    while started.elapsed() < run_for {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = c.statuses().await;
        samples += 1;
        for (i, s) in now.iter().enumerate() {
            // A brick too busy to answer a status request is not a fault; one that answers
            // must not have moved to another term.
            if let Some(s) = s {
                assert_eq!(
                    s.term,
                    term,
                    "brick {i} moved from term {term} to {} after {:?} of busy loops",
                    s.term,
                    started.elapsed()
                );
            }
        }
    }
    drop(busy);
    let after = c.statuses().await;
    let log = w.finish();
    let all = log.window(started, Instant::now());
    let gaps: Vec<u64> = after
        .iter()
        .map(|s| {
            s.as_ref()
                .expect("every brick answers")
                .longest_leader_gap_ms
        })
        .collect();
    eprintln!(
        "{run_for:?} of two busy loops: term {term} throughout ({samples} samples), leader brick {leader}; \
         {} writer operations, {} failed, longest {:?}; longest silence of the leader per brick (ms) {gaps:?}",
        all.ops,
        all.failed.len(),
        all.longest
    );
    for (i, s) in after.iter().enumerate() {
        assert_eq!(
            s.as_ref().unwrap().term,
            term,
            "brick {i}'s term at the end"
        );
    }
    assert_eq!(c.leader_index().await, leader, "the leader changed");
    assert!(
        all.failed.is_empty(),
        "writer operations failed: {:?}",
        &all.failed[..all.failed.len().min(10)]
    );
    assert!(
        all.ops > 100,
        "the writer hardly ran ({} operations): the test measured nothing",
        all.ops
    );
}
