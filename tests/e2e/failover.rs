//! Issue "Failover": real bricks killed, frozen and cut off the network (iptables) under a live
//! workload on a real FUSE mount; quorum loss; all bricks away; a partitioned old leader.

use mortar_tests::mortar_client::Volume;
use mortar_tests::mortar_proto::tls::Role;
use mortar_tests::mortar_proto::transport::{client_endpoint_at, Pool};
use mortar_tests::mortar_proto::{FsError, ROOT_INODE};
use mortar_tests::workload::{Fault, Writer};
use mortar_tests::{wait_for, Cluster, NetCut, DEADLINE};
use std::time::{Duration, Instant};

const CHUNK: u32 = 64 * 1024;

/// Under the live workload, fault the metadata leader (the hardest brick to lose) with each
/// kind of fault, each held for a minute: no application operation fails, the longest stall
/// stays within 5 s, and every acknowledged write is there afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_rides_through_kill_freeze_and_cut_of_the_leader() {
    let hold = Duration::from_secs(
        std::env::var("MORTAR_FAULT_HOLD_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    let mut c = Cluster::start(3);
    c.create_volume("www", CHUNK).await;
    let m = c.mount("www", "mnt", "").await;
    let w = Writer::start(&m.path.join("app"));
    w.progresses("the workload to start").await;
    let started = Instant::now();
    for fault in Fault::ALL {
        let victim = c.leader_index().await;
        let from = Instant::now();
        fault.inject(&mut c, victim, hold).await;
        w.progresses("the workload to go on after the brick returned")
            .await;
        let window = w.log.lock().unwrap().window(from, Instant::now());
        eprintln!(
            "{fault:?} of the leader (brick {victim}) for {hold:?}: {} operations, {} failed, longest {:?}",
            window.ops,
            window.failed.len(),
            window.longest
        );
    }
    let all = nothing_failed_or_lost(&c, &m, w, started, "the faults").await;
    assert!(
        all.longest <= Duration::from_secs(5),
        "longest application stall {:?}",
        all.longest
    );
}

/// Stop the writer and assert that none of its operations since `started` failed and that
/// every write it had acknowledged reads back through a fresh mount (not the writer's own
/// cache). Returns the figures of the window.
async fn nothing_failed_or_lost(
    c: &Cluster,
    m: &mortar_tests::Mount,
    w: Writer,
    started: Instant,
    what: &str,
) -> mortar_tests::workload::Window {
    let log = w.finish();
    let all = log.window(started, Instant::now());
    assert!(
        all.failed.is_empty(),
        "application operations failed: {:?}",
        &all.failed[..all.failed.len().min(10)]
    );
    let fresh = c.mount("www", "fresh", "").await;
    let lost = log.lost_through(&m.path, &fresh.path);
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    eprintln!(
        "{} operations, {} acknowledged writes, longest stall during {what} {:?}",
        log.ops.len(),
        log.acked.len(),
        all.longest
    );
    all
}

/// Two bricks down: reads go on, writes fail with EROFS, and a returning brick restores writes
/// without remounting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_brick_left_reads_work_and_writes_are_erofs() {
    let mut c = Cluster::start(3);
    c.create_volume("www", CHUNK).await;
    let m = c.mount("www", "mnt", "").await;
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(m.path.join("big"), &big).unwrap();
    std::fs::write(m.path.join("small"), b"small file").unwrap();
    std::fs::create_dir(m.path.join("dir")).unwrap();

    let leader = c.leader_index().await;
    let other = (leader + 1) % 3;
    c.bricks[leader].kill();
    c.bricks[other].kill();

    let p = m.path.clone();
    let (reads, write) = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let reads = (
            std::fs::read(p.join("big")),
            std::fs::read(p.join("small")),
            std::fs::read_dir(p.join("dir")).map(|d| d.count()),
        );
        let write = std::fs::write(p.join("new"), b"x");
        eprintln!("reads and the refused write took {:?}", t.elapsed());
        (reads, write)
    })
    .await
    .unwrap();
    assert_eq!(reads.0.unwrap(), big);
    assert_eq!(reads.1.unwrap(), b"small file");
    assert_eq!(reads.2.unwrap(), 0);
    let err = write.expect_err("a write succeeded with one brick of three");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");

    c.bricks[other].start();
    let p = m.path.clone();
    wait_for("writes to work again", DEADLINE, || {
        let p = p.clone();
        async move {
            tokio::task::spawn_blocking(move || std::fs::write(p.join("again"), b"back").ok())
                .await
                .unwrap()
        }
    })
    .await;
    assert_eq!(std::fs::read(m.path.join("again")).unwrap(), b"back");
    assert_eq!(std::fs::read(m.path.join("big")).unwrap(), big);
}

