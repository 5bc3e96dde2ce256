//! Issue "Bricks that keep every write on three replicas": real brick processes on loopback,
//! real QUIC with mutual TLS, real RocksDB.

use mortar_tests::metrics::{scrape, sum};
use mortar_tests::mortar_client::volume_admin;
use mortar_tests::mortar_client::Volume;
use mortar_tests::mortar_proto::tls::{self, Identity, Role, Validity};
use mortar_tests::mortar_proto::wire::{self, PutChunk, Reply, Request, Response};
use mortar_tests::mortar_proto::{ChunkId, FsError, ROOT_INODE};
use mortar_tests::tree::{self, TreeSpec};
use mortar_tests::{repo, wait_for, Cluster, DEADLINE};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// The index of a brick whose Raft role is follower.
async fn a_follower(c: &Cluster) -> usize {
    let pool = c.admin_pool();
    for (i, a) in c.addrs().iter().enumerate() {
        if volume_admin::status(&pool, a).await.unwrap().raft_role == "follower" {
            return i;
        }
    }
    panic!("no brick is a follower");
}

/// Create files `f{i}` for `range` in `dir`, each holding "{label} {i}"; returns names and bodies.
async fn write_files(
    vol: &mortar_tests::mortar_client::Volume,
    dir: u64,
    range: std::ops::Range<u32>,
    label: &str,
) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for i in range {
        let a = vol
            .create(dir, format!("f{i}").as_bytes(), 0o644, 0, 0)
            .await
            .unwrap();
        let body = format!("{label} {i}").into_bytes();
        vol.write(a.ino, 0, &body, false).await.unwrap();
        out.push((format!("f{i}"), body));
    }
    out
}

