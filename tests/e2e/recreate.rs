//! Issue 18, bug 1: a name removed in a directory the mount made (so held under its
//! delegation) stays removed, whatever the timing of the background committer: the mount's
//! delegation copy must agree with what it commits after unlink, rmdir and rename, which it
//! makes from memory too. Each case runs with pauses of 0, 10, 30 and 100 ms between its
//! steps; the committer gathers for 25 ms, so the longer pauses let a create be committed
//! before the name is removed.

use mortar_tests::{Cluster, Mount};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

const PAUSES_MS: [u64; 4] = [0, 10, 30, 100];

/// One reproduction, run in a fresh directory with the given pause between its steps.
type Case = fn(&Path, u64);

fn pause(ms: u64) {
    if ms > 0 {
        std::thread::sleep(Duration::from_millis(ms));
    }
}

fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    r.expect_err("operation should fail")
        .raw_os_error()
        .expect("an errno")
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// The reproductions: unlink, then the name is made again as a directory, or opened
/// with O_CREAT|O_TRUNC.
fn unlink_then_recreate(dir: &Path, ms: u64) {
    let f = dir.join("f");
    fs::write(&f, b"").unwrap();
    pause(ms);
    fs::remove_file(&f).unwrap();
    pause(ms);
    assert_eq!(errno(fs::metadata(&f)), libc::ENOENT, "stat after unlink");
    fs::create_dir(&f).expect("mkdir of an unlinked name");
    assert!(fs::metadata(&f).unwrap().is_dir());

    let g = dir.join("g");
    fs::write(&g, b"old").unwrap();
    pause(ms);
    fs::remove_file(&g).unwrap();
    pause(ms);
    let mut h = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&g)
        .expect("open(O_CREAT|O_TRUNC) of an unlinked name");
    h.write_all(b"new").unwrap();
    drop(h);
    assert_eq!(fs::read(&g).unwrap(), b"new");
    assert_eq!(names(dir), ["f", "g"]);
}

/// rmdir, then the name is a file, then a directory again.
fn rmdir_then_recreate(dir: &Path, ms: u64) {
    let d = dir.join("d");
    fs::create_dir(&d).unwrap();
    fs::write(d.join("inner"), b"x").unwrap();
    pause(ms);
    fs::remove_file(d.join("inner")).unwrap();
    pause(ms);
    fs::remove_dir(&d).unwrap();
    pause(ms);
    assert_eq!(errno(fs::metadata(&d)), libc::ENOENT, "stat after rmdir");
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&d)
        .expect("O_EXCL create of a removed directory's name");
    assert!(fs::metadata(&d).unwrap().is_file());
    pause(ms);
    fs::remove_file(&d).unwrap();
    pause(ms);
    fs::create_dir(&d).expect("mkdir again");
    assert!(names(&d).is_empty());
    assert_eq!(names(dir), ["d"]);
}

/// rename over an existing name: the target shows the source, the source name is free.
fn rename_over_then_recreate(dir: &Path, ms: u64) {
    let (a, b) = (dir.join("a"), dir.join("b"));
    fs::write(&a, b"from a").unwrap();
    fs::write(&b, b"from b").unwrap();
    let a_ino = fs::metadata(&a).unwrap().ino();
    pause(ms);
    fs::rename(&a, &b).unwrap();
    pause(ms);
    assert_eq!(
        errno(fs::metadata(&a)),
        libc::ENOENT,
        "stat of the old name"
    );
    assert_eq!(fs::metadata(&b).unwrap().ino(), a_ino);
    assert_eq!(fs::read(&b).unwrap(), b"from a");
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&a)
        .expect("O_EXCL create of a renamed-away name");
    pause(ms);
    // And a directory renamed over an empty one.
    let (c, e) = (dir.join("c"), dir.join("e"));
    fs::create_dir(&c).unwrap();
    fs::create_dir(&e).unwrap();
    pause(ms);
    fs::rename(&c, &e).unwrap();
    pause(ms);
    assert_eq!(errno(fs::metadata(&c)), libc::ENOENT);
    fs::create_dir(&c).expect("mkdir of a renamed-away directory's name");
    assert_eq!(names(dir), ["a", "b", "c", "e"]);
}

/// A symlink removed and made again points where the new one says.
fn symlink_then_recreate(dir: &Path, ms: u64) {
    let s = dir.join("s");
    std::os::unix::fs::symlink("first", &s).unwrap();
    pause(ms);
    fs::remove_file(&s).unwrap();
    pause(ms);
    assert_eq!(errno(fs::symlink_metadata(&s)), libc::ENOENT);
    std::os::unix::fs::symlink("second", &s).expect("symlink over a removed symlink's name");
    assert_eq!(fs::read_link(&s).unwrap(), Path::new("second"));
    pause(ms);
    fs::remove_file(&s).unwrap();
    pause(ms);
    fs::create_dir(&s).expect("mkdir of a removed symlink's name");
    assert_eq!(names(dir), ["s"]);
}

fn delegations_in_log(m: &Mount) -> (usize, usize) {
    let log = fs::read_to_string(&m.log).unwrap_or_default();
    (
        log.matches("directory delegated to this client").count(),
        log.matches("giving back a delegation").count(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_name_stays_removed_whatever_the_commit_timing() {
    let cl = Cluster::start(3);
    cl.create_volume("www", 1 << 20).await;
    let metrics = format!("{}:9200", cl.ip);
    let m = cl.mount("www", "mnt", &format!("metrics={metrics}")).await;
    let cases: [(&str, Case); 4] = [
        ("unlink", unlink_then_recreate),
        ("rmdir", rmdir_then_recreate),
        ("rename", rename_over_then_recreate),
        ("symlink", symlink_then_recreate),
    ];
    let mut runs = 0;
    for ms in PAUSES_MS {
        for (name, case) in cases {
            // A directory this mount made: its first create takes a delegation.
            let dir = m.path.join(format!("{name}-{ms}ms"));
            fs::create_dir(&dir).unwrap();
            let path = dir.clone();
            tokio::task::spawn_blocking(move || case(&path, ms))
                .await
                .unwrap_or_else(|e| panic!("case {name} with {ms} ms pauses: {e}"));
            runs += 1;
        }
    }
    // The path under test was taken: each case's directory was delegated, and its removals,
    // renames and listings were answered from memory (no delegation was given back for
    // them), its changes committed in batches.
    fs::File::open(&m.path).unwrap().sync_all().unwrap();
    let (granted, given_back) = delegations_in_log(&m);
    assert_eq!(given_back, 0, "a delegation was given back");
    let delegated = mortar_tests::metrics::sum(
        &mortar_tests::metrics::scrape(&metrics),
        "mortar_mount_delegated_changes_total",
        "",
    );
    assert!(
        granted >= runs && delegated >= (3 * runs) as f64,
        "{granted} delegations granted and {delegated} changes made from memory for {runs} cases"
    );
    // A second mount, with nothing in its caches, sees the same names.
    let other = cl.mount("www", "other", "").await;
    for ms in PAUSES_MS {
        assert_eq!(
            names(&other.path.join(format!("unlink-{ms}ms"))),
            ["f", "g"]
        );
        assert_eq!(names(&other.path.join(format!("rmdir-{ms}ms"))), ["d"]);
        assert_eq!(
            names(&other.path.join(format!("rename-{ms}ms"))),
            ["a", "b", "c", "e"]
        );
        assert_eq!(names(&other.path.join(format!("symlink-{ms}ms"))), ["s"]);
    }
}