/// All bricks away for 30 s: operations fail with a clear errno after the configured timeout
/// instead of hanging, and the mount works again once the bricks are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_brick_away_operations_time_out_and_the_mount_recovers() {
    let mut c = Cluster::start(3);
    c.create_volume("www", CHUNK).await;
    let m = c
        .mount("www", "mnt", "op_timeout=5,attr_timeout=0,entry_timeout=0")
        .await;
    std::fs::write(m.path.join("before"), b"before").unwrap();
    let away_since = Instant::now();
    for b in &mut c.bricks {
        b.kill();
    }
    let p = m.path.clone();
    let (took, stat, write) = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        // What the mount cached stays valid until its lease from the (now dead) leader runs
        // out (1 s): it listed the root when it wrote "before", so until then even a name it
        // never looked at is answered "no such file" from memory. After that, nothing is.
        let stat = loop {
            let r = std::fs::metadata(p.join("never-seen"));
            match &r {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    assert!(
                        t.elapsed() < Duration::from_secs(3),
                        "answered from memory past the lease"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => break r,
            }
        };
        let write = std::fs::write(p.join("during"), b"x");
        (t.elapsed(), stat, write)
    })
    .await
    .unwrap();
    eprintln!("two operations failed after {took:?}");
    for (what, r) in [("stat", stat.map(|_| ())), ("write", write)] {
        let e = r.expect_err(&format!("{what} succeeded with every brick down"));
        assert!(
            matches!(e.raw_os_error(), Some(libc::ENOTCONN) | Some(libc::EIO)),
            "{what} failed with {e}"
        );
    }
    let left = Duration::from_secs(30).saturating_sub(away_since.elapsed());
    tokio::time::sleep(left).await;
    for b in &mut c.bricks {
        b.start();
    }
    let p = m.path.clone();
    wait_for("the mount to work again", DEADLINE, || {
        let p = p.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                std::fs::write(p.join("after"), b"after").ok()?;
                std::fs::read(p.join("before")).ok()
            })
            .await
            .unwrap()
        }
    })
    .await;
    assert_eq!(std::fs::read(m.path.join("after")).unwrap(), b"after");
    assert!(!m.path.join("during").exists());
}

