//! Coherent client caches (issue "Mount a volume as a web document root"): a client holding
//! the leader's lease answers lookups, getattr and inode reads from memory, and a change made
//! through another client is acknowledged only once no cache can serve the old state — also
//! across a change of leader, and when a watcher stops answering.

use mortar_tests::mortar_client::Volume;
use mortar_tests::mortar_proto::tls::Role;
use mortar_tests::mortar_proto::transport::{client_endpoint, Pool};
use mortar_tests::mortar_proto::wire::{
    read_frame, write_frame, Reply, Request, SetAttr, WatchDown, WatchUp, XattrMode,
};
use mortar_tests::mortar_proto::{FsError, InodeId, ROOT_INODE};
use mortar_tests::{wait_for, Cluster, Mount, DEADLINE};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHUNK: u32 = 64 * 1024;

/// A client with a live watch, once its lease is held.
async fn watching(c: &Cluster) -> Arc<Volume> {
    let v = Arc::new(c.client("www").await);
    v.start_watch();
    wait_until_caching(&v).await;
    v
}

async fn wait_until_caching(v: &Arc<Volume>) {
    wait_for("the client to hold a lease", DEADLINE, || {
        let v = v.clone();
        async move { v.caching().then_some(()) }
    })
    .await;
}

fn chmod(mode: u32) -> SetAttr {
    SetAttr {
        perm: Some(mode),
        ..SetAttr::default()
    }
}