/// Acceptance 1, 2, 3: a 2,500-entry tree written and read back exactly; every chunk on all
/// three bricks; identical after all bricks restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_round_trips_is_on_every_brick_and_survives_full_restart() {
    let mut c = Cluster::start(3);
    let src = c.dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let spec = TreeSpec::docroot();
    tree::make_tree(&src, &spec, 42);
    assert_eq!(tree::walk(&src).len(), spec.entries());

    let vol = c.create_volume("www", 1 << 20).await;
    tree::upload(&vol, &src).await;
    assert_eq!(tree::verify(&vol, &src).await, spec.entries());

    let referenced = tree::referenced_chunks(&vol).await;
    assert!(
        referenced.len() > 300,
        "only {} chunks referenced",
        referenced.len()
    );
    // A write is acknowledged at two copies; a third copy that failed (a peer slow to answer
    // on a loaded machine) is in the heal index, and the operator's heal restores it.
    let held = c.chunks_per_brick().await;
    if held.iter().any(|h| !referenced.is_subset(h)) {
        let bricks = c.addrs().join(",");
        let out = c.cli(&["volume", "heal", "www", "--bricks", &bricks]);
        assert!(
            out.status.success(),
            "heal: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (i, held) in c.chunks_per_brick().await.iter().enumerate() {
        let missing: Vec<_> = referenced.difference(held).collect();
        assert!(
            missing.is_empty(),
            "brick{i} lacks {} of {} chunks",
            missing.len(),
            referenced.len()
        );
    }
    // The same through the operator CLI. A peer a brick failed to reach during the upload is
    // probed again in the background: wait until every brick sees both peers up.
    let status = || {
        let out = c.cli(&[
            "volume",
            "status",
            "www",
            "--bricks",
            &c.addrs().join(","),
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(out["problems"], serde_json::json!([]), "{out}");
        out["bricks"].as_array().unwrap().clone()
    };
    let peers_up = |r: &serde_json::Value| {
        r["status"]["peers"]
            .as_array()
            .is_some_and(|p| p.len() == 2 && p.iter().all(|p| p["health"] == "Up"))
    };
    let rows = wait_for("every brick to see both peers up", DEADLINE, || {
        let rows = status();
        async move { rows.iter().all(peers_up).then_some(rows) }
    })
    .await;
    assert_eq!(rows.len(), 3);
    for r in &rows {
        assert_eq!(r["up"], true);
        assert!(r["status"]["chunk_count"].as_u64().unwrap() >= referenced.len() as u64);
        assert_eq!(r["status"]["heal_backlog"], 0);
    }
    let roles: BTreeSet<String> = rows
        .iter()
        .map(|r| r["status"]["raft_role"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        roles,
        BTreeSet::from(["leader".to_string(), "follower".to_string()])
    );
    drop(vol);

    c.restart_all();
    let vol = c.client("www").await;
    assert_eq!(tree::verify(&vol, &src).await, spec.entries());
    assert_eq!(tree::referenced_chunks(&vol).await, referenced);
    let info = c.cli(&["volume", "info", "--bricks", &c.addrs()[2]]);
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("Volume Name: www") && info.contains("1 x 3 = 3"),
        "{info}"
    );
}

/// Acceptance 4: SIGKILL of a brick while a writer runs; the writer sees no error, metadata
/// keeps committing on two bricks, and the restarted brick catches up and is listed for heal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_rides_through_a_killed_brick_which_catches_up() {
    let mut c = Cluster::start(3);
    let vol = Arc::new(c.create_volume("www", 64 * 1024).await);
    let pool = c.admin_pool();
    // A follower: killing the leader mid-request needs idempotent retries (the failover issue).
    let victim = a_follower(&c).await;
    let victim_id = volume_admin::status(&pool, &c.addrs()[victim])
        .await
        .unwrap()
        .id;

    let written = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (vol, written, stop) = (vol.clone(), written.clone(), stop.clone());
        tokio::spawn(async move {
            let dir = vol.mkdir(ROOT_INODE, b"w", 0o755, 0, 0).await?;
            let mut files = Vec::new();
            let mut i = 0usize;
            // Write until told to stop, and at least 60 files.
            while !stop.load(Ordering::Relaxed) || i < 60 {
                let data: Vec<u8> = (0..(150_000 + i * 13))
                    .map(|k| (k * 31 + i) as u8)
                    .collect();
                let a = vol
                    .create(dir.ino, format!("f{i}").as_bytes(), 0o644, 0, 0)
                    .await?;
                vol.write(a.ino, 0, &data, false).await?;
                files.push((a.ino, data));
                i += 1;
                written.store(i, Ordering::Relaxed);
            }
            Ok::<_, FsError>(files)
        })
    };
    wait_for("writer to make progress", DEADLINE, || {
        let n = written.load(Ordering::Relaxed);
        async move { (n >= 10).then_some(()) }
    })
    .await;
    c.bricks[victim].kill();
    let at_kill = written.load(Ordering::Relaxed);
    wait_for("writer to continue on two bricks", DEADLINE, || {
        let n = written.load(Ordering::Relaxed);
        async move { (n >= at_kill + 25).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let files = writer.await.unwrap().expect("writer saw no error");

    // The operator sees the missing brick, and that the others cannot reach it.
    let out = c.cli(&["volume", "status", "www", "--bricks", &c.addrs().join(",")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let victim_addr = &c.addrs()[victim];
    for i in (0..3).filter(|i| *i != victim) {
        let row = text
            .lines()
            .find(|l| l.starts_with(&c.addrs()[i]))
            .unwrap_or_else(|| panic!("no row for brick {i}: {text}"));
        assert!(row.ends_with("1/2"), "{text}");
    }
    assert_eq!(
        text.matches(&format!(
            "peer {victim_addr} ({victim_id}) is down from here"
        ))
        .count(),
        2,
        "{text}"
    );

    c.bricks[victim].start();
    let mut leader_applied = 0;
    for i in (0..3).filter(|i| *i != victim) {
        leader_applied = leader_applied.max(
            volume_admin::status(&pool, &c.addrs()[i])
                .await
                .unwrap()
                .applied_index,
        );
    }
    let addr = c.addrs()[victim].clone();
    wait_for("restarted brick to catch up its Raft log", DEADLINE, || {
        let (pool, addr) = (pool.clone(), addr.clone());
        async move {
            let s = volume_admin::status(&pool, &addr).await.ok()?;
            (s.applied_index >= leader_applied).then_some(())
        }
    })
    .await;

    for (ino, data) in &files {
        assert_eq!(&vol.read(*ino, 0, data.len() as u64).await.unwrap(), data);
    }
    let referenced = tree::referenced_chunks(&vol).await;
    let held = c.chunks_per_brick().await;
    let missed: BTreeSet<ChunkId> = referenced.difference(&held[victim]).copied().collect();
    assert!(
        !missed.is_empty(),
        "the killed brick missed nothing; the test did not test"
    );
    let mut listed = BTreeSet::new();
    for i in (0..3).filter(|i| *i != victim) {
        assert!(
            referenced.is_subset(&held[i]),
            "surviving brick{i} lacks chunks"
        );
        for e in volume_admin::list_heal_index(&pool, &c.addrs()[i])
            .await
            .unwrap()
        {
            if e.brick == victim_id {
                listed.insert(e.chunk);
            }
        }
    }
    let unlisted: Vec<_> = missed.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "{} of {} missed chunks are not in any heal index",
        unlisted.len(),
        missed.len()
    );
}

/// Send raw bytes as one request on a fresh stream and read the answer.
async fn raw_request(conn: &quinn::Connection, bytes: &[u8]) -> Response {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    let _ = send.finish();
    wire::read_frame::<Response>(&mut recv).await.unwrap()
}

/// Acceptance 5 (brick side): foreign certificates, bad names, bad frames, bad chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let c = Cluster::start(3);
    let vol = c.create_volume("www", 1 << 20).await;

    // A client certificate from another CA, presented to bricks whose CA the client trusts:
    // the brick refuses it, and the client says so.
    let other = tempfile::tempdir().unwrap();
    let foreign = mortar_tests::Certs::new(other.path());
    let (cert, key) = foreign.issue(Role::Client, "intruder");
    let id = Identity::load(&cert, &key, &c.certs.ca()).unwrap();
    let err = Volume::connect(&c.addrs(), "www", &id)
        .await
        .err()
        .expect("foreign cert refused");
    assert!(matches!(err, FsError::NotPermitted(_)), "{err:?}");
    assert!(err.to_string().contains("refused our certificate"), "{err}");
    wait_for("brick log to name the refusal", DEADLINE, || async {
        (0..3)
            .any(|i| c.log_contains(i, "refused connection (TLS handshake failed)"))
            .then_some(())
    })
    .await;
    // A client of another volume CA altogether does not trust the bricks either.
    let err = Volume::connect(
        &c.addrs(),
        "www",
        &foreign.identity(Role::Client, "intruder"),
    )
    .await
    .err()
    .expect("refused");
    assert!(err.to_string().contains("not trusted"), "{err}");
    // An expired certificate from the right CA.
    tls::issue(
        &c.certs.dir,
        Role::Client,
        "expired",
        Validity { days: -1 },
        &c.certs.dir,
    )
    .unwrap();
    let expired = c.certs.identity(Role::Client, "expired");
    let err = Volume::connect(&c.addrs(), "www", &expired)
        .await
        .err()
        .expect("expired cert refused");
    assert!(err.to_string().contains("refused our certificate"), "{err}");

    // Names.
    let long = vec![b'a'; 256];
    assert_eq!(
        vol.create(ROOT_INODE, &long, 0o644, 0, 0).await,
        Err(FsError::NameTooLong)
    );
    assert_eq!(
        vol.lookup(ROOT_INODE, &long).await,
        Err(FsError::NameTooLong)
    );
    assert_eq!(
        vol.create(ROOT_INODE, b"a/b", 0o644, 0, 0).await,
        Err(FsError::InvalidName)
    );
    assert_eq!(
        vol.mkdir(ROOT_INODE, b"a\0b", 0o755, 0, 0).await,
        Err(FsError::InvalidName)
    );
    assert_eq!(FsError::NameTooLong.errno(), libc::ENAMETOOLONG);
    assert_eq!(FsError::InvalidName.errno(), libc::EINVAL);
    assert!(
        vol.readdir_all(ROOT_INODE).await.unwrap().is_empty(),
        "a refused name left an entry"
    );

    // Frames: garbage, then a length over the limit; the brick answers with an error each time
    // and keeps serving other streams on the same connection.
    let pool = c.admin_pool();
    let conn = pool.connection(&c.addrs()[0]).await.unwrap();
    let mut garbage = 8u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xff; 8]);
    assert!(
        matches!(raw_request(&conn, &garbage).await, Err(FsError::Invalid(m)) if m.contains("decode"))
    );
    let huge = (wire::MAX_FRAME as u32 + 1).to_be_bytes();
    assert!(
        matches!(raw_request(&conn, &huge).await, Err(FsError::Invalid(m)) if m.contains("exceeds"))
    );
    let mut hello = Vec::new();
    let body = wire::encode(&Request::Hello);
    hello.extend_from_slice(&(body.len() as u32).to_be_bytes());
    hello.extend_from_slice(&body);
    assert!(matches!(
        raw_request(&conn, &hello).await,
        Ok(Reply::Hello(_))
    ));

    // A chunk whose bytes do not match its id.
    let data = vec![9u8; 4096];
    let wrong = ChunkId::of(b"something else");
    let put = Request::PutChunk(PutChunk {
        id: wrong,
        data: data.clone(),
        replicate: true,
        sync: false,
    });
    let r = pool
        .call(&c.addrs()[1], &put, std::time::Duration::from_secs(10))
        .await
        .unwrap();
    assert!(matches!(r, Err(FsError::HashMismatch(_))), "{r:?}");
    for held in c.chunks_per_brick().await {
        assert!(
            !held.contains(&wrong) && !held.contains(&ChunkId::of(&data)),
            "a rejected chunk was stored"
        );
    }
    // A client certificate may not push unreplicated copies (brick-to-brick traffic).
    let id = ChunkId::of(&data);
    let sneaky = Request::PutChunk(PutChunk {
        id,
        data,
        replicate: false,
        sync: false,
    });
    let client_pool = vol.pool();
    let r = client_pool
        .call(&c.addrs()[1], &sneaky, std::time::Duration::from_secs(10))
        .await
        .unwrap();
    assert!(matches!(r, Err(FsError::NotPermitted(_))), "{r:?}");
    wait_for("brick log to name the refused role", DEADLINE, || async {
        c.log_contains(1, "refused request: not allowed for this certificate role")
            .then_some(())
    })
    .await;
}

/// Acceptance 5 (CLI side): refused creates name the problem and leave no half-made volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_create_refuses_bad_brick_lists_without_side_effects() {
    let c = Cluster::start(3);
    let a = c.addrs();
    let pool = c.admin_pool();
    for addr in &a {
        let addr = addr.clone();
        wait_for("brick to answer", DEADLINE, || {
            let (pool, addr) = (pool.clone(), addr.clone());
            async move { volume_admin::hello(&pool, &addr).await.ok() }
        })
        .await;
    }
    let unreachable = format!("{}:9", c.ip);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["www", "replica", "3", &a[0], &a[1]],
            "a multiple of 3 bricks (3, 6, 9, …), got 2",
        ),
        (
            vec!["www", "replica", "3", &a[0], &a[1], &a[1]],
            "listed twice",
        ),
        (
            vec!["www", "replica", "3", &a[0], &a[1], &unreachable],
            "unreachable",
        ),
        (
            vec!["www", "replica", "2", &a[0], &a[1], &a[2]],
            "only 'replica 3'",
        ),
        (
            vec!["bad/name", "replica", "3", &a[0], &a[1], &a[2]],
            "invalid volume name",
        ),
    ];
    for (args, needle) in cases {
        let mut full = vec!["volume", "create"];
        full.extend(args);
        let out = c.cli(&full);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{full:?} succeeded");
        assert!(
            err.contains(needle),
            "{full:?}: expected '{needle}' in: {err}"
        );
        if needle == "unreachable" {
            assert!(
                err.contains(&unreachable),
                "the message does not name the brick: {err}"
            );
        }
        for addr in &a {
            let s = volume_admin::status(&pool, addr).await.unwrap();
            assert_eq!(
                (s.volume.as_deref(), s.raft_role.as_str()),
                (None, "none"),
                "{full:?} changed {addr}"
            );
        }
    }
    let wrong_args = c.cli(&["volume", "frobnicate"]);
    assert_eq!(wrong_args.status.code(), Some(2));
    // The same bricks still make a volume afterwards.
    let vol = c.create_volume("www", 1 << 20).await;
    vol.mkdir(ROOT_INODE, b"ok", 0o755, 0, 0).await.unwrap();
    let again = c.cli(&[
        "volume", "create", "www2", "replica", "3", &a[0], &a[1], &a[2],
    ]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already belongs to volume 'www'"));
}

