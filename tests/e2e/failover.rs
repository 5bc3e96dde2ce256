//! Issue "Failover": real bricks killed, frozen and cut off the network (iptables) under a live
//! workload on a real FUSE mount; quorum loss; all bricks away; a partitioned old leader.

use mortar_tests::mortar_client::{volume_admin, Volume};
use mortar_tests::mortar_proto::tls::Role;
use mortar_tests::mortar_proto::transport::{client_endpoint_at, Pool};
use mortar_tests::mortar_proto::{FsError, ROOT_INODE};
use mortar_tests::{wait_for, Cluster, NetCut, DEADLINE};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CHUNK: u32 = 64 * 1024;

async fn leader_index(c: &Cluster) -> usize {
    let pool = c.admin_pool();
    wait_for("a metadata leader", DEADLINE, || {
        let pool = pool.clone();
        let addrs = c.addrs();
        async move {
            for (i, a) in addrs.iter().enumerate() {
                if let Ok(s) = volume_admin::status(&pool, a).await {
                    if s.raft_role == "leader" {
                        return Some(i);
                    }
                }
            }
            None
        }
    })
    .await
}

async fn wait_up(c: &Cluster, i: usize) {
    let pool = c.admin_pool();
    let addr = c.addrs()[i].clone();
    wait_for(&format!("brick {addr} to answer"), DEADLINE, || {
        let (pool, addr) = (pool.clone(), addr.clone());
        async move { volume_admin::status(&pool, &addr).await.ok() }
    })
    .await;
}

/// The application: write and fsync a small file every 10 ms, read it back; every operation's
/// duration, every failure and every acknowledged write are recorded.
struct Workload {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<Report>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default, Debug)]
struct Report {
    ops: u64,
    failures: Vec<String>,
    longest: Duration,
    acked: Vec<(PathBuf, Vec<u8>)>,
}

impl Workload {
    fn start(dir: &Path) -> Workload {
        std::fs::create_dir_all(dir).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(Report::default()));
        let (s, r, dir) = (stop.clone(), report.clone(), dir.to_path_buf());
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let path = dir.join(format!("w{n}"));
                let body = format!("write {n} {}", "x".repeat((n % 200) as usize)).into_bytes();
                let t = Instant::now();
                let result = (|| -> std::io::Result<()> {
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o644)
                        .open(&path)?;
                    f.write_all(&body)?;
                    f.sync_all()?;
                    drop(f);
                    let mut back = Vec::new();
                    std::fs::File::open(&path)?.read_to_end(&mut back)?;
                    if back != body {
                        return Err(std::io::Error::other("read back different bytes"));
                    }
                    Ok(())
                })();
                let took = t.elapsed();
                let mut rep = r.lock().unwrap();
                rep.ops += 1;
                rep.longest = rep.longest.max(took);
                match result {
                    Ok(()) => rep.acked.push((path, body)),
                    Err(e) => rep.failures.push(format!("{}: {e}", path.display())),
                }
                drop(rep);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Workload {
            stop,
            report,
            thread: Some(thread),
        }
    }

    /// Operations so far, to wait for progress.
    fn ops(&self) -> u64 {
        self.report.lock().unwrap().ops
    }

    fn finish(mut self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.report.lock().unwrap())
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

async fn progresses(w: &Workload, what: &str) {
    let from = w.ops();
    wait_for(what, DEADLINE, || {
        let done = w.ops() >= from + 20;
        async move { done.then_some(()) }
    })
    .await;
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    Freeze,
    Cut,
}

/// Under the live workload, fault the metadata leader (the hardest brick to lose) with each
/// kind of fault: no application operation fails, the longest stall stays within 5 s, and
/// every acknowledged write is there afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_rides_through_kill_freeze_and_cut_of_the_leader() {
    let hold: u64 = std::env::var("MORTAR_FAULT_HOLD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let mut c = Cluster::start(3);
    c.create_volume("www", CHUNK).await;
    let m = c.mount("www", "mnt", "").await;
    let w = Workload::start(&m.path.join("app"));
    progresses(&w, "the workload to start").await;

    for fault in [Fault::Kill, Fault::Freeze, Fault::Cut] {
        let victim = leader_index(&c).await;
        eprintln!("fault {fault:?} on the leader, brick {victim}");
        match fault {
            Fault::Kill => {
                c.bricks[victim].kill();
                progresses(&w, "the workload to go on after the kill").await;
                c.bricks[victim].start();
            }
            Fault::Freeze => {
                c.bricks[victim].freeze();
                tokio::time::sleep(Duration::from_secs(hold)).await;
                c.bricks[victim].thaw();
            }
            Fault::Cut => {
                let cut = NetCut::isolate(&c.addrs()[victim]);
                tokio::time::sleep(Duration::from_secs(hold)).await;
                drop(cut);
            }
        }
        wait_up(&c, victim).await;
        progresses(&w, "the workload to go on after the brick returned").await;
        let rep = w.report.lock().unwrap();
        eprintln!(
            "after {fault:?}: {} operations, longest {:?}, {} failures",
            rep.ops,
            rep.longest,
            rep.failures.len()
        );
    }
    let rep = w.finish();
    assert!(
        rep.failures.is_empty(),
        "application operations failed: {:?}",
        &rep.failures[..rep.failures.len().min(10)]
    );
    assert!(
        rep.longest <= Duration::from_secs(5),
        "longest application stall {:?}",
        rep.longest
    );
    for (path, body) in &rep.acked {
        assert_eq!(
            &std::fs::read(path).unwrap(),
            body,
            "{} lost or changed",
            path.display()
        );
    }
    eprintln!(
        "{} operations, {} acknowledged writes, longest stall {:?}",
        rep.ops,
        rep.acked.len(),
        rep.longest
    );
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

    let leader = leader_index(&c).await;
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
        let stat = std::fs::metadata(p.join("before"));
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
    let old = leader_index(&c).await;
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
    let pool = c.admin_pool();
    wait_for("every brick to hold the same namespace", DEADLINE, || {
        let (pool, addrs) = (pool.clone(), addrs.clone());
        async move {
            let mut seen = Vec::new();
            for a in &addrs {
                seen.push(volume_admin::meta_digest(&pool, a).await.ok()?);
            }
            seen.windows(2).all(|w| w[0] == w[1]).then_some(())
        }
    })
    .await;
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