/// Every way `reader` can see `ino` under `name` in the root agrees with `perm` and `body`.
async fn sees(reader: &Volume, name: &[u8], ino: InodeId, perm: u32, body: &[u8]) {
    assert_eq!(reader.getattr(ino).await.unwrap().perm, perm);
    assert_eq!(reader.lookup(ROOT_INODE, name).await.unwrap().perm, perm);
    assert_eq!(reader.read(ino, 0, 1 << 20).await.unwrap(), body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_reads_stay_current_across_clients_and_a_leader_change() {
    let mut c = Cluster::start(3);
    c.create_volume("www", CHUNK).await;
    let a = watching(&c).await;
    let b = watching(&c).await;

    let f = b
        .create(ROOT_INODE, b"page.html", 0o644, 0, 0)
        .await
        .unwrap();
    b.write(f.ino, 0, b"version 1", false).await.unwrap();
    sees(&a, b"page.html", f.ino, 0o644, b"version 1").await;

    // Reads come from memory: 300 of them cost at most the few that a lease renewal arriving
    // late on a busy machine sends to the leader, not one each.
    let before = a.meta_requests();
    for _ in 0..100 {
        sees(&a, b"page.html", f.ino, 0o644, b"version 1").await;
    }
    let sent = a.meta_requests() - before;
    assert!(sent < 30, "{sent} namespace requests for 300 cached reads");

    // A change hands its maker the directory it modified as it is now (the kernel looks at the
    // parent after each create): 20 creates, each followed by a look at the parent, cost about
    // 20 requests, not 40. The parent B keeps is the one A reads after the invalidation.
    let before = b.meta_requests();
    for i in 0..20 {
        b.create(ROOT_INODE, format!("made{i}").as_bytes(), 0o644, 0, 0)
            .await
            .unwrap();
        let dir = b.getattr(ROOT_INODE).await.unwrap();
        assert_eq!(dir, a.getattr(ROOT_INODE).await.unwrap());
    }
    let sent = b.meta_requests() - before;
    assert!(sent < 30, "{sent} namespace requests for 20 creates");

    // B made this directory, so it knows its xattrs: removing one that is not there is refused
    // from memory (`cp -a` removes a default ACL that is never there). Once A adds it, B's
    // removal goes through.
    let d = b.mkdir(ROOT_INODE, b"dir", 0o755, 0, 0).await.unwrap();
    let before = b.meta_requests();
    for _ in 0..20 {
        assert!(matches!(
            b.removexattr(d.ino, b"user.tag").await,
            Err(FsError::NoXattr)
        ));
    }
    let sent = b.meta_requests() - before;
    assert!(
        sent < 10,
        "{sent} namespace requests for 20 refused removals"
    );
    a.setxattr(d.ino, b"user.tag", b"x", XattrMode::Any)
        .await
        .unwrap();
    b.removexattr(d.ino, b"user.tag").await.unwrap();
    assert!(matches!(
        a.getxattr(d.ino, b"user.tag").await,
        Err(FsError::NoXattr)
    ));

    // A name known not to exist is remembered too, until someone creates it.
    assert!(matches!(
        a.lookup(ROOT_INODE, b"new.html").await,
        Err(FsError::NotFound)
    ));
    let n = b
        .create(ROOT_INODE, b"new.html", 0o600, 0, 0)
        .await
        .unwrap();
    assert_eq!(a.lookup(ROOT_INODE, b"new.html").await.unwrap().ino, n.ino);

    // Each change by B is visible to A the moment B's call returns.
    b.setattr(f.ino, chmod(0o640)).await.unwrap();
    sees(&a, b"page.html", f.ino, 0o640, b"version 1").await;
    b.write(f.ino, 0, b"version 2, longer", false)
        .await
        .unwrap();
    sees(&a, b"page.html", f.ino, 0o640, b"version 2, longer").await;
    b.rename(ROOT_INODE, b"page.html", ROOT_INODE, b"moved.html", 0)
        .await
        .unwrap();
    assert!(matches!(
        a.lookup(ROOT_INODE, b"page.html").await,
        Err(FsError::NotFound)
    ));
    sees(&a, b"moved.html", f.ino, 0o640, b"version 2, longer").await;

    // Kill the leader. B's next change goes through the new leader, which answers it only
    // after the old leader's leases ran out; A never serves the old state.
    let leader = c.leader_index().await;
    c.bricks[leader].kill();
    b.setattr(f.ino, chmod(0o604)).await.unwrap();
    sees(&a, b"moved.html", f.ino, 0o604, b"version 2, longer").await;
    // Both watch the new leader and cache again, and stay current.
    wait_until_caching(&a).await;
    wait_until_caching(&b).await;
    sees(&a, b"moved.html", f.ino, 0o604, b"version 2, longer").await;
    b.write(f.ino, 0, b"version 3", false).await.unwrap();
    b.truncate(f.ino, 9).await.unwrap();
    sees(&a, b"moved.html", f.ino, 0o604, b"version 3").await;
    b.unlink(ROOT_INODE, b"moved.html").await.unwrap();
    assert!(matches!(
        a.lookup(ROOT_INODE, b"moved.html").await,
        Err(FsError::NotFound)
    ));
    c.bricks[leader].start();
}

/// Ask `leader` directly for a delegation of `dir` to `client`.
async fn delegate(pool: &Pool, leader: &str, client: u128, dir: InodeId) -> Result<(), FsError> {
    let request = Request::Delegate { client, dir };
    match pool
        .call(leader, &request, std::time::Duration::from_secs(5))
        .await
        .unwrap()
    {
        Ok(Reply::Meta { result, .. }) => result.map(|_| ()),
        Ok(other) => panic!("unexpected {other:?}"),
        Err(e) => Err(e),
    }
}

/// A raw watch on the leader as client 42, holding one lease, that will acknowledge nothing:
/// a frozen or cut-off client. Returns its pool, the leader's address and the stream.
async fn silent_watch(c: &Cluster) -> (Pool, String, quinn::SendStream, quinn::RecvStream) {
    let leader = c.addrs()[c.leader_index().await].clone();
    let pool = Pool::new(client_endpoint(&c.certs.identity(Role::Client, "silent")).unwrap());
    let conn = pool.connection(&leader).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(&mut send, &Request::Watch { client: 42 })
        .await
        .unwrap();
    assert!(matches!(
        read_frame::<WatchDown>(&mut recv).await.unwrap(),
        WatchDown::Welcome { .. }
    ));
    write_frame(&mut send, &WatchUp::Renew { n: 1 })
        .await
        .unwrap();
    assert!(matches!(
        read_frame::<WatchDown>(&mut recv).await.unwrap(),
        WatchDown::Renewed { n: 1 }
    ));
    (pool, leader, send, recv)
}

/// A watcher that holds a lease and then stops answering (a frozen or cut-off client) delays
/// changes only until its lease has run out (it is renewed no more); later changes do not wait
/// for it at all, and the leader eventually closes its watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_watcher_is_dropped_and_changes_go_on() {
    let c = Cluster::start(3);
    let v = c.create_volume("www", CHUNK).await;
    let reader = watching(&c).await;
    let f = v.create(ROOT_INODE, b"f", 0o644, 0, 0).await.unwrap();
    assert_eq!(reader.getattr(f.ino).await.unwrap().perm, 0o644);

    let (_pool, _leader, _send, mut recv) = silent_watch(&c).await;

    // From here on the silent watcher acknowledges nothing.
    v.setattr(f.ino, chmod(0o600)).await.unwrap();
    assert_eq!(reader.getattr(f.ino).await.unwrap().perm, 0o600);
    // The leader sent it the invalidation, renewed its lease no more, and closed its watch
    // once it had left it unacknowledged for long.
    let mut invalidations = 0;
    loop {
        match read_frame::<WatchDown>(&mut recv).await {
            Ok(WatchDown::Invalidate { .. }) => invalidations += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => break,
        }
    }
    assert_eq!(invalidations, 1);
    v.setattr(f.ino, chmod(0o640)).await.unwrap();
    assert_eq!(reader.getattr(f.ino).await.unwrap().perm, 0o640);
}

/// Only client certificates may watch; a brick refuses the request on an ordinary stream too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_needs_a_client_certificate() {
    let c = Cluster::start(3);
    c.create_volume("www", CHUNK).await;
    let leader = c.addrs()[c.leader_index().await].clone();
    let pool = c.admin_pool();
    let answer = pool
        .call(
            &leader,
            &Request::Watch { client: 7 },
            std::time::Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert!(
        matches!(answer, Err(FsError::NotPermitted(_))),
        "{answer:?}"
    );
}

/// A directory a client made is delegated to it at its first create: creates and changes
/// beneath it are answered from memory and committed in the background, and another client's
/// first look at the directory recalls the delegation, so it sees everything the maker did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_beneath_a_delegated_directory_are_recalled_before_another_client_looks() {
    let c = Cluster::start(3);
    c.create_volume("www", CHUNK).await;
    let a = watching(&c).await;
    let b = watching(&c).await;
    let site = a.mkdir(ROOT_INODE, b"site", 0o755, 0, 0).await.unwrap();
    // Nothing is committed in the background: only the recall can bring it to B.
    a.pause_background_commits(true);

    // 10 directories of 20 files, some inline, some spanning chunks, each chmod'ed and given
    // an xattr: 210 creates and 600 changes.
    let foreground = |v: &Volume| v.meta_requests() - v.delegated_batches();
    let before = foreground(&a);
    let mut made = Vec::new();
    for i in 0..10 {
        let sub = a
            .mkdir(site.ino, format!("sub{i}").as_bytes(), 0o750, 0, 0)
            .await
            .unwrap();
        for j in 0..20 {
            let name = format!("f{j}.php");
            let f = a
                .create(sub.ino, name.as_bytes(), 0o644, 0, 0)
                .await
                .unwrap();
            let len = if j % 5 == 0 {
                3 * CHUNK as usize + 17
            } else {
                100 + j * 7
            };
            let body: Vec<u8> = (0..len).map(|k| (k * 31 + i * 7 + j) as u8).collect();
            a.write(f.ino, 0, &body, false).await.unwrap();
            a.setattr(f.ino, chmod(0o640)).await.unwrap();
            a.setxattr(f.ino, b"user.n", name.as_bytes(), XattrMode::Any)
                .await
                .unwrap();
            // The maker sees its own changes at once, data included.
            assert_eq!(a.getattr(f.ino).await.unwrap().perm, 0o640);
            assert_eq!(a.read(f.ino, 0, 1 << 20).await.unwrap(), body);
            made.push((i, name, f.ino, body));
        }
    }
    // Only the delegation and the inode numbers were asked for; everything else is held, and
    // the chunks of the larger files went up behind the writer.
    let sent = foreground(&a) - before;
    assert_eq!(a.delegated_batches(), 0);
    // (40 files of 4 chunks; the first three of a file have the same bytes, and one still
    // waiting for its upload is not queued twice.)
    let behind = a.chunks_uploaded_behind();
    assert!(
        (40 * 2..=40 * 4).contains(&behind),
        "{behind} chunks uploaded behind the writer"
    );
    assert!(
        sent < 10,
        "{sent} foreground namespace requests for 210 creates and 600 changes"
    );

    // B's first lookup in the directory recalls the delegation: every file is there, whole.
    for (i, name, ino, body) in &made {
        let sub = b
            .lookup(site.ino, format!("sub{i}").as_bytes())
            .await
            .unwrap();
        assert_eq!(sub.perm, 0o750);
        let f = b.lookup(sub.ino, name.as_bytes()).await.unwrap();
        assert_eq!((f.ino, f.perm, f.size), (*ino, 0o640, body.len() as u64));
        assert_eq!(b.read(*ino, 0, 1 << 20).await.unwrap(), *body);
        assert_eq!(b.getxattr(*ino, b"user.n").await.unwrap(), name.as_bytes());
    }
    assert_eq!(b.readdir_all(site.ino).await.unwrap().len(), 10);
    // Each file's content, chmod and xattr were made in a row: they went as one change.
    let committed = a.delegated_changes();
    assert!(
        (1..=210 + 200).contains(&committed),
        "{committed} changes committed for 210 creates and 600 changes of 200 files"
    );

    // The delegation is given back: A's next change commits before it returns, and B sees it.
    let before = foreground(&a);
    let late = a.create(site.ino, b"late", 0o600, 0, 0).await.unwrap();
    assert!(
        foreground(&a) > before,
        "a create after the recall went to the leader"
    );
    assert_eq!(b.lookup(site.ino, b"late").await.unwrap().ino, late.ino);
}