/// Write `range` files of 32 KiB each under `dir`: inline content, so every byte passes
/// through the Raft log.
async fn write_large_inline_files(
    vol: &Volume,
    dir: u64,
    range: std::ops::Range<u32>,
) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for i in range {
        let name = format!("big{i}");
        let a = vol.create(dir, name.as_bytes(), 0o644, 0, 0).await.unwrap();
        let body: Vec<u8> = (0..32 * 1024u32).map(|b| (b * 7 + i) as u8).collect();
        vol.write(a.ino, 0, &body, false).await.unwrap();
        out.push((name, body));
    }
    out
}

/// The highest index brick `i` has purged its log up to, by its own log.
fn purged_up_to(c: &Cluster, i: usize) -> u64 {
    std::fs::read_to_string(&c.bricks[i].log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split("purged the log up to index ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// The log is bounded by bytes as well as by entries: entries full of inline content make
/// every brick snapshot and purge long before the entry count (20,000, keeping 2,000) would,
/// a restart of every brick keeps the namespace, and a follower that was down meanwhile
/// catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_of_large_entries_is_snapshot_and_purged_by_its_bytes() {
    let mut c = Cluster::start_with(3, &["--snapshot-bytes", "262144"]);
    let vol = c.create_volume("www", 1 << 20).await;
    let dir = vol.mkdir(ROOT_INODE, b"d", 0o755, 0, 0).await.unwrap();
    // About 1.3 MB of log in some 85 entries (a create and a write per file): five times the
    // bound, and a quarter of the bound (64 KiB, two files) is all a purge keeps.
    let mut expect = write_large_inline_files(&vol, dir.ino, 0..40).await;
    for i in 0..3 {
        wait_for(&format!("brick{i} to purge by bytes"), DEADLINE, || async {
            (purged_up_to(&c, i) >= 40).then_some(())
        })
        .await;
    }
    drop(vol);
    c.restart_all();
    let vol = c.client("www").await;
    let victim = a_follower(&c).await;
    c.bricks[victim].stop();
    expect.extend(write_large_inline_files(&vol, dir.ino, 40..80).await);
    c.bricks[victim].start();
    let d = c.settled_meta_digests().await;
    assert!(d.iter().all(|x| *x == d[0]), "replicas differ");
    for (name, body) in &expect {
        let a = vol.lookup(dir.ino, name.as_bytes()).await.unwrap();
        assert_eq!(&vol.read(a.ino, 0, 1 << 20).await.unwrap(), body, "{name}");
    }
}

/// Snapshots and log purging: bricks restart from snapshot plus log, and a brick that was down
/// past a purge catches up by installing a snapshot, ending with the same namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_purge_restart_and_catch_up_by_snapshot() {
    let mut c = Cluster::start_with(3, &["--snapshot-every", "40"]);
    let vol = c.create_volume("www", 1 << 20).await;
    let dir = vol.mkdir(ROOT_INODE, b"d", 0o755, 0, 0).await.unwrap();
    let mut expect = write_files(&vol, dir.ino, 0..120, "file").await;
    drop(vol);
    c.restart_all();
    let vol = c.client("www").await;
    let check = |vol: mortar_tests::mortar_client::Volume, expect: Vec<(String, Vec<u8>)>| async move {
        for (name, body) in &expect {
            let a = vol.lookup(dir.ino, name.as_bytes()).await.unwrap();
            assert_eq!(&vol.read(a.ino, 0, 1 << 20).await.unwrap(), body, "{name}");
        }
        vol
    };
    let vol = check(vol, expect.clone()).await;
    let d = c.settled_meta_digests().await;
    assert!(
        d.iter().all(|x| *x == d[0]),
        "replicas differ after restart"
    );

    // A follower misses far more entries than the leader keeps after a snapshot.
    let victim = a_follower(&c).await;
    c.bricks[victim].stop();
    expect.extend(write_files(&vol, dir.ino, 120..300, "later").await);
    c.bricks[victim].start();
    let d = c.settled_meta_digests().await;
    assert!(
        d.iter().all(|x| *x == d[0]),
        "the caught-up brick's namespace differs"
    );
    assert!(
        c.log_contains(victim, "installed snapshot"),
        "brick{victim} caught up without a snapshot; the test did not test"
    );
    check(vol, expect).await;
}

/// Issue 23, point 6: logrotate moves a brick's (or a mount's) log away and sends SIGHUP; the
/// process writes to a new file at the same path from then on, and goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_makes_a_brick_open_its_log_file_again() {
    let logs = tempfile::tempdir().unwrap();
    let path = logs.path().join("bricks.log");
    let c = Cluster::start_with(3, &["--log-file", path.to_str().unwrap()]);
    let vol = c.create_volume("www", 1 << 20).await;
    let logged = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    assert!(
        logged(&path).contains("metadata group"),
        "the bricks did not log to --log-file: {}",
        logged(&path)
    );
    let rotated = logs.path().join("bricks.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    for b in &c.bricks {
        b.hangup();
    }
    wait_for("a new log file with the reopening line", DEADLINE, || {
        let text = logged(&path);
        async move { (text.matches("log file reopened (SIGHUP)").count() == 3).then_some(()) }
    })
    .await;
    // The old file got nothing after the signal; every brick still serves.
    assert!(!logged(&rotated).contains("reopened"));
    vol.create(ROOT_INODE, b"after-rotation", 0o644, 0, 0)
        .await
        .unwrap();
    for (i, s) in c.statuses().await.iter().enumerate() {
        assert!(s.is_some(), "brick {i} stopped answering after SIGHUP");
    }

    let m = c.mount("www", "m", "").await;
    let rotated = m.log.with_extension("log.1");
    std::fs::rename(&m.log, &rotated).unwrap();
    m.hangup();
    wait_for("the mount's new log file", DEADLINE, || {
        let text = logged(&m.log);
        async move { text.contains("log file reopened (SIGHUP)").then_some(()) }
    })
    .await;
    std::fs::write(m.path.join("after-rotation.txt"), b"still mounted").unwrap();
    assert_eq!(
        std::fs::read(m.path.join("after-rotation.txt")).unwrap(),
        b"still mounted"
    );
}