/// The old leader is cut off from the other bricks together with a client that keeps writing:
/// nothing that client writes is acknowledged, the majority goes on, and once the partition
/// heals every brick holds the same namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_old_leader_acknowledges_nothing() {
    let c = Cluster::start(3);
    let majority_client = c.create_volume("www", CHUNK).await;
    let old = c.leader_index().await;
    let addrs = c.addrs();
    let others: Vec<String> = (0..3)
        .filter(|i| *i != old)
        .map(|i| addrs[i].clone())
        .collect();

    // The minority client binds a known address, so the partition can include it.
    let client_addr = format!("{}:7100", c.ip);
    let id = c.certs.identity(Role::Client, "minority");
    let ep = client_endpoint_at(&id, client_addr.parse().unwrap()).unwrap();
    let mut minority = Volume::with_pool(Pool::new(ep), &addrs[old..old + 1], "www")
        .await
        .unwrap();
    minority.set_op_timeout(Duration::from_secs(5));
    minority
        .create(ROOT_INODE, b"before-cut", 0o644, 0, 0)
        .await
        .unwrap();

    let cut = NetCut::between(&[addrs[old].as_str(), client_addr.as_str()], &others);
    let mut refused = Vec::new();
    for i in 0..5 {
        let name = format!("minority-{i}");
        match minority
            .create(ROOT_INODE, name.as_bytes(), 0o644, 0, 0)
            .await
        {
            Ok(a) => panic!("the minority side acknowledged {name} (inode {})", a.ino),
            Err(e) => refused.push(e),
        }
    }
    eprintln!("minority writes refused with: {refused:?}");
    assert!(refused
        .iter()
        .all(|e| matches!(e, FsError::ReadOnly(_) | FsError::Unavailable(_))));
    // The majority elects a leader and goes on.
    let majority = majority_client;
    wait_for("the majority to accept writes", DEADLINE, || {
        let m = &majority;
        async move { m.create(ROOT_INODE, b"majority", 0o644, 0, 0).await.ok() }
    })
    .await;
    drop(cut);

    // Healed: every brick converges on one namespace, without the minority's names.
    let digests = c.settled_meta_digests().await;
    assert!(
        digests.windows(2).all(|w| w[0] == w[1]),
        "bricks at one applied index hold different namespaces"
    );
    for i in 0..5 {
        let name = format!("minority-{i}");
        assert_eq!(
            majority.lookup(ROOT_INODE, name.as_bytes()).await,
            Err(FsError::NotFound),
            "{name} exists after the partition healed"
        );
    }
    majority.lookup(ROOT_INODE, b"majority").await.unwrap();
    majority.lookup(ROOT_INODE, b"before-cut").await.unwrap();
}

/// A follower killed, frozen and cut off, each for 30 s under the live workload: the writer
/// never fails, and when the follower returns it rejoins without an election — the term and the
/// leader are what they were (pre-vote: a brick that lost its leader asks before it stands, and
/// its peers, still hearing the leader, say no).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_returning_from_kill_freeze_or_cut_keeps_the_term_and_the_leader() {
    let hold = Duration::from_secs(30);
    let mut c = Cluster::start(3);
    c.create_volume("www", CHUNK).await;
    let m = c.mount("www", "mnt", "").await;
    let w = Writer::start(&m.path.join("app"));
    w.progresses("the workload to start").await;
    let leader = c.leader_index().await;
    let victim = (leader + 1) % 3;
    let term =
        |s: &Option<mortar_tests::mortar_proto::wire::BrickStatus>| s.as_ref().map(|s| s.term);
    let before = c.statuses().await;
    let started = Instant::now();
    for fault in Fault::ALL {
        let from = Instant::now();
        fault.inject(&mut c, victim, hold).await;
        w.progresses("the workload to go on after the follower returned")
            .await;
        let window = w.log.lock().unwrap().window(from, Instant::now());
        let now = c.statuses().await;
        eprintln!(
            "{fault:?} of a follower (brick {victim}) for {hold:?}: {} operations, {} failed, longest {:?}; terms {:?} -> {:?}",
            window.ops,
            window.failed.len(),
            window.longest,
            before.iter().map(term).collect::<Vec<_>>(),
            now.iter().map(term).collect::<Vec<_>>(),
        );
        assert_eq!(
            c.leader_index().await,
            leader,
            "{fault:?}: the leader changed"
        );
        for (i, s) in now.iter().enumerate() {
            assert_eq!(
                term(s),
                term(&before[leader]),
                "{fault:?}: brick {i}'s term moved"
            );
        }
    }
    // The path under test was taken: cut off, the follower asked for pre-votes (and was told no
    // or heard nothing) rather than standing.
    assert!(
        c.log_contains(victim, "pre-vote: no majority; keeping the term"),
        "the cut-off follower never asked for a pre-vote"
    );
    nothing_failed_or_lost(&c, &m, w, started, "the follower's faults").await;
}