/// Changes held under a delegation are not lost when the leader dies before or while they are
/// committed: the client commits them through the new leader (the same batch again, applied
/// once), and another client sees them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_changes_survive_the_leaders_death() {
    let mut c = Cluster::start(3);
    c.create_volume("www", CHUNK).await;
    let a = watching(&c).await;
    let dir = a.mkdir(ROOT_INODE, b"up", 0o755, 0, 0).await.unwrap();
    let mut inos = Vec::new();
    for i in 0..100 {
        let f = a
            .create(dir.ino, format!("{i}").as_bytes(), 0o644, 0, 0)
            .await
            .unwrap();
        a.write(f.ino, 0, format!("body {i}").as_bytes(), false)
            .await
            .unwrap();
        inos.push(f.ino);
    }
    let leader = c.leader_index().await;
    c.bricks[leader].kill();
    // A later create still works (through the new leader once the lease is gone), and what
    // A holds reaches the new leader: commit_held (fsync, fsyncdir) returns once it has.
    let more = a.create(dir.ino, b"more", 0o644, 0, 0).await.unwrap();
    a.commit_held().await.unwrap();

    let b = watching(&c).await;
    for (i, ino) in inos.iter().enumerate() {
        let f = b.lookup(dir.ino, format!("{i}").as_bytes()).await.unwrap();
        assert_eq!(f.ino, *ino);
        assert_eq!(
            b.read(*ino, 0, 100).await.unwrap(),
            format!("body {i}").as_bytes()
        );
    }
    assert_eq!(b.lookup(dir.ino, b"more").await.unwrap().ino, more.ino);
    c.bricks[leader].start();
}