/// A process this test started, killed when dropped (even on a failed assertion).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Issue 23, services: every unit shipped in scripts/systemd passes `systemd-analyze verify`
/// (instances named, in a root holding the installed binaries), without a warning.
#[test]
fn every_shipped_unit_passes_systemd_analyze_verify() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let units = r.join("etc/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::create_dir_all(r.join("usr/local/bin")).unwrap();
    std::fs::create_dir_all(r.join("lib/systemd")).unwrap();
    // systemd's own units (targets the shipped ones name), as the machine has them.
    let out = std::process::Command::new("cp")
        .args(["-a", "/lib/systemd/system"])
        .arg(r.join("lib/systemd/system"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for b in ["mortar", "mortar-brick", "mortar-mount"] {
        let to = r.join("usr/local/bin").join(b);
        std::fs::hard_link(mortar_tests::bin(b), &to)
            .or_else(|_| std::fs::copy(mortar_tests::bin(b), &to).map(|_| ()))
            .unwrap();
    }
    let mut names = Vec::new();
    for e in std::fs::read_dir(repo().join("scripts/systemd")).unwrap() {
        let p = e.unwrap().path();
        let file = p.file_name().unwrap().to_str().unwrap().to_string();
        std::fs::copy(&p, units.join(&file)).unwrap();
        names.push(file.replace("@.", "@www."));
    }
    names.sort();
    for want in [
        "mortar-brick@www.service",
        "mortar-heal@www.timer",
        "srv-www.mount",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} not shipped: {names:?}"
        );
    }
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", r.display()))
        .args(&names)
        .output()
        .expect("systemd-analyze (Debian's systemd, installed by scripts/test.sh)");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "{names:?}: {said}"
    );
}

