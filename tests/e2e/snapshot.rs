//! Issue 24: snapshots and one-command rollback of a bad deploy, on real bricks and mounts.

use mortar_tests::mortar_proto::ChunkId;
use mortar_tests::tree::{manifest, manifest_diff, regular_files, Manifest};
use mortar_tests::web::{http_get, Nginx};
use mortar_tests::{bin, wait_for, Cluster, DEADLINE};
use rand::{RngCore, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CHUNK: u32 = 1 << 20;
const WORDPRESS: &str = "/usr/share/wordpress";

fn rsync(from: &Path, to: &Path, delete: bool) {
    let mut cmd = Command::new("rsync");
    cmd.arg("-a");
    if delete {
        cmd.arg("--delete");
    }
    let out = cmd
        .arg(format!("{}/", from.display()))
        .arg(to)
        .output()
        .expect("run rsync (installed by scripts/test.sh)");
    assert!(
        out.status.success(),
        "rsync {} {}: {}",
        from.display(),
        to.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// v2 of a tree: every tenth file changed, one in thirteen deleted, a new directory of small
/// files and one large (chunked) file added.
fn make_v2(v1: &Path, v2: &Path) {
    rsync(v1, v2, false);
    for (i, f) in regular_files(v2).iter().enumerate() {
        let p = v2.join(f);
        if i % 13 == 5 {
            std::fs::remove_file(&p).unwrap();
        } else if i % 10 == 0 {
            let mut bytes = std::fs::read(&p).unwrap();
            bytes.extend_from_slice(b"\n/* v2 */\n");
            std::fs::write(&p, bytes).unwrap();
        }
    }
    let added = v2.join("wp-content/v2-assets");
    std::fs::create_dir_all(&added).unwrap();
    for i in 0..30 {
        std::fs::write(
            added.join(format!("a{i}.css")),
            format!("/* v2 asset {i} */"),
        )
        .unwrap();
    }
    std::fs::write(added.join("bundle.bin"), random_bytes(3 << 20, 2)).unwrap();
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut b = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut b);
    b
}

/// Wait until every tree in `roots` reads as `want`; how long after the call the walk that
/// found it began (every entry it read was already as wanted).
async fn until_all_show(roots: &[PathBuf], want: &Manifest, what: &str) -> Duration {
    let started = Instant::now();
    let mut last = Vec::new();
    let mut walked = started;
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            walked = Instant::now();
            let roots = roots.to_vec();
            let got = tokio::task::spawn_blocking(move || {
                roots.iter().map(|r| manifest(r)).collect::<Vec<_>>()
            })
            .await
            .unwrap();
            last = got
                .iter()
                .map(|g| match g {
                    Ok(m) => manifest_diff(m, want, 5).join("\n  "),
                    Err(e) => format!("unreadable: {e}"),
                })
                .collect();
            if last.iter().all(String::is_empty) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "{what}: trees still differ:\n  {}",
        last.join("\n  ")
    );
    started.elapsed()
}

fn ok(run: &mortar_tests::Run) {
    assert_eq!(run.code, 0, "{}", run.out);
}

fn errno_of<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// Acceptance 1 and 2: deploy v1, snapshot, deploy v2 over it, restore: both mounts show v1
/// byte- and attribute-identical while nginx and a reader go on through the restore without
/// an error; a mount of the snapshot shows v1 all along and refuses writes with EROFS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_deploy_is_rolled_back_on_every_mount_while_nginx_serves() {
    let src = Path::new(WORDPRESS);
    assert!(
        src.exists(),
        "the wordpress package is missing: scripts/test.sh installs it"
    );
    let c = Cluster::start(3);
    let work = c.dir.path().join("trees");
    let (v1, v2) = (work.join("v1"), work.join("v2"));
    std::fs::create_dir_all(&work).unwrap();
    rsync(src, &v1, false);
    make_v2(&v1, &v2);
    c.create_volume("www", CHUNK).await;
    let a = c.mount("www", "a", "").await;
    let b = c.mount("www", "b", "").await;
    let (site_a, site_b) = (a.path.join("site"), b.path.join("site"));

    rsync(&v1, &site_a, false);
    let walking = Instant::now();
    let m1 = manifest(&site_a).unwrap();
    let walk = walking.elapsed();
    assert!(m1.len() > 2_500, "only {} entries deployed", m1.len());
    until_all_show(std::slice::from_ref(&site_b), &m1, "v1 on the second mount").await;
    let taken = Instant::now();
    let run = c.snapshot_cli("create", &["before"]);
    eprintln!("snapshot create took {:?}", taken.elapsed());
    ok(&run);
    assert!(run.out.contains("taken at log index"), "{}", run.out);

    rsync(&v2, &site_a, true);
    let m2 = manifest(&site_a).unwrap();
    let changed = m1.iter().filter(|(k, v)| m2.get(*k) != Some(v)).count();
    let added = m2.keys().filter(|k| !m1.contains_key(*k)).count();
    let deleted = m1.keys().filter(|k| !m2.contains_key(*k)).count();
    eprintln!("v2: {changed} entries changed or deleted, {added} added, {deleted} deleted");
    assert!(added > 30 && deleted > 100, "v2 is not different enough");
    until_all_show(std::slice::from_ref(&site_b), &m2, "v2 on the second mount").await;

    // Acceptance 2: the snapshot, mounted, is v1 while the live volume is v2.
    let snap = c.mount("www@before", "snap", "").await;
    let site_s = snap.path.join("site");
    let shown = manifest(&site_s).unwrap();
    assert!(
        shown == m1,
        "the snapshot mount: {:?}",
        manifest_diff(&shown, &m1, 5)
    );
    let erofs = Some(libc::EROFS);
    assert_eq!(
        errno_of(std::fs::write(site_s.join("new.php"), b"x")),
        erofs
    );
    assert_eq!(errno_of(std::fs::create_dir(site_s.join("d"))), erofs);
    assert_eq!(
        errno_of(std::fs::remove_file(site_s.join("index.php"))),
        erofs
    );
    assert_eq!(
        errno_of(
            std::fs::OpenOptions::new()
                .append(true)
                .open(site_s.join("index.php"))
        ),
        erofs
    );
    assert_eq!(
        errno_of(std::fs::rename(
            site_s.join("index.php"),
            site_s.join("i.php")
        )),
        erofs
    );
    // Nothing of that reached the live volume.
    assert_eq!(manifest(&site_b).unwrap(), m2);

    // Readers through the restore: nginx serving the second mount, and a reader of the files.
    let common: Vec<PathBuf> = regular_files(&v1)
        .into_iter()
        .filter(|f| v2.join(f).exists())
        .step_by(7)
        .collect();
    assert!(common.len() > 200, "{} files in both trees", common.len());
    let listen = format!("{}:18180", c.ip);
    let _nginx = Nginx::start(c.dir.path(), &listen, &b.path).await;
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let (served, read) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let web = {
        let (stop, failures, served, common) = (
            stop.clone(),
            failures.clone(),
            served.clone(),
            common.clone(),
        );
        let listen = listen.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for f in &common {
                    let path = format!("/site/{}", f.display());
                    let (status, _) = http_get(&listen, &path);
                    if status != 200 {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("nginx {status} for {path}"));
                    }
                    served.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let reader = {
        let (stop, failures, read, common) =
            (stop.clone(), failures.clone(), read.clone(), common.clone());
        let root = site_b.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for f in &common {
                    if let Err(e) = std::fs::read(root.join(f)) {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("read {}: {e}", f.display()));
                    }
                    read.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let going = |n: &AtomicUsize| n.load(Ordering::Relaxed);
    wait_for("the readers to get going", DEADLINE, || {
        let ready = going(&served) > common.len() && going(&read) > common.len();
        async move { ready.then_some(()) }
    })
    .await;

    let started = Instant::now();
    let run = c.snapshot_cli("restore", &["before", "--undo", "bad-deploy"]);
    let answered = started.elapsed();
    ok(&run);
    assert!(run.out.contains("'bad-deploy'"), "{}", run.out);
    let (served_then, read_then) = (going(&served), going(&read));
    // When the restore shows: an added file gone, a deleted one back, a changed one as it was,
    // on both mounts (polled by stat; the whole trees are compared next).
    let size_in =
        |m: &Manifest, k: &Path| m.get(k).map(|d| d.split(' ').nth(7).unwrap().to_string());
    let gone = m2.keys().find(|k| !m1.contains_key(*k)).unwrap().clone();
    let back = m1
        .keys()
        .find(|k| !m2.contains_key(*k) && v1.join(k).is_file())
        .unwrap()
        .clone();
    let as_was = m1
        .keys()
        .find(|k| size_in(&m1, k) != size_in(&m2, k) && m2.contains_key(*k))
        .unwrap()
        .clone();
    let probes = [
        (gone, None),
        (back.clone(), size_in(&m1, &back)),
        (as_was.clone(), size_in(&m1, &as_was)),
    ];
    let roots = [site_a.clone(), site_b.clone()];
    wait_for("the restore to show on both mounts", DEADLINE, || {
        let shows = roots.iter().all(|r| {
            probes.iter().all(|(k, size)| {
                let now = std::fs::symlink_metadata(r.join(k)).ok().map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    m.size().to_string()
                });
                now == *size
            })
        });
        async move { shows.then_some(()) }
    })
    .await;
    let visible = started.elapsed();
    until_all_show(&roots, &m1, "v1 after the restore").await;
    eprintln!(
        "restore answered after {answered:?}; shown on both mounts {visible:?} after it was \
         asked; both trees identical to v1 (a walk of one takes {walk:?})"
    );
    // The readers went on past the restore, a round at least.
    wait_for("the readers to go on after the restore", DEADLINE, || {
        let on =
            going(&served) > served_then + common.len() && going(&read) > read_then + common.len();
        async move { on.then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    web.join().unwrap();
    reader.join().unwrap();
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    eprintln!(
        "nginx served {}, the reader read {} files",
        going(&served),
        going(&read)
    );

    // The snapshot mount still shows v1, and the restore can itself be undone.
    assert_eq!(manifest(&site_s).unwrap(), m1);
    let run = c.snapshot_cli("list", &[]);
    ok(&run);
    assert!(
        run.out.contains("before") && run.out.contains("bad-deploy"),
        "{}",
        run.out
    );
    ok(&c.snapshot_cli("restore", &["bad-deploy", "--undo", "undo-2"]));
    until_all_show(
        &[site_a.clone(), site_b.clone()],
        &m2,
        "v2 after undoing the restore",
    )
    .await;
    let digests = c.settled_meta_digests().await;
    assert!(
        digests.iter().all(|d| *d == digests[0]),
        "replicas differ after restores"
    );
}

/// The chunk ids of a file's bytes (1 MiB chunks, named by their hash).
fn chunk_ids(bytes: &[u8]) -> Vec<ChunkId> {
    bytes.chunks(CHUNK as usize).map(ChunkId::of).collect()
}

/// Acceptance 3: heal with no grace removes nothing a snapshot names; once the snapshot is
/// deleted, the next heal frees exactly what only it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heal_keeps_what_a_snapshot_names_and_frees_it_once_deleted() {
    let mut c = Cluster::start(3);
    c.create_volume("www", CHUNK).await;
    let m = c.mount("www", "m", "").await;
    let kept_file = random_bytes(3 << 20, 7);
    let live_file = random_bytes(2 << 20, 8);
    std::fs::write(m.path.join("old.bin"), &kept_file).unwrap();
    std::fs::write(m.path.join("live.bin"), &live_file).unwrap();
    for f in ["old.bin", "live.bin"] {
        std::fs::File::open(m.path.join(f))
            .unwrap()
            .sync_all()
            .unwrap();
    }
    ok(&c.snapshot_cli("create", &["keep"]));
    std::fs::remove_file(m.path.join("old.bin")).unwrap();
    let held = chunk_ids(&kept_file);
    let live = chunk_ids(&live_file);

    let run = c.volume_cli("heal", &["--gc-grace", "0"]);
    ok(&run);
    for (i, chunks) in c.chunks_per_brick().await.iter().enumerate() {
        for id in held.iter().chain(&live) {
            assert!(
                chunks.contains(id),
                "brick {i} lost chunk {id:?} a snapshot names"
            );
        }
    }
    // A copy of a chunk only the snapshot names, lost on one brick: heal brings it back to
    // three copies like any other.
    let lost = held[0];
    c.tamper(1, |s| {
        assert_eq!(s.collect_garbage(&[lost], 0).unwrap(), vec![lost]);
    })
    .await;
    assert!(!c.chunks_per_brick().await[1].contains(&lost));
    let run = c.volume_cli("heal", &["--gc-grace", "0"]);
    ok(&run);
    for (i, chunks) in c.chunks_per_brick().await.iter().enumerate() {
        assert!(
            held.iter().all(|id| chunks.contains(id)),
            "brick {i} lacks a chunk only the snapshot names after heal: {}",
            run.out
        );
    }
    let info = c.snapshot_cli("info", &["keep", "--json"]);
    ok(&info);
    let v: serde_json::Value =
        serde_json::from_str(&info.out[..info.out.rfind('}').unwrap() + 1]).unwrap();
    assert_eq!(
        v["only_bytes"],
        serde_json::json!(kept_file.len()),
        "{}",
        info.out
    );
    // The snapshot still reads the deleted file.
    {
        let s = c.mount("www", "s", "snapshot=keep").await;
        assert!(std::fs::read(s.path.join("old.bin")).unwrap() == kept_file);
    }

    ok(&c.snapshot_cli("delete", &["keep"]));
    let run = c.volume_cli("heal", &["--gc-grace", "0"]);
    ok(&run);
    assert!(
        run.out
            .contains(&format!("{} unreferenced chunks removed", held.len())),
        "{}",
        run.out
    );
    for (i, chunks) in c.chunks_per_brick().await.iter().enumerate() {
        for id in &held {
            assert!(!chunks.contains(id), "brick {i} still holds {id:?}");
        }
        for id in &live {
            assert!(chunks.contains(id), "brick {i} lost live chunk {id:?}");
        }
    }
    assert!(std::fs::read(m.path.join("live.bin")).unwrap() == live_file);
}

/// `restore --path`: the tree at the path comes back as the snapshot holds it, on every mount,
/// and nothing outside it changes; the undo snapshot holds the tree as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_is_restored_and_the_rest_of_the_volume_stays_as_it_is() {
    let c = Cluster::start(3);
    c.create_volume("www", CHUNK).await;
    let a = c.mount("www", "a", "").await;
    let b = c.mount("www", "b", "").await;
    let v1 = c.dir.path().join("v1");
    let themes = Path::new("wp-content/themes");
    for (f, body) in [
        ("index.php", b"<?php /* v1 */".to_vec()),
        (
            "wp-content/themes/t1/style.css",
            b"body { color: red }".to_vec(),
        ),
        ("wp-content/themes/t1/big.bin", random_bytes(3 << 20, 11)),
        (
            "wp-content/themes/t2/functions.php",
            b"<?php /* t2 */".to_vec(),
        ),
        ("wp-content/uploads/logo.png", random_bytes(5000, 12)),
    ] {
        let p = v1.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    rsync(&v1, &a.path, false);
    // As the mount shows it: rsync sets the times of directories it creates or changes only
    // sometimes, on any filesystem (rsync 3.5.0 here).
    let v1_themes = manifest(&a.path.join(themes)).unwrap();
    ok(&c.snapshot_cli("create", &["before"]));
    // v2: the theme changed everywhere, and so did the rest of the site.
    let v2 = c.dir.path().join("v2");
    rsync(&v1, &v2, false);
    std::fs::write(
        v2.join("wp-content/themes/t1/style.css"),
        "body { color: blue }",
    )
    .unwrap();
    std::fs::write(
        v2.join("wp-content/themes/t1/big.bin"),
        random_bytes(2 << 20, 13),
    )
    .unwrap();
    std::fs::remove_dir_all(v2.join("wp-content/themes/t2")).unwrap();
    std::fs::create_dir_all(v2.join("wp-content/themes/t3")).unwrap();
    std::fs::write(v2.join("wp-content/themes/t3/new.php"), "<?php /* t3 */").unwrap();
    std::fs::write(v2.join("index.php"), "<?php /* v2 */").unwrap();
    std::fs::write(
        v2.join("wp-content/uploads/new.png"),
        random_bytes(7000, 14),
    )
    .unwrap();
    rsync(&v2, &a.path, true);
    let v2_themes = manifest(&a.path.join(themes)).unwrap();
    until_all_show(&[b.path.join(themes)], &v2_themes, "v2 deployed").await;
    // Everything but the restored tree and the directory holding it (whose times move).
    let outside = |root: &Path| -> Manifest {
        manifest(root)
            .unwrap()
            .into_iter()
            .filter(|(p, _)| !p.starts_with(themes) && p != Path::new("wp-content"))
            .collect()
    };
    let rest = outside(&a.path);

    let run = c.snapshot_cli(
        "restore",
        &["before", "--path", "/wp-content/themes", "--undo", "u"],
    );
    ok(&run);
    assert!(
        run.out.contains("/wp-content/themes restored"),
        "{}",
        run.out
    );
    until_all_show(
        &[a.path.join(themes), b.path.join(themes)],
        &v1_themes,
        "theme restored",
    )
    .await;
    for m in [&a.path, &b.path] {
        let diff = manifest_diff(&outside(m), &rest, 5);
        assert!(diff.is_empty(), "outside the path changed: {diff:?}");
    }
    // The undo snapshot holds v2's theme.
    {
        let s = c.mount("www", "undo", "snapshot=u").await;
        assert_eq!(manifest(&s.path.join(themes)).unwrap(), v2_themes);
    }
    // A path the snapshot does not hold, or not a path: refused, nothing changed.
    let tree = manifest(&a.path).unwrap();
    for (path, says) in [
        (
            "/wp-content/themes/t3",
            "'/wp-content/themes/t3' is not in snapshot 'before'",
        ),
        ("wp-content", "must be absolute"),
        ("/", "restore without --path"),
    ] {
        let run = c.snapshot_cli("restore", &["before", "--path", path]);
        assert_ne!(run.code, 0, "{path}: {}", run.out);
        assert!(run.out.contains(says), "{path}: {}", run.out);
    }
    assert_eq!(manifest(&a.path).unwrap(), tree);
    let run = c.volume_cli("heal", &[]);
    ok(&run);
    assert!(run.out.contains("replicas agree"), "{}", run.out);
}

/// Acceptance 5: an existing or invalid name, a missing snapshot, a bad --keep: a clear
/// message, a non-zero exit, and nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_snapshot_requests_are_refused_clearly_and_change_nothing() {
    let c = Cluster::start(3);
    c.create_volume("www", CHUNK).await;
    let m = c.mount("www", "m", "").await;
    std::fs::write(m.path.join("index.php"), b"<?php echo 1;").unwrap();
    ok(&c.snapshot_cli("create", &["a"]));
    let listed = c.snapshot_cli("list", &["--json"]).out;
    let tree = manifest(&m.path).unwrap();
    let long = "x".repeat(65);
    for (args, says) in [
        (vec!["create", "a"], "a snapshot named 'a' already exists"),
        (vec!["create", "bad/name"], "snapshot name \"bad/name\""),
        (vec!["create", ".x"], "snapshot name \".x\""),
        (vec!["create", &long], "snapshot name"),
        (
            vec!["create", "b", "--keep", "0"],
            "--keep must be at least 1",
        ),
        (vec!["restore", "nope"], "no snapshot named 'nope'"),
        (vec!["restore", "a", "--undo", "a"], "'a', already exists"),
        (vec!["delete", "nope"], "no snapshot named 'nope'"),
        (vec!["info", "nope"], "no snapshot named 'nope'"),
    ] {
        let run = c.snapshot_cli(args[0], &args[1..]);
        assert_ne!(run.code, 0, "{args:?} succeeded: {}", run.out);
        assert!(run.out.contains(says), "{args:?}: {}", run.out);
        assert!(!run.out.contains("panicked"), "{}", run.out);
    }
    assert_eq!(c.snapshot_cli("list", &["--json"]).out, listed);
    assert_eq!(manifest(&m.path).unwrap(), tree);

    // Mounting a snapshot that is not there fails at mount time, in one line.
    let err = mount_refused(&c, "www@nope");
    assert!(
        err.contains("cannot mount snapshot 'nope'") && err.contains("no such snapshot"),
        "{err}"
    );
}

/// Mount `source` where it cannot be mounted: exit 1, nothing mounted; what it said.
fn mount_refused(c: &Cluster, source: &str) -> String {
    let dir = c.dir.path().join("refused");
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(bin("mortar-mount"))
        .arg(c.source(source))
        .arg(&dir)
        .args(["-o", &c.mount_options("refused")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!mortar_tests::is_mounted(&dir));
    err
}

/// Retention as the timer runs it: `--keep N` deletes the oldest of the same series beyond N,
/// and never a snapshot of another series; without a name, the series and the time name it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_deletes_the_oldest_of_a_series_only() {
    let c = Cluster::start(3);
    c.create_volume("www", CHUNK).await;
    ok(&c.snapshot_cli("create", &["before-deploy"]));
    for i in 1..=4 {
        ok(&c.snapshot_cli("create", &[&format!("hourly-{i}"), "--keep", "2"]));
    }
    let run = c.snapshot_cli("create", &["--series", "daily", "--keep", "2"]);
    ok(&run);
    assert!(
        run.out.contains("snapshot create www daily-20"),
        "{}",
        run.out
    );
    let list = c.snapshot_cli("list", &["--json"]);
    ok(&list);
    let v: serde_json::Value =
        serde_json::from_str(&list.out[..list.out.rfind(']').unwrap() + 1]).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    assert_eq!(&names[..3], ["before-deploy", "hourly-3", "hourly-4"]);
    assert!(names[3].starts_with("daily-20"), "{names:?}");
}

/// When the leader is killed.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// As the command starts: the request meets a dead leader, or none yet.
    AtStart,
    /// While the leader applies the committed change (held back by a test hook).
    Applying,
}