/// The leader delegates only an empty directory, other than the root, to a client that holds
/// a lease, and only one client at a time; every refusal is EBUSY or ENOTDIR and grants nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegations_are_granted_only_where_they_are_safe() {
    let c = Cluster::start(3);
    c.create_volume("www", CHUNK).await;
    let a = watching(&c).await;
    let b = watching(&c).await;
    // Made by a client without a watch, so none of it is delegated yet.
    let plain = c.client("www").await;
    let full = plain.mkdir(ROOT_INODE, b"full", 0o755, 0, 0).await.unwrap();
    plain.create(full.ino, b"x", 0o644, 0, 0).await.unwrap();
    let empty = plain
        .mkdir(ROOT_INODE, b"empty", 0o755, 0, 0)
        .await
        .unwrap();
    let file = plain
        .create(ROOT_INODE, b"file", 0o644, 0, 0)
        .await
        .unwrap();
    let leader = c.addrs()[c.leader_index().await].clone();
    let pool = a.pool().clone();
    let ask = |client: u128, dir: InodeId| delegate(&pool, &leader, client, dir);
    let busy = |r: Result<(), FsError>| matches!(r, Err(FsError::Busy(_)));
    assert!(busy(ask(a.client_id(), ROOT_INODE).await), "the root");
    assert!(
        busy(ask(a.client_id(), full.ino).await),
        "a directory with an entry"
    );
    assert!(
        busy(ask(rand_id(), empty.ino).await),
        "a client without a lease"
    );
    assert_eq!(ask(a.client_id(), file.ino).await, Err(FsError::NotDir));
    ask(a.client_id(), empty.ino).await.unwrap();
    assert!(
        busy(ask(b.client_id(), empty.ino).await),
        "held by another client"
    );
    // B's create there recalls A's delegation first (A holds nothing), then lands.
    b.create(empty.ino, b"by-b", 0o644, 0, 0).await.unwrap();
    assert!(a.lookup(empty.ino, b"by-b").await.is_ok());
}

fn rand_id() -> u128 {
    rand::random()
}

/// A delegation holder that stops answering (frozen or cut off) holds up another client's
/// change in its directory only until the leader gives up on it: the leader closes the
/// holder's watch, waits out its lease, and answers the change; the directory is then an
/// ordinary one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_delegation_holder_is_given_up_on() {
    let c = Cluster::start(3);
    let v = c.create_volume("www", CHUNK).await;
    let dir = v.mkdir(ROOT_INODE, b"d", 0o755, 0, 0).await.unwrap();

    let (pool, leader, _send, mut recv) = silent_watch(&c).await;
    delegate(&pool, &leader, 42, dir.ino).await.unwrap();

    // From here on the holder answers nothing. A create there still succeeds.
    let f = v.create(dir.ino, b"f", 0o644, 0, 0).await.unwrap();
    assert_eq!(v.lookup(dir.ino, b"f").await.unwrap().ino, f.ino);
    // The holder was asked to give the directory back, then its watch was closed.
    let mut recalled = false;
    loop {
        match read_frame::<WatchDown>(&mut recv).await {
            Ok(WatchDown::Recall { dir: d, .. }) => recalled |= d == dir.ino,
            Ok(WatchDown::Renewed { .. } | WatchDown::Invalidate { .. }) => {}
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => break,
        }
    }
    assert!(recalled, "no recall reached the holder");
    // Later changes there do not wait for it at all: nobody holds the directory now.
    let again = delegate(&pool, &leader, 42, dir.ino).await;
    assert!(
        matches!(again, Err(FsError::Busy(_))),
        "a client whose watch was closed got a delegation: {again:?}"
    );
    v.create(dir.ino, b"g", 0o644, 0, 0).await.unwrap();
}

/// What the brick's request deadline is (`META_TIMEOUT` in brick-server/src/server.rs).
const REQUEST_DEADLINE: Duration = Duration::from_millis(1500);

/// Whether `path` exists, through a mount (ENOENT is an answer; anything else fails).
fn exists(path: &Path) -> bool {
    match std::fs::metadata(path) {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => panic!("stat {}: {e}", path.display()),
    }
}

/// A create whose commit outlives the request that proposed it (the bricks apply it late,
/// through a test hook) is still announced to every other mount when it is applied: the mount
/// that had looked the name up and cached "no such file" serves the file within 2 s of the
/// writer's return, and never the stale answer afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_committed_after_its_request_gave_up_reaches_every_mount() {
    // Longer than the request deadline, shorter than the two leases a watch survives without a
    // renewal (renewals wait for the apply): so a cache that is never told stays stale.
    let late = Duration::from_millis(1600);
    assert!(late > REQUEST_DEADLINE);
    let hook = format!("late.html:{}", late.as_millis());
    let c = Cluster::start_with_env(3, &[("MORTAR_TEST_SLOW_APPLY", &hook)]);
    c.create_volume("www", CHUNK).await;
    let writer = c.mount("www", "writer", "").await;
    let reader = c.mount("www", "reader", "").await;
    let seen = reader.path.join("late.html");
    assert!(!exists(&seen));
    // A second reader whose cache can be watched: it answers "no such name" from memory.
    let cached = watching(&c).await;
    let missing = |v: Arc<Volume>| async move {
        matches!(
            v.lookup(ROOT_INODE, b"late.html").await,
            Err(FsError::NotFound)
        )
    };
    assert!(missing(cached.clone()).await);
    let before = cached.meta_requests();
    for _ in 0..20 {
        assert!(missing(cached.clone()).await);
    }
    let asked = cached.meta_requests() - before;
    assert!(asked < 10, "{asked} requests for 20 cached lookups");

    let started = Instant::now();
    std::fs::write(writer.path.join("late.html"), b"deployed").unwrap();
    let wrote = started.elapsed();
    let returned = Instant::now();
    // The path under test was taken: the commit was applied after the request's deadline.
    assert!(
        wrote >= late,
        "the write took {wrote:?}: the hook did not delay it"
    );
    assert!(
        (0..3).any(|i| c.log_contains(i, "test hook: applying a create late")),
        "no brick applied the create late"
    );
    eprintln!("the write returned after {wrote:?}");
    let visible = wait_for("the reader to see the file", DEADLINE, || {
        let seen = seen.clone();
        async move { exists(&seen).then(|| returned.elapsed()) }
    })
    .await;
    let cached_visible = wait_for("the cached reader to see the file", DEADLINE, || {
        let v = cached.clone();
        async move { (!missing(v).await).then(|| returned.elapsed()) }
    })
    .await;
    eprintln!("the readers saw it {visible:?} and {cached_visible:?} after the writer returned");
    for v in [visible, cached_visible] {
        assert!(
            v < Duration::from_secs(2),
            "a reader served a stale 'no such file' for {v:?}"
        );
    }
    assert_eq!(std::fs::read(&seen).unwrap(), b"deployed");
    // And never the stale answer again.
    let watch_until = Instant::now() + 3 * REQUEST_DEADLINE;
    let mut looks = 0;
    while Instant::now() < watch_until {
        assert!(exists(&seen), "the reader went back to 'no such file'");
        assert!(
            !missing(cached.clone()).await,
            "the cached reader went back to 'no such name'"
        );
        looks += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(looks > 10);
}