/// Issue 23, services and config files: a brick started as mortar-brick@.service's ExecStart
/// line says, from a TOML file holding every setting, tells systemd it is ready (Type=notify)
/// and serves its replica set; a bad file is refused naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brick_runs_from_its_config_file_as_its_unit_starts_it() {
    let mut c = Cluster::start(3);
    let vol = c.create_volume("www", 1 << 20).await;
    c.bricks[0].stop();
    let b = &c.bricks[0];
    let conf = c.dir.path().join("brick-b0.toml");
    let settings = format!(
        "data = {:?}\nlisten = {:?}\ncert = {:?}\nkey = {:?}\nca = {:?}\nreserve = \"1%\"\nlog-file = {:?}\n",
        b.data, b.addr, b.cert, b.key, b.ca, b.log
    );
    std::fs::write(&conf, &settings).unwrap();
    let unit =
        std::fs::read_to_string(repo().join("scripts/systemd/mortar-brick@.service")).unwrap();
    let exec: Vec<&str> = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line")
        .split_whitespace()
        .collect();
    assert_eq!(
        exec,
        [
            "/usr/local/bin/mortar-brick",
            "--config",
            "/etc/mortar/brick-%i.toml"
        ]
    );
    let notify = c.dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let brick = Killed(
        std::process::Command::new(mortar_tests::bin("mortar-brick"))
            .args([exec[1], conf.to_str().unwrap()])
            .env("NOTIFY_SOCKET", &notify)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut said = [0u8; 256];
    let n = socket
        .recv(&mut said)
        .expect("the brick's readiness notification");
    let said = String::from_utf8_lossy(&said[..n]);
    assert!(said.contains("READY=1"), "{said}");
    c.wait_up(0).await;
    vol.create(ROOT_INODE, b"from-config", 0o644, 0, 0)
        .await
        .unwrap();
    let statuses = c.statuses().await;
    assert!(statuses.iter().all(Option::is_some), "{statuses:?}");
    assert!(
        std::fs::read_to_string(&b.log)
            .unwrap()
            .contains("brick serving"),
        "the brick did not log to the config's log-file"
    );
    drop(brick);

    // Bad files: one line naming the key, a non-zero exit.
    for (text, says) in [
        (format!("{settings}bogus = 1\n"), "bogus"),
        ("listen = \"nowhere\"\n".to_string(), "listen"),
        (
            format!("{settings}snapshot-every = 2\n"),
            "snapshot-every: 2 is below",
        ),
    ] {
        std::fs::write(&conf, &text).unwrap();
        let out = std::process::Command::new(mortar_tests::bin("mortar-brick"))
            .args(["--config", conf.to_str().unwrap(), "--log-file", "-"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{text}: {err}");
        assert!(
            err.contains(says) && !err.contains("panicked"),
            "{text}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_valid_prometheus_text_that_follows_writes_and_a_frozen_follower() {
    let metrics_at = |i: usize, ip: &str| format!("{ip}:{}", 9101 + i);
    let c = Cluster::start_each(
        3,
        |i, ip| vec!["--metrics".into(), metrics_at(i, ip)],
        &[],
        |_| None,
    );
    let ip = c.ip.clone();
    let brick_metrics: Vec<String> = (0..3).map(|i| metrics_at(i, &ip)).collect();
    let vol = c.create_volume("www", 1 << 20).await;
    let mount_metrics = format!("{ip}:9200");
    let m = c
        .mount("www", "m", &format!("metrics={mount_metrics}"))
        .await;

    let statuses: Vec<_> = c.statuses().await.into_iter().map(Option::unwrap).collect();
    let before: Vec<_> = brick_metrics.iter().map(|a| scrape(a)).collect();
    let leaders: f64 = before
        .iter()
        .map(|s| sum(s, "mortar_brick_raft_role", "role=\"leader\""))
        .sum();
    assert_eq!(leaders, 1.0, "exactly one brick says it leads");
    for (s, st) in before.iter().zip(&statuses) {
        assert_eq!(sum(s, "mortar_brick_raft_term", ""), st.term as f64);
        assert!(sum(s, "mortar_brick_raft_applied_index", "") > 0.0);
    }
    let mount_before = scrape(&mount_metrics);

    // Writes through the mount move the mount's and the bricks' counters.
    let files = 20;
    let size = 300 * 1024;
    // Distinct bodies: chunks are stored by content, so equal files would share one.
    let body = |i: usize| vec![i as u8; size];
    for i in 0..files {
        std::fs::write(m.path.join(format!("f{i}")), body(i)).unwrap();
    }
    for _ in 0..2 {
        for i in 0..files {
            assert_eq!(
                std::fs::read(m.path.join(format!("f{i}"))).unwrap(),
                body(i)
            );
        }
    }
    assert!(std::fs::metadata(m.path.join("no-such-file")).is_err());
    assert!(matches!(
        vol.lookup(ROOT_INODE, b"not-here-either").await,
        Err(FsError::NotFound)
    ));
    let after: Vec<_> = brick_metrics.iter().map(|a| scrape(a)).collect();
    let puts = |all: &[std::collections::BTreeMap<String, f64>]| -> f64 {
        all.iter()
            .map(|s| sum(s, "mortar_brick_requests_total", "op=\"put_chunk\""))
            .sum()
    };
    assert!(
        puts(&after) - puts(&before) >= files as f64,
        "put_chunk requests moved from {} to {}",
        puts(&before),
        puts(&after)
    );
    for (b, s) in after.iter().enumerate() {
        assert!(
            sum(s, "mortar_brick_chunks", "") >= files as f64,
            "brick {b} counts fewer chunks than files written"
        );
        assert!(
            sum(
                s,
                "mortar_brick_peer_received_bytes_total",
                "peer=\"client\""
            ) > 0.0
        );
        assert_eq!(
            sum(
                s,
                "mortar_brick_request_duration_seconds_count",
                "op=\"put_chunk\""
            ),
            sum(s, "mortar_brick_requests_total", "op=\"put_chunk\"")
        );
    }
    let enoent = |all: &[std::collections::BTreeMap<String, f64>]| -> f64 {
        all.iter()
            .map(|s| sum(s, "mortar_brick_errors_total", "errno=\"ENOENT\""))
            .sum()
    };
    assert!(
        enoent(&after) > enoent(&before),
        "no brick counted the failed lookup"
    );
    let mount_after = scrape(&mount_metrics);
    let moved = |name: &str, labels: &str| {
        sum(&mount_after, name, labels) - sum(&mount_before, name, labels)
    };
    assert!(moved("mortar_mount_requests_total", "op=\"create\"") >= files as f64);
    assert!(moved("mortar_mount_requests_total", "op=\"write\"") >= files as f64);
    assert!(moved("mortar_mount_errors_total", "errno=\"ENOENT\"") >= 1.0);
    assert!(moved("mortar_mount_cache_hits_total", "cache=\"chunk\"") >= files as f64);
    assert!(
        moved("mortar_mount_peer_sent_bytes_total", "") >= (files * size) as f64,
        "the mount's bytes to the bricks do not cover what it wrote"
    );

    // A frozen follower shows on the leader as entries behind, for seconds.
    let leader = statuses
        .iter()
        .position(|s| s.raft_role == "leader")
        .unwrap();
    let follower = (0..3).find(|&i| i != leader).unwrap();
    let label = format!("follower=\"{}\"", statuses[follower].id);
    c.bricks[follower].freeze();
    for i in 0..30 {
        std::fs::create_dir(m.path.join(format!("d{i}"))).unwrap();
    }
    let behind = wait_for(
        "the leader's metrics to show the frozen follower",
        DEADLINE,
        || {
            let s = scrape(&brick_metrics[leader]);
            let entries = sum(&s, "mortar_brick_raft_follower_behind_entries", &label);
            let secs = sum(&s, "mortar_brick_raft_follower_behind_seconds", &label);
            async move { (entries > 0.0 && secs >= 1.0).then_some((entries, secs)) }
        },
    )
    .await;
    eprintln!(
        "frozen follower: {} entries behind for {:.1} s",
        behind.0, behind.1
    );
    c.bricks[follower].thaw();
    wait_for(
        "the thawed follower to catch up in the metrics",
        DEADLINE,
        || {
            let s = scrape(&brick_metrics[leader]);
            let entries = sum(&s, "mortar_brick_raft_follower_behind_entries", &label);
            async move { (entries == 0.0).then_some(()) }
        },
    )
    .await;

    // docs/metrics.md lists every family served, and the Grafana dashboard asks only for
    // families that exist.
    let served: BTreeSet<String> = after
        .iter()
        .chain([&mount_after])
        .flat_map(|s| s.keys().filter_map(|k| k.strip_prefix("# ")))
        .map(str::to_string)
        .collect();
    assert!(
        served.len() > 20,
        "only {} families: {served:?}",
        served.len()
    );
    let doc = std::fs::read_to_string(repo().join("docs/metrics.md")).unwrap();
    for family in &served {
        let short = family
            .strip_prefix("mortar_brick_")
            .or_else(|| family.strip_prefix("mortar_mount_"))
            .unwrap_or_else(|| panic!("{family} is not named mortar_brick_ or mortar_mount_"));
        assert!(
            doc.contains(&format!("`{short}`")),
            "docs/metrics.md does not list {family}"
        );
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("docs/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut asked = Vec::new();
    fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                        _ => exprs(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
            _ => {}
        }
    }
    exprs(&dashboard, &mut asked);
    assert!(
        asked.len() >= 10,
        "the dashboard has {} queries",
        asked.len()
    );
    for e in &asked {
        for word in e.split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_')) {
            if word.starts_with("mortar_") {
                let family = word.strip_suffix("_bucket").unwrap_or(word);
                assert!(
                    served.contains(family),
                    "the dashboard asks for {family}: {e}"
                );
            }
        }
    }

    // Anything but GET /metrics is refused; a taken metrics address stops a brick at once.
    let code = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://{}/other", brick_metrics[0]))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&code.stdout), "404");
    let b = &c.bricks[0];
    let taken = std::process::Command::new(mortar_tests::bin("mortar-brick"))
        .args(["--data", c.dir.path().join("spare").to_str().unwrap()])
        .args(["--listen", &format!("{ip}:7099")])
        .args([
            "--cert",
            b.cert.to_str().unwrap(),
            "--key",
            b.key.to_str().unwrap(),
        ])
        .args(["--ca", b.ca.to_str().unwrap(), "--log-file", "-"])
        .args(["--metrics", &brick_metrics[1]])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&taken.stderr);
    assert!(!taken.status.success());
    assert!(
        said.contains(&format!("cannot serve metrics on {}", brick_metrics[1])),
        "{said}"
    );
}

/// Issue 23, acceptance 4 (delete): refused while the volume is started or unconfirmed; a
/// stopped volume's bricks are released, stop, start empty, and take a new volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_delete_is_refused_while_started_and_frees_the_bricks_of_a_stopped_volume() {
    let mut c = Cluster::start(3);
    c.create_volume("www", 1 << 20).await;
    {
        let m = c.mount("www", "m", "").await;
        std::fs::write(m.path.join("old.html"), b"the old volume").unwrap();
    }
    let run = c.volume_cli("delete", &["--yes"]);
    assert_ne!(run.code, 0);
    assert!(
        run.out
            .contains("www is started: stop it first (mortar volume stop www)"),
        "{}",
        run.out
    );
    assert_eq!(c.volume_cli("stop", &[]).code, 0);
    // The CLI's standard input is empty here: no "y", so nothing happens.
    let run = c.volume_cli("delete", &[]);
    assert_ne!(run.code, 0);
    assert!(
        run.out.contains("not confirmed; nothing changed"),
        "{}",
        run.out
    );
    for b in &mut c.bricks {
        assert!(b.is_running(), "brick {} stopped without a delete", b.index);
    }
    assert!(c.volume_cli("info", &[]).out.contains("Status: Stopped"));

    let run = c.volume_cli("delete", &["--yes"]);
    assert_eq!(run.code, 0, "{}", run.out);
    assert!(
        run.out.contains("volume delete: www: success"),
        "{}",
        run.out
    );
    for i in 0..c.bricks.len() {
        let status = wait_for("the released brick to stop", DEADLINE, || {
            let status = c.bricks[i].exited();
            async move { status }
        })
        .await;
        assert!(status.success(), "brick {i} ended with {status}");
        c.bricks[i].start();
    }
    wait_for("the bricks to erase their data", DEADLINE, || {
        let erased = (0..3).all(|i| c.log_contains(i, "erased the data of deleted volume"));
        async move { erased.then_some(()) }
    })
    .await;

    let vol = c.create_volume("www2", 1 << 20).await;
    let root = vol.readdir_all(ROOT_INODE).await.unwrap();
    assert!(
        root.iter().all(|e| e.name != b"old.html"),
        "the new volume holds the old one's file"
    );
    let m = c.mount("www2", "m2", "").await;
    std::fs::write(m.path.join("new.html"), b"the new volume").unwrap();
    assert!(!m.path.join("old.html").exists());
}

/// Issue 23, acceptance 5 (brick certificates): a brick's certificate can neither create nor
/// change a volume, through the CLI or by a request sent straight to the leader or to a
/// follower; an admin's change sent to a follower reaches the leader by the follower's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brick_certificate_cannot_create_or_change_a_volume() {
    use mortar_tests::mortar_proto::wire::{AdminRequest, MetaOp};
    let mut c = Cluster::start(3);
    let vol = c.create_volume("www", 1 << 20).await;
    let spares: Vec<String> = (0..3)
        .map(|_| {
            let i = c.add_brick();
            c.bricks[i].addr.clone()
        })
        .collect();
    let members = c.addrs()[..3].join(",");
    let as_brick = |args: &[&str]| {
        let out = c
            .cli_command(args)
            .env("MORTAR_CERT", &c.bricks[0].cert)
            .env("MORTAR_KEY", &c.bricks[0].key)
            .output()
            .expect("run mortar");
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        eprintln!("$ mortar {} (brick certificate)\n{said}", args.join(" "));
        assert!(!out.status.success(), "a brick certificate did: {args:?}");
        assert!(
            said.contains("a brick certificate may not do this"),
            "{said}"
        );
    };
    let mut create = vec!["volume", "create", "other", "replica", "3"];
    create.extend(spares.iter().map(String::as_str));
    as_brick(&create);
    as_brick(&[
        "volume",
        "set",
        "www",
        "cache.attr-timeout",
        "5",
        "--bricks",
        &members,
    ]);
    as_brick(&["volume", "stop", "www", "--bricks", &members]);
    as_brick(&["snapshot", "create", "www", "s1", "--bricks", &members]);

    // The same requests sent straight to the leader and to a follower.
    let leader = c.leader_index().await;
    let follower = (leader + 1) % 3;
    let brick_pool = mortar_tests::mortar_proto::transport::Pool::new(
        mortar_tests::mortar_proto::transport::client_endpoint(
            &c.certs.identity(Role::Brick, "brick0"),
        )
        .unwrap(),
    );
    let set = Request::Meta {
        op: MetaOp::SetOption {
            key: "cache.attr-timeout".into(),
            value: Some("5".into()),
        },
        once: None,
    };
    let add = Request::Admin(AdminRequest::AddBrick {
        bricks: spares.clone(),
    });
    let wait = std::time::Duration::from_secs(10);
    for i in [leader, follower] {
        for req in [&set, &add] {
            let r = brick_pool.call(&c.addrs()[i], req, wait).await.unwrap();
            assert!(
                matches!(&r, Err(FsError::NotPermitted(m)) if m.contains("a brick certificate may not do this")),
                "brick {i} answered a brick certificate's {req:?} with {r:?}"
            );
        }
    }
    // Nothing changed.
    let config = vol.refresh_config().await.unwrap();
    assert!(config.options.0.is_empty(), "{:?}", config.options);
    assert!(!config.stopped);
    assert_eq!(config.bricks().count(), 3);
    for spare in &spares {
        let h = volume_admin::hello(&c.admin_pool(), spare).await.unwrap();
        assert_eq!(h.volume, None, "spare {spare} joined a volume");
    }
    assert!(!c.snapshot_cli("list", &[]).out.contains("s1"));

    // An admin's change sent to a follower: the follower names the leader instead of carrying
    // it under its own certificate, and the CLI asks the leader.
    let r = c
        .admin_pool()
        .call(&c.addrs()[follower], &set, wait)
        .await
        .unwrap();
    match r {
        Ok(Reply::Meta {
            result: Err(FsError::NotLeader(addr)),
            ..
        }) => assert_eq!(addr, c.addrs()[leader]),
        other => panic!("the follower answered {other:?}"),
    }
    let out = c.cli(&[
        "volume",
        "set",
        "www",
        "cache.attr-timeout",
        "5",
        "--bricks",
        &c.addrs()[follower],
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = vol.refresh_config().await.unwrap();
    assert_eq!(
        config
            .options
            .0
            .get("cache.attr-timeout")
            .map(String::as_str),
        Some("5")
    );
}

/// What `scripts/install.sh` puts on the machine, relative to `/`.
const INSTALLED: &[&str] = &[
    "usr/local/bin/mortar",
    "usr/local/bin/mortar-brick",
    "usr/local/bin/mortar-mount",
    "sbin/mount.mortar",
    "etc/systemd/system/mortar-brick@.service",
    "etc/systemd/system/mortar-heal@.service",
    "etc/systemd/system/mortar-heal@.timer",
    "etc/systemd/system/mortar-snapshot@.service",
    "etc/systemd/system/mortar-snapshot@.timer",
    "etc/logrotate.d/mortar",
    "usr/local/share/doc/mortar/examples/srv-www.mount",
    "usr/local/share/mortar/installed-files",
];

/// Runs `scripts/install.sh --uninstall` when dropped, so a failed test leaves nothing behind.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(repo().join("scripts/install.sh"))
            .arg("--uninstall")
            .output();
    }
}

/// Issue 23, acceptance 1: `scripts/install.sh` installs this build, the mount helper, the
/// units and the example configuration into the machine's root; three bricks started by the
/// installed unit's ExecStart line (as systemd would, `%i` the instance) from their
/// /etc/mortar/brick-NAME.toml serve a volume made with the installed CLI; `mount` of an
/// fstab line of type mortar mounts it through /sbin/mount.mortar; `--uninstall` removes
/// every installed file and keeps the administrator's configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_then_bricks_by_their_units_and_an_fstab_mount() {
    let run = |cmd: &mut std::process::Command| {
        let out = cmd.output().expect("run");
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{cmd:?}: {said}");
        said
    };
    let install = || {
        let mut cmd = std::process::Command::new("bash");
        cmd.arg(repo().join("scripts/install.sh"));
        cmd
    };
    let mut c = Cluster::start(3);
    let said = run(install().arg("--bin-dir").arg(mortar_tests::bin_dir()));
    let _installed = Installed;
    assert!(said.contains("installed mortar (mortar "), "{said}");
    let root = std::path::Path::new("/");
    for f in INSTALLED {
        assert!(root.join(f).exists(), "/{f} was not installed: {said}");
    }
    for b in ["mortar", "mortar-brick", "mortar-mount"] {
        assert_eq!(
            std::fs::read(root.join("usr/local/bin").join(b)).unwrap(),
            std::fs::read(mortar_tests::bin(b)).unwrap(),
            "/usr/local/bin/{b} is not the build under test"
        );
    }
    assert_eq!(
        std::fs::read_link("/sbin/mount.mortar").unwrap(),
        std::path::Path::new("/usr/local/bin/mortar-mount")
    );
    let verify = std::process::Command::new("systemd-analyze")
        .args([
            "verify",
            "mortar-brick@b1.service",
            "mortar-heal@www.timer",
            "mortar-snapshot@www.timer",
        ])
        .output()
        .expect("systemd-analyze");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // Each brick as systemd starts mortar-brick@NAME: the installed unit's ExecStart line with
    // %i replaced, reading /etc/mortar/brick-NAME.toml.
    let unit = std::fs::read_to_string("/etc/systemd/system/mortar-brick@.service").unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line")
        .to_string();
    let mut started = Vec::new();
    let mut configs = Vec::new();
    for i in 0..3 {
        c.bricks[i].stop();
        let b = &c.bricks[i];
        let name = format!("test{}-{i}", std::process::id());
        let conf = std::path::PathBuf::from(format!("/etc/mortar/brick-{name}.toml"));
        std::fs::write(
            &conf,
            format!(
                "data = {:?}\nlisten = {:?}\ncert = {:?}\nkey = {:?}\nca = {:?}\nlog-file = {:?}\n",
                b.data, b.addr, b.cert, b.key, b.ca, b.log
            ),
        )
        .unwrap();
        configs.push(conf);
        let argv: Vec<String> = exec
            .replace("%i", &name)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        started.push(Killed(
            std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        ));
    }
    for i in 0..3 {
        c.wait_up(i).await;
    }
    let (cert, key) = c.certs.issue(Role::Admin, "admin");
    let mut create = std::process::Command::new("/usr/local/bin/mortar");
    create
        .args(["volume", "create", "www", "replica", "3"])
        .args(c.addrs())
        .env("MORTAR_CERT", &cert)
        .env("MORTAR_KEY", &key)
        .env("MORTAR_CA", c.certs.ca());
    run(&mut create);

    // An fstab line, mounted by mount(8) through /sbin/mount.mortar.
    let mnt = c.dir.path().join("www");
    std::fs::create_dir(&mnt).unwrap();
    let fstab = c.dir.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "{}  {}  mortar  _netdev,defaults,{}  0  0\n",
            c.source("www"),
            mnt.display(),
            c.mount_options("fstab")
        ),
    )
    .unwrap();
    run(std::process::Command::new("mount")
        .arg("-T")
        .arg(&fstab)
        .arg(&mnt));
    let fstab_mount = mortar_tests::Mount::daemonised(mnt.clone(), c.dir.path().join("fstab.log"));
    assert!(mortar_tests::is_mounted(&mnt));
    std::fs::write(mnt.join("index.html"), b"installed").unwrap();
    let m = c.mount("www", "check", "").await;
    assert_eq!(
        std::fs::read(m.path.join("index.html")).unwrap(),
        b"installed"
    );
    drop(m);
    drop(fstab_mount);
    drop(started);

    let said = run(install().arg("--uninstall"));
    for f in INSTALLED {
        assert!(
            !root.join(f).exists() && root.join(f).symlink_metadata().is_err(),
            "/{f} is left after --uninstall: {said}"
        );
    }
    for conf in &configs {
        assert!(
            conf.exists(),
            "--uninstall removed the administrator's {conf:?}"
        );
        std::fs::remove_file(conf).unwrap();
    }
    let _ = std::fs::remove_dir("/etc/mortar");
}