/// Acceptance 6: the metadata leader killed while a snapshot is taken, while one is restored
/// and while one is cloned, at the start and while the change is being applied: the change is
/// made on every replica or on none (their digests agree), and the command run again succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_during_create_or_restore_leaves_it_everywhere_or_nowhere() {
    for kill in [Kill::AtStart, Kill::Applying] {
        killed_during(kill, "create", &["during"]).await;
        killed_during(kill, "restore", &["base", "--undo", "undo-during"]).await;
        killed_during(kill, "clone", &["base", "www-staging"]).await;
    }
}

async fn killed_during(kill: Kill, op: &str, args: &[&str]) {
    let made_name = *args.last().unwrap();
    let hook = format!("{made_name}:3000");
    let env: &[(&str, &str)] = match kill {
        Kill::AtStart => &[],
        Kill::Applying => &[("MORTAR_TEST_SLOW_APPLY", &hook)],
    };
    let mut c = Cluster::start_with_env(3, env);
    c.create_volume("www", CHUNK).await;
    let m = c.mount("www", "m", "").await;
    for i in 0..200 {
        std::fs::write(m.path.join(format!("f{i}.html")), format!("v1 {i}")).unwrap();
    }
    commit_held(&m.path);
    let v1 = manifest(&m.path).unwrap();
    ok(&c.snapshot_cli("create", &["base"]));
    for i in 0..200 {
        std::fs::write(m.path.join(format!("f{i}.html")), format!("v2 {i}")).unwrap();
    }
    commit_held(&m.path);
    let v2 = manifest(&m.path).unwrap();
    let bricks = c.addrs().join(",");
    let leader = c.leader_index().await;
    let mut all = vec!["snapshot", op, "www"];
    all.extend(args.iter().copied());
    all.extend(["--bricks", &bricks]);
    let child = c
        .cli_command(&all)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if let Kill::Applying = kill {
        let (c, leader) = (&c, leader);
        wait_for("the leader to hold the change back", DEADLINE, || {
            let held = c.log_contains(leader, "test hook: applying a create late");
            async move { held.then_some(()) }
        })
        .await;
    }
    c.bricks[leader].kill();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    eprintln!(
        "{op}, leader killed {kill:?}: exit {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    c.bricks[leader].start();
    c.wait_up(leader).await;
    let digests = c.settled_meta_digests().await;
    assert!(
        digests.iter().all(|d| *d == digests[0]),
        "{op} {kill:?}: replicas differ"
    );
    let made = match op {
        "clone" => c.volume_cli("info", &[]).out.contains(made_name),
        _ => c.snapshot_cli("list", &[]).out.contains(made_name),
    };
    if out.status.success() {
        assert!(made, "{op} {kill:?} said done but made nothing");
    } else if !made {
        ok(&c.snapshot_cli(op, args));
    }
    let want = if op == "restore" { &v1 } else { &v2 };
    until_all_show(
        std::slice::from_ref(&m.path),
        want,
        "the tree after the command",
    )
    .await;
    // The snapshot made reads as the tree it was taken of; the clone made, as its snapshot.
    let (source, want) = match op {
        "clone" => (made_name.to_string(), &v1),
        _ => (format!("www@{made_name}"), &v2),
    };
    let s = c.mount(&source, "s", "").await;
    let shown = manifest(&s.path).unwrap();
    assert!(
        shown == *want,
        "{op} {kill:?}: {source} shows {:?}",
        manifest_diff(&shown, want, 3)
    );
}

/// Commit what the mount holds under its delegations (fsync of a directory commits it all).
fn commit_held(dir: &Path) {
    std::fs::File::open(dir).unwrap().sync_all().unwrap();
}

/// `snapshot clone`: a writable volume made from a snapshot, on the same bricks, sharing the
/// chunks. It shows the snapshot's tree, takes writes without touching the volume it came
/// from (nor is touched by that volume's restores), keeps what it names through garbage
/// collection, and has snapshots of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_is_a_writable_copy_that_shares_the_chunks() {
    let src = Path::new(WORDPRESS);
    assert!(
        src.exists(),
        "the wordpress package is missing: scripts/test.sh installs it"
    );
    let c = Cluster::start(3);
    c.create_volume("www", CHUNK).await;
    let a = c.mount("www", "a", "").await;
    rsync(src, &a.path, false);
    let big = random_bytes(3 << 20, 21);
    std::fs::write(a.path.join("big.bin"), &big).unwrap();
    std::fs::File::open(a.path.join("big.bin"))
        .unwrap()
        .sync_all()
        .unwrap();
    let v1 = manifest(&a.path).unwrap();
    assert!(v1.len() > 2_500, "only {} entries deployed", v1.len());
    ok(&c.snapshot_cli("create", &["before"]));
    // The live volume moves on: a file changed, the large one deleted, one added.
    std::fs::write(a.path.join("index.php"), b"<?php /* v2 */").unwrap();
    std::fs::remove_file(a.path.join("big.bin")).unwrap();
    std::fs::write(a.path.join("new.php"), b"<?php /* new */").unwrap();
    let v2 = manifest(&a.path).unwrap();
    let chunks_before = c.chunks_per_brick().await;

    let taken = Instant::now();
    let run = c.snapshot_cli("clone", &["before", "www-staging"]);
    eprintln!("snapshot clone took {:?}", taken.elapsed());
    ok(&run);
    // The manifest holds the root as ".".
    assert!(
        run.out.contains(&format!(
            "volume 'www-staging' made from {} files",
            v1.len()
        )),
        "{}",
        run.out
    );
    assert_eq!(
        c.chunks_per_brick().await,
        chunks_before,
        "a clone copies no chunk"
    );
    let s = c.mount("www-staging", "s", "").await;
    let shown = manifest(&s.path).unwrap();
    assert!(
        shown == v1,
        "the clone is not the snapshot's tree: {:?}",
        manifest_diff(&shown, &v1, 5)
    );
    assert!(std::fs::read(s.path.join("big.bin")).unwrap() == big);

    // Writes to the clone stay in the clone, and a second mount of it sees them.
    std::fs::write(s.path.join("index.php"), b"<?php /* staging */").unwrap();
    std::fs::create_dir(s.path.join("staging-only")).unwrap();
    std::fs::write(s.path.join("staging-only/x.php"), b"<?php /* x */").unwrap();
    std::fs::remove_file(s.path.join("wp-login.php")).unwrap();
    let staged = manifest(&s.path).unwrap();
    let s2 = c.mount("www-staging", "s2", "").await;
    until_all_show(
        std::slice::from_ref(&s2.path),
        &staged,
        "the clone's writes",
    )
    .await;
    assert_eq!(manifest(&a.path).unwrap(), v2, "the origin changed");
    // Moving a file between the two mounts is a copy, as between filesystems.
    let err = std::fs::rename(s.path.join("staging-only/x.php"), a.path.join("x.php"));
    assert_eq!(errno_of(err), Some(libc::EXDEV));

    // The origin's restore leaves the clone as it is; the clone's own snapshots are its own.
    ok(&c.snapshot_cli("restore", &["before", "--undo", "u1"]));
    until_all_show(std::slice::from_ref(&a.path), &v1, "www restored").await;
    assert_eq!(manifest(&s.path).unwrap(), staged, "the clone changed");
    let run = c.group_cli("snapshot", "create", "www-staging", &["s1"]);
    ok(&run);
    assert!(
        run.out.contains(&format!("{} files", staged.len())),
        "{}",
        run.out
    );
    let listed = |volume: &str| -> Vec<String> {
        let run = c.group_cli("snapshot", "list", volume, &["--json"]);
        ok(&run);
        let v: serde_json::Value =
            serde_json::from_str(&run.out[..run.out.rfind(']').unwrap() + 1]).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(listed("www"), ["before", "u1"]);
    assert_eq!(listed("www-staging"), ["s1"]);
    std::fs::write(s.path.join("index.php"), b"<?php /* later */").unwrap();
    {
        let snap = c.mount("www-staging@s1", "s1", "").await;
        assert_eq!(manifest(&snap.path).unwrap(), staged);
    }
    ok(&c.group_cli(
        "snapshot",
        "restore",
        "www-staging",
        &["s1", "--undo", "u2"],
    ));
    until_all_show(
        &[s.path.clone(), s2.path.clone()],
        &staged,
        "www-staging restored",
    )
    .await;
    assert_eq!(manifest(&a.path).unwrap(), v1, "the origin changed");

    // The origin's snapshots go and heal collects with no grace: what the clone names stays.
    ok(&c.snapshot_cli("delete", &["before"]));
    ok(&c.snapshot_cli("delete", &["u1"]));
    std::fs::remove_file(a.path.join("big.bin")).unwrap();
    let origin = manifest(&a.path).unwrap();
    let run = c.volume_cli("heal", &["--gc-grace", "0"]);
    ok(&run);
    assert!(run.out.contains("replicas agree"), "{}", run.out);
    let held = chunk_ids(&big);
    for (i, chunks) in c.chunks_per_brick().await.iter().enumerate() {
        assert!(
            held.iter().all(|id| chunks.contains(id)),
            "brick {i} lost a chunk the clone names"
        );
    }
    let fresh = c.mount("www-staging", "fresh", "").await;
    assert!(std::fs::read(fresh.path.join("big.bin")).unwrap() == big);

    // `volume info` tells them apart; a command that changes the shared bricks is refused
    // on the clone.
    let run = c.volume_cli("info", &[]);
    ok(&run);
    assert!(run.out.contains("Clones:\nwww-staging"), "{}", run.out);
    let run = c.group_cli("volume", "info", "www-staging", &[]);
    ok(&run);
    assert!(
        run.out.contains("Volume Name: www-staging") && run.out.contains("Clone Of: www"),
        "{}",
        run.out
    );
    let run = c.group_cli("volume", "stop", "www-staging", &[]);
    assert_ne!(run.code, 0, "{}", run.out);
    assert!(
        run.out.contains("is a clone of volume 'www'"),
        "{}",
        run.out
    );
    assert_eq!(manifest(&fresh.path).unwrap(), staged);

    // Deleting the clone frees what only it named; the origin is untouched and serves on.
    drop((s, s2, fresh));
    let run = c.group_cli("volume", "delete", "www-staging", &["--yes"]);
    ok(&run);
    let run = c.volume_cli("heal", &["--gc-grace", "0"]);
    ok(&run);
    assert!(run.out.contains("replicas agree"), "{}", run.out);
    for (i, chunks) in c.chunks_per_brick().await.iter().enumerate() {
        assert!(
            held.iter().all(|id| !chunks.contains(id)),
            "brick {i} still holds a chunk only the deleted clone named"
        );
    }
    let run = c.volume_cli("info", &[]);
    assert!(!run.out.contains("www-staging"), "{}", run.out);
    assert_eq!(manifest(&a.path).unwrap(), origin, "the origin changed");
}

/// Acceptance 5 for clones: onto an existing volume name, an invalid one, from a missing
/// snapshot: a clear message, a non-zero exit, and nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clones_are_refused_clearly_and_change_nothing() {
    let c = Cluster::start(3);
    c.create_volume("www", CHUNK).await;
    let m = c.mount("www", "m", "").await;
    std::fs::write(m.path.join("index.php"), b"<?php echo 1;").unwrap();
    ok(&c.snapshot_cli("create", &["a"]));
    ok(&c.snapshot_cli("clone", &["a", "www-staging"]));
    let info = c.volume_cli("info", &["--json"]).out;
    for (args, says) in [
        (
            vec!["a", "www"],
            "cannot clone: a volume named 'www' already exists",
        ),
        (
            vec!["a", "www-staging"],
            "a volume named 'www-staging' already exists",
        ),
        (vec!["a", "bad/name"], "invalid volume name 'bad/name'"),
        (vec!["nope", "other"], "no snapshot named 'nope'"),
        (vec!["bad/snap", "other"], "snapshot name \"bad/snap\""),
    ] {
        let run = c.snapshot_cli("clone", &args);
        assert_ne!(run.code, 0, "{args:?} succeeded: {}", run.out);
        assert!(run.out.contains(says), "{args:?}: {}", run.out);
        assert!(!run.out.contains("panicked"), "{}", run.out);
    }
    assert_eq!(c.volume_cli("info", &["--json"]).out, info);
    // A volume that is neither: mounting it fails in one line naming what the bricks serve.
    let err = mount_refused(&c, "www-nope");
    assert!(
        err.contains("volume 'www-nope' not found; these bricks serve www, www-staging"),
        "{err}"
    );
}