/// One of three mounts frozen (SIGSTOP) for 30 s: creates through the other two wait for it
/// at most once, for what is left of its lease, and never after; thawed, it sees every file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_mount_does_not_slow_the_others() {
    let c = Cluster::start(3);
    c.create_volume("www", CHUNK).await;
    let writers = [
        c.mount("www", "one", "").await,
        c.mount("www", "two", "").await,
    ];
    let frozen = c.mount("www", "frozen", "").await;
    // Each mount looks at the root, so each caches it under a lease.
    for m in writers.iter().chain([&frozen]) {
        assert_eq!(std::fs::read_dir(&m.path).unwrap().count(), 0);
    }
    frozen.freeze();
    let until = Instant::now() + Duration::from_secs(30);
    let mut waits = Vec::new();
    while Instant::now() < until {
        let i = waits.len();
        let m: &Mount = &writers[i % 2];
        let t = Instant::now();
        // In the root, which no mount holds a delegation of: every create is a commit, and
        // the leader tells every other mount before it answers.
        std::fs::write(m.path.join(format!("f{i:05}")), b"x").unwrap();
        waits.push(t.elapsed());
    }
    frozen.thaw();
    let mut sorted = waits.clone();
    sorted.sort();
    let pct = |p: usize| sorted[(sorted.len() - 1) * p / 100];
    eprintln!(
        "{} creates with one mount frozen: p50 {:?}, p99 {:?}, max {:?}; over 50 ms: {}",
        sorted.len(),
        pct(50),
        pct(99),
        sorted.last().unwrap(),
        sorted
            .iter()
            .filter(|d| **d > Duration::from_millis(50))
            .count()
    );
    assert!(sorted.len() > 100, "only {} creates in 30 s", sorted.len());
    // The frozen mount's lease (1 s, renewed no more) is the longest anyone waited for it; a
    // busy machine adds the commit's own time.
    let lease = Duration::from_secs(1);
    assert!(
        *sorted.last().unwrap() < lease + Duration::from_secs(1),
        "a create waited {:?} for the frozen mount",
        sorted.last().unwrap()
    );
    // Thawed, it sees every file.
    let names = wait_for("the thawed mount to list every file", DEADLINE, || {
        let root = frozen.path.clone();
        let want = waits.len();
        async move {
            let n = std::fs::read_dir(&root).ok()?.count();
            (n == want).then_some(n)
        }
    })
    .await;
    assert_eq!(names, waits.len());
    for i in (0..waits.len()).step_by(97) {
        assert_eq!(
            std::fs::read(frozen.path.join(format!("f{i:05}"))).unwrap(),
            b"x"
        );
    }
}

/// A change shown to the application under a delegation that truly cannot commit — the same
/// name was made meanwhile by a request the leader did not recall the delegation for (a test
/// hook: a create sent under the holder's own client id) — fails the holder's next fsync of
/// the file and fsyncdir of the directory with EIO, once; the changes that could commit did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_change_that_cannot_commit_fails_fsync_with_eio() {
    let c = Cluster::start(3);
    c.create_volume("www", CHUNK).await;
    let a = watching(&c).await;
    a.pause_background_commits(true);
    let dir = a.mkdir(ROOT_INODE, b"up", 0o755, 0, 0).await.unwrap();
    let fine = a.create(dir.ino, b"fine", 0o644, 0, 0).await.unwrap();
    // The hook: "taken" made at the leader under A's own client id, so no recall reaches A.
    create_behind_the_holders_back(&c, a.client_id(), dir.ino, b"taken").await;
    // A still shows the name free and makes it from memory: the path under test.
    let batches = a.delegated_batches();
    let taken = a.create(dir.ino, b"taken", 0o644, 0, 0).await.unwrap();
    assert_eq!(a.delegated_batches(), batches, "the create was not held");
    a.write(taken.ino, 0, b"lost", false).await.unwrap();

    // fsync: everything held is sent; the batch is refused, the changes go one by one, and
    // the create of "taken" cannot commit.
    a.commit_held().await.unwrap();
    assert!(a.delegated_batches() > batches, "nothing was committed");
    assert!(matches!(a.lost_change(taken.ino), Err(FsError::Io(_))));
    assert!(matches!(a.lost_change(dir.ino), Err(FsError::Io(_))));
    // Reported once; the change that could commit is not reported, and another client sees it.
    assert_eq!(a.lost_change(taken.ino), Ok(()));
    assert_eq!(a.lost_change(fine.ino), Ok(()));
    let b = watching(&c).await;
    assert_eq!(b.lookup(dir.ino, b"fine").await.unwrap().ino, fine.ino);
    assert_ne!(b.lookup(dir.ino, b"taken").await.unwrap().ino, taken.ino);
}

/// A deploy: `rsync -a` of the WordPress tree into a new directory on one mount, then a reader
/// on a second mount fetches every file: all there with the right bytes. The time from
/// rsync's exit to the last file read is logged (the target is 1 s; asserted only as a
/// generous deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_on_one_mount_is_served_whole_by_another() {
    let src = Path::new("/usr/share/wordpress");
    assert!(
        src.exists(),
        "the wordpress package is missing: scripts/test.sh installs it"
    );
    let c = Cluster::start(3);
    // The chunk size `volume create` gives: a deploy as users run it.
    c.create_volume("www", mortar_tests::mortar_proto::DEFAULT_CHUNK_SIZE)
        .await;
    let writer = c.mount("www", "writer", "").await;
    let reader = c.mount("www", "reader", "").await;
    // The reader has looked at the docroot before the deploy (a web server running).
    assert_eq!(std::fs::read_dir(&reader.path).unwrap().count(), 0);

    let started = Instant::now();
    let rsync = std::process::Command::new("rsync")
        .arg("-a")
        .arg(format!("{}/", src.display()))
        .arg(writer.path.join("site"))
        .output()
        .expect("run rsync (installed by scripts/test.sh)");
    assert!(
        rsync.status.success(),
        "rsync: {}",
        String::from_utf8_lossy(&rsync.stderr)
    );
    let exited = Instant::now();
    let files = mortar_tests::tree::regular_files(src);
    assert!(
        files.len() > 1000,
        "only {} files in {}",
        files.len(),
        src.display()
    );
    let root = reader.path.join("site");
    let count = files.len();
    let (wrong, slowest, first) = tokio::task::spawn_blocking(move || {
        let mut slowest = (Duration::ZERO, String::new());
        let mut first = None;
        let wrong = files
            .into_iter()
            .filter(|rel| {
                let t = Instant::now();
                let got = std::fs::read(root.join(rel)).ok();
                first.get_or_insert(exited.elapsed());
                if t.elapsed() > slowest.0 {
                    slowest = (t.elapsed(), rel.display().to_string());
                }
                got != std::fs::read(src.join(rel)).ok()
            })
            .map(|rel| rel.display().to_string())
            .collect::<Vec<_>>();
        (wrong, slowest, first)
    })
    .await
    .unwrap();
    eprintln!(
        "the first file was read {first:?} after rsync exited; the slowest file to read was {} ({:?})",
        slowest.1, slowest.0
    );
    let served = exited.elapsed();
    eprintln!(
        "rsync took {:?}; the reader had all {count} files {served:?} after it exited",
        exited - started
    );
    // What a cold read of the tree costs anyway, for comparison: a fresh mount, long after.
    {
        let again = c.mount("www", "again", "").await;
        let root = again.path.join("site");
        let t = Instant::now();
        let n = tokio::task::spawn_blocking(move || {
            mortar_tests::tree::walk(&root)
                .into_iter()
                .filter(|p| std::fs::symlink_metadata(p).unwrap().file_type().is_file())
                .map(|p| std::fs::read(p).unwrap().len())
                .filter(|n| *n > 0)
                .count()
        })
        .await
        .unwrap();
        eprintln!(
            "a fresh mount read the tree ({n} non-empty files) in {:?}",
            t.elapsed()
        );
    }
    assert!(
        wrong.is_empty(),
        "{} of {count} files missing or different on the reader: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    assert!(served < DEADLINE, "the reader took {served:?}");
}

/// The leader dies while a client holds changes made under delegations of two directories (its
/// background commits stopped, so only a recall commits them): the new leader knows the
/// delegations from the log, and another client's first look at either directory waits for
/// the holder to watch again and commit. It sees every change the holder showed: no window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_changes_in_two_directories_are_seen_whole_right_after_the_leaders_death() {
    let mut c = Cluster::start(3);
    c.create_volume("www", CHUNK).await;
    let a = watching(&c).await;
    a.pause_background_commits(true);
    let mut made = Vec::new();
    // Both made first: a change sent the usual way commits what is held before it.
    let one = a.mkdir(ROOT_INODE, b"one", 0o755, 0, 0).await.unwrap();
    let two = a.mkdir(ROOT_INODE, b"two", 0o755, 0, 0).await.unwrap();
    for (dir, d) in [(&b"one"[..], one), (b"two", two)] {
        for i in 0..20 {
            let name = format!("f{i}");
            let f = a.create(d.ino, name.as_bytes(), 0o644, 0, 0).await.unwrap();
            let body = format!("{} {i}", String::from_utf8_lossy(dir));
            a.write(f.ino, 0, body.as_bytes(), false).await.unwrap();
            made.push((d.ino, name, f.ino, body));
        }
    }
    assert_eq!(a.delegated_batches(), 0, "the changes were not held");
    let leader = c.leader_index().await;
    c.bricks[leader].kill();

    let b = Arc::new(c.client("www").await);
    for (dir, name, ino, body) in &made {
        let f = b.lookup(*dir, name.as_bytes()).await.unwrap();
        assert_eq!(f.ino, *ino, "{name}");
        assert_eq!(b.read(*ino, 0, 100).await.unwrap(), body.as_bytes());
    }
    // The path under test: the new leader adopted the delegations, and the holder committed
    // what it held when they were recalled (its background commits never ran).
    assert!(a.delegated_batches() > 0, "the holder committed nothing");
    assert!(
        (0..3)
            .filter(|i| *i != leader)
            .any(|i| c.log_contains(i, "adopted the recorded delegations")),
        "no new leader adopted the delegations"
    );
    c.bricks[leader].start();
}

/// Through a real mount: a file created under a delegation whose name was taken meanwhile by a
/// request the leader did not recall the delegation for (the test hook: a create sent under
/// the mount's own client id, read from its log) — the application's fsync gets EIO, and the
/// mount log names the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_of_a_file_that_could_not_be_committed_is_eio_through_the_mount() {
    use std::io::Write;
    let c = Cluster::start(3);
    c.create_volume("www", CHUNK).await;
    let m = c.mount("www", "mnt", "").await;
    std::fs::create_dir(m.path.join("up")).unwrap();
    std::fs::write(m.path.join("up/first"), b"ok").unwrap();
    let log = std::fs::read_to_string(&m.log).unwrap();
    let client = log
        .split("client=")
        .nth(1)
        .and_then(|s| s.get(..32))
        .and_then(|hex| u128::from_str_radix(hex, 16).ok())
        .expect("the mount logs its client id");
    // Its inode number as the mount shows it (asking another client would recall the
    // delegation, which is what the hook must get around).
    let up_ino =
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(m.path.join("up")).unwrap());
    create_behind_the_holders_back(&c, client, up_ino, b"taken").await;
    // The mount still shows the name free: its create succeeds from memory.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m.path.join("up/taken"))
        .unwrap();
    f.write_all(b"lost").unwrap();
    let synced = f.sync_all();
    assert_eq!(
        synced.as_ref().map_err(|e| e.raw_os_error()),
        Err(Some(libc::EIO)),
        "fsync of a change that could not be committed: {synced:?}"
    );
    let log = std::fs::read_to_string(&m.log).unwrap();
    assert!(
        log.contains("could not be committed") && log.contains("\"taken\""),
        "the mount log does not name the file"
    );
}

/// Through real mounts: the leader dies while one mount holds files it wrote in two
/// directories it made (the test hook keeps its background commits off, so only a recall
/// commits them): a second mount reads every one of them at its first look.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_mount_reads_everything_a_mount_held_when_the_leader_died() {
    let mut c = Cluster::start(3);
    c.create_volume("www", CHUNK).await;
    let holder = c
        .mount_with_env("www", "holder", "", &[("MORTAR_TEST_HOLD_COMMITS", "1")])
        .await;
    let reader = c.mount("www", "reader", "").await;
    assert_eq!(std::fs::read_dir(&reader.path).unwrap().count(), 0);
    // Both directories first: a change sent the usual way commits what is held before it.
    for dir in ["one", "two"] {
        std::fs::create_dir(holder.path.join(dir)).unwrap();
    }
    let mut files = Vec::new();
    for dir in ["one", "two"] {
        for i in 0..20 {
            let rel = format!("{dir}/page{i}.html");
            let body = format!("<p>{rel}</p>").into_bytes();
            std::fs::write(holder.path.join(&rel), &body).unwrap();
            files.push((rel, body));
        }
    }
    let log = std::fs::read_to_string(&holder.log).unwrap();
    assert!(
        log.contains("test hook: background commits"),
        "the hook is off"
    );
    assert!(
        !log.contains("committed changes made under delegations"),
        "the holder committed before the leader died"
    );
    let leader = c.leader_index().await;
    c.bricks[leader].kill();
    for (rel, body) in &files {
        assert_eq!(
            &std::fs::read(reader.path.join(rel)).unwrap(),
            body,
            "{rel}"
        );
    }
    // The path under test: a new leader adopted the delegations, and the holder committed
    // what it held when they were recalled.
    assert!(
        (0..3)
            .filter(|i| *i != leader)
            .any(|i| c.log_contains(i, "adopted the recorded delegations")),
        "no new leader adopted the delegations"
    );
    let log = std::fs::read_to_string(&holder.log).unwrap();
    assert!(log.contains("committed changes made under delegations"));
    c.bricks[leader].start();
}

/// The test hook of the EIO tests: `name` made in `dir` at the leader under the holder's own
/// client id, so the leader recalls no delegation of the holder's for it.
async fn create_behind_the_holders_back(c: &Cluster, holder: u128, dir: InodeId, name: &[u8]) {
    use mortar_tests::mortar_proto::wire::{MetaOp, OpId};
    use mortar_tests::mortar_proto::FileKind;
    let leader = c.addrs()[c.leader_index().await].clone();
    let pool = Pool::new(client_endpoint(&c.certs.identity(Role::Client, "hook")).unwrap());
    let hook = Request::Meta {
        op: MetaOp::Mknod {
            parent: dir,
            name: name.to_vec(),
            kind: FileKind::Regular,
            perm: 0o600,
            uid: 0,
            gid: 0,
            rdev: 0,
            exclusive: true,
        },
        once: Some(OpId {
            client: holder,
            seq: u64::MAX / 2,
        }),
    };
    match pool
        .call(&leader, &hook, Duration::from_secs(10))
        .await
        .unwrap()
    {
        Ok(Reply::Meta { result, .. }) => {
            result.unwrap();
        }
        other => panic!("the hook's create: {other:?}"),
    }
}

/// Issue 22, delegations of existing directories: replacing files the rsync way and `rm -rf`
/// in a tree another mount made are done from memory under delegations of the existing
/// directories (the writer's batches carry them), and a second mount that had looked at every
/// name sees each replacement and removal as soon as the writer's call returned: its kernel
/// dropped the names at the grant, so its next look reaches the leader, which recalls first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_in_existing_directories_are_delegated_and_seen_at_once_elsewhere() {
    use mortar_tests::metrics::{scrape, sum};
    let c = Cluster::start(3);
    c.create_volume("www", CHUNK).await;
    let metrics = format!("{}:9200", c.ip);
    // a commits what it holds only when recalled or synced, so nothing but the grant's
    // invalidations and the recall can show b its changes.
    let a = c
        .mount_with_env(
            "www",
            "a",
            &format!("metrics={metrics}"),
            &[("MORTAR_TEST_HOLD_COMMITS", "1")],
        )
        .await;
    // b's kernel keeps names and attributes for 30 s: only an invalidation can drop them.
    let b = c
        .mount("www", "b", "entry_timeout=30,attr_timeout=30")
        .await;
    let (dirs, files) = (3, 40);
    let path = |m: &Mount, d: usize, f: usize| m.path.join(format!("t/d{d}/f{f}"));
    std::fs::create_dir(b.path.join("t")).unwrap();
    for d in 0..dirs {
        std::fs::create_dir(b.path.join(format!("t/d{d}"))).unwrap();
        for f in 0..files {
            std::fs::write(path(&b, d, f), format!("v1 {d} {f}")).unwrap();
        }
    }
    std::fs::File::open(b.path.join("t"))
        .unwrap()
        .sync_all()
        .unwrap();
    // Both mounts look at every name, so their kernels hold them.
    for d in 0..dirs {
        for f in 0..files {
            let want = format!("v1 {d} {f}");
            assert_eq!(std::fs::read_to_string(path(&a, d, f)).unwrap(), want);
            assert_eq!(std::fs::read_to_string(path(&b, d, f)).unwrap(), want);
        }
    }
    let delegated = || {
        sum(
            &scrape(&metrics),
            "mortar_mount_delegated_changes_total",
            "",
        )
    };
    // rsync's way: a new file under a temporary name, renamed over the old one.
    let replace = |d: usize, f: usize| {
        let tmp = a.path.join(format!("t/d{d}/.f{f}.tmp"));
        std::fs::write(&tmp, format!("v2 {d} {f}")).unwrap();
        std::fs::rename(&tmp, path(&a, d, f)).unwrap();
    };

    // d0 alone, then b reads it whole.
    let before = delegated();
    for f in 0..files {
        replace(0, f);
    }
    std::fs::File::open(a.path.join("t/d0"))
        .unwrap()
        .sync_all()
        .unwrap();
    let made = delegated() - before;
    assert!(
        made >= files as f64,
        "only {made} changes of {} made from memory",
        2 * files
    );
    for f in 0..files {
        assert_eq!(
            std::fs::read_to_string(path(&b, 0, f)).unwrap(),
            format!("v2 0 {f}")
        );
    }
    // d1, the grant's own work: a makes a first name there (the usual way); b then looks
    // at d1 and f1 afresh, so its kernel holds both as current; a's next name change gets
    // it d1 with its listing, and a replaces f1 from memory. b's read of f1 must find the
    // new file: only the grant's invalidation of every listed name makes its kernel ask.
    // (b's read recalls the delegation, and a then changes d1 the usual way.)
    let before = delegated();
    std::fs::write(a.path.join("t/d1/warm"), b"w").unwrap();
    std::fs::metadata(b.path.join("t/d1")).unwrap();
    assert_eq!(std::fs::read_to_string(path(&b, 1, 1)).unwrap(), "v1 1 1");
    replace(1, 1);
    assert_eq!(
        std::fs::read_to_string(path(&b, 1, 1)).unwrap(),
        "v2 1 1",
        "b read the old d1/f1 after a replaced it under the delegation"
    );
    for f in 0..files {
        replace(1, f);
        assert_eq!(
            std::fs::read_to_string(path(&b, 1, f)).unwrap(),
            format!("v2 1 {f}"),
            "b read the old d1/f{f} after a replaced it"
        );
    }
    std::fs::File::open(a.path.join("t/d1"))
        .unwrap()
        .sync_all()
        .unwrap();
    assert!(delegated() > before, "no change in d1 was made from memory");
    // rm -rf by a; b finds nothing left at once.
    let out = std::process::Command::new("rm")
        .arg("-rf")
        .arg(a.path.join("t"))
        .output()
        .unwrap();
    assert!(out.status.success());
    for d in 0..dirs {
        assert!(!path(&b, d, 0).exists(), "b still sees t/d{d}/f0");
    }
    assert!(!b.path.join("t").exists());
    assert!(std::fs::read_dir(&b.path).unwrap().next().is_none());
}
