//! Issue 18: a model-based property test of the mount, after mountpoint-s3's reference-model
//! tests. Random sequences of create/write/truncate/unlink/rename/mkdir/rmdir/link/symlink/chmod,
//! with pauses around the delegation committer's 25 ms gather, run step by step through a
//! real FUSE mount of a real three-brick volume and in a local directory (the reference);
//! after every step the two must agree: the step's result (success or errno) and the whole
//! observable tree (names, kinds, modes, sizes, links, symlink targets, contents). proptest
//! shrinks a failing sequence to a minimal one.
//!
//! Concurrency as the kernel drives it: the same operations by two actors at once, each in a
//! subtree of its own, first as two threads on one mount, then on two mounts; after every
//! step both mounts must show both subtrees as the reference does (close-to-open across
//! mounts: what one actor closed, the other's mount shows, recalling a delegation if need be).
//!
//! `MORTAR_MODEL_CASES` sets how many sequences run (2,000 by default, and a quarter of that for
//! each two-actor variant; `scripts/bench.sh model` runs more), `MORTAR_MODEL_SEED` replays a
//! seed; the seed is printed on failure.

use mortar_tests::Cluster;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Every path a sequence may name: two directories' worth, so renames cross directories and
/// rmdir meets non-empty directories.
const PATHS: [&str; 8] = ["a", "b", "c", "d", "d/a", "d/b", "c/a", "c/d"];
/// Symlink targets, relative so they resolve inside the case's directory.
const TARGETS: [&str; 3] = ["a", "d", "d/b"];
/// Bytes a file may reach: past the 64 KiB inline limit and across 64 KiB chunks.
const SPAN: u64 = 200 * 1024;

#[derive(Clone, Debug)]
enum Op {
    /// open(O_CREAT | O_WRONLY | (excl? O_EXCL)), write `len` bytes of `fill`, close.
    Create {
        path: usize,
        excl: bool,
        len: u64,
        fill: u8,
    },
    /// open(O_WRONLY) without O_CREAT, pwrite, close.
    Write {
        path: usize,
        offset: u64,
        len: u64,
        fill: u8,
    },
    /// open(O_CREAT | O_TRUNC) as a shell's `>` does.
    Recreate {
        path: usize,
    },
    Truncate {
        path: usize,
        size: u64,
    },
    Unlink {
        path: usize,
    },
    Rename {
        from: usize,
        to: usize,
    },
    Mkdir {
        path: usize,
    },
    Rmdir {
        path: usize,
    },
    Link {
        from: usize,
        to: usize,
    },
    Symlink {
        target: usize,
        path: usize,
    },
    Chmod {
        path: usize,
        mode: u32,
    },
    Pause {
        ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0..PATHS.len();
    prop_oneof![
        3 => (p.clone(), any::<bool>(), 0..SPAN, any::<u8>())
            .prop_map(|(path, excl, len, fill)| Op::Create { path, excl, len, fill }),
        2 => (p.clone(), 0..SPAN, 1..SPAN / 2, any::<u8>())
            .prop_map(|(path, offset, len, fill)| Op::Write { path, offset, len, fill }),
        1 => p.clone().prop_map(|path| Op::Recreate { path }),
        1 => (p.clone(), 0..SPAN).prop_map(|(path, size)| Op::Truncate { path, size }),
        2 => p.clone().prop_map(|path| Op::Unlink { path }),
        2 => (p.clone(), p.clone()).prop_map(|(from, to)| Op::Rename { from, to }),
        2 => p.clone().prop_map(|path| Op::Mkdir { path }),
        1 => p.clone().prop_map(|path| Op::Rmdir { path }),
        1 => (p.clone(), p.clone()).prop_map(|(from, to)| Op::Link { from, to }),
        1 => (0..TARGETS.len(), p.clone()).prop_map(|(target, path)| Op::Symlink { target, path }),
        1 => (p, prop::sample::select(vec![0o600u32, 0o644, 0o700, 0o755]))
            .prop_map(|(path, mode)| Op::Chmod { path, mode }),
        // Around the committer's gather (25 ms): before it, just after, well after.
        3 => prop::sample::select(vec![5u64, 20, 30, 60]).prop_map(|ms| Op::Pause { ms }),
    ]
}

type Outcome = Result<(), i32>;

fn code(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

/// Run one step in `root`.
fn apply(root: &Path, op: &Op) -> Outcome {
    let at = |i: usize| root.join(PATHS[i]);
    let r: std::io::Result<()> = match *op {
        Op::Create {
            path,
            excl,
            len,
            fill,
        } => (|| {
            let mut o = OpenOptions::new();
            o.write(true);
            if excl {
                o.create_new(true);
            } else {
                o.create(true);
            }
            let f = o.open(at(path))?;
            f.write_all_at(&vec![fill; len as usize], 0)
        })(),
        Op::Write {
            path,
            offset,
            len,
            fill,
        } => (|| {
            let f = OpenOptions::new().write(true).open(at(path))?;
            f.write_all_at(&vec![fill; len as usize], offset)
        })(),
        Op::Recreate { path } => OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(at(path))
            .map(drop),
        Op::Truncate { path, size } => OpenOptions::new()
            .write(true)
            .open(at(path))
            .and_then(|f| f.set_len(size)),
        Op::Unlink { path } => fs::remove_file(at(path)),
        Op::Rename { from, to } => fs::rename(at(from), at(to)),
        Op::Mkdir { path } => fs::create_dir(at(path)),
        Op::Rmdir { path } => fs::remove_dir(at(path)),
        Op::Link { from, to } => fs::hard_link(at(from), at(to)),
        Op::Symlink { target, path } => std::os::unix::fs::symlink(TARGETS[target], at(path)),
        Op::Chmod { path, mode } => fs::set_permissions(at(path), fs::Permissions::from_mode(mode)),
        Op::Pause { ms } => {
            std::thread::sleep(Duration::from_millis(ms));
            Ok(())
        }
    };
    r.map_err(code)
}

/// What an application can see of one path.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Absent(i32),
    File {
        mode: u32,
        nlink: u64,
        content: Vec<u8>,
    },
    Dir {
        mode: u32,
        names: Vec<String>,
    },
    Symlink(PathBuf),
}

/// Every path's state; `list` also reads directories. Listing a delegated directory gives
/// its delegation back (the mount then commits what it holds), so steps are observed by
/// path only, which is also what the kernel's lookups see, and directories are listed once
/// the sequence is over.
fn observe(root: &Path, list: bool) -> BTreeMap<&'static str, Seen> {
    let mut out = BTreeMap::new();
    out.insert(".", observe_one(root, list));
    for p in PATHS {
        out.insert(p, observe_one(&root.join(p), list));
    }
    out
}

fn observe_one(p: &Path, list: bool) -> Seen {
    let meta = match fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Seen::Absent(libc::ENOENT),
        Err(e) => return Seen::Absent(code(e)),
    };
    let mode = meta.mode() & 0o7777;
    let ft = meta.file_type();
    if ft.is_symlink() {
        Seen::Symlink(fs::read_link(p).unwrap())
    } else if ft.is_dir() {
        let mut names: Vec<String> = match list.then(|| fs::read_dir(p)) {
            Some(Ok(rd)) => rd
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect(),
            Some(Err(e)) => vec![format!("<readdir: {e}>")],
            None => Vec::new(),
        };
        names.sort();
        Seen::Dir { mode, names }
    } else {
        let content = fs::read(p).unwrap_or_else(|e| format!("<read: {e}>").into_bytes());
        // Sizes and bytes both: a wrong size with right bytes (or the reverse) must show.
        assert_eq!(
            meta.len(),
            content.len() as u64,
            "{} size vs bytes",
            p.display()
        );
        Seen::File {
            mode,
            nlink: meta.nlink(),
            content,
        }
    }
}

/// A compact view of a difference: contents are summarised, not dumped.
fn describe(m: &BTreeMap<&str, Seen>) -> String {
    m.iter()
        .map(|(p, s)| match s {
            Seen::File {
                mode,
                nlink,
                content,
            } => format!(
                "{p}: file {mode:o} nlink {nlink} {} bytes {}",
                content.len(),
                &blake3::hash(content).to_hex()[..8]
            ),
            other => format!("{p}: {other:?}"),
        })
        .collect::<Vec<_>>()
        .join("\n  ")
}

fn run_sequence(mount: &Path, local: &Path, case: u64, ops: &[Op]) -> Result<(), TestCaseError> {
    let name = format!("case-{case}");
    // A directory this mount makes: its first create takes a delegation, so every step
    // below runs against the delegation's copy and the background committer.
    let (m, l) = (mount.join(&name), local.join(&name));
    fs::create_dir(&m).unwrap();
    fs::create_dir(&l).unwrap();
    for (i, op) in ops.iter().enumerate() {
        let (got, want) = (apply(&m, op), apply(&l, op));
        prop_assert_eq!(got, want, "step {} {:?}: mount vs local", i, op);
        let last = i + 1 == ops.len();
        let (got, want) = (observe(&m, last), observe(&l, last));
        if got != want {
            return Err(TestCaseError::fail(format!(
                "after step {i} {op:?} the trees differ\n mount:\n  {}\n local:\n  {}",
                describe(&got),
                describe(&want)
            )));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mount_behaves_like_a_local_directory() {
    let cases: u32 = env_or("MORTAR_MODEL_CASES", 2000u32);
    let seed: u64 = env_or("MORTAR_MODEL_SEED", rand::random());
    let cl = Cluster::start(3);
    // The smallest chunk size, so files of a few hundred KiB span several chunks.
    cl.create_volume("www", 64 * 1024).await;
    let m = cl.mount("www", "mnt", "").await;
    let local = tempfile::tempdir().unwrap();
    let (mount, local_path) = (m.path.clone(), local.path().to_path_buf());
    let result = tokio::task::spawn_blocking(move || {
        // The issue's own reproduction first, so a harness that could not see it fails here.
        let bug1 = [
            Op::Create {
                path: 0,
                excl: true,
                len: 3,
                fill: 1,
            },
            Op::Pause { ms: 60 },
            Op::Unlink { path: 0 },
            Op::Mkdir { path: 0 },
        ];
        if let Err(e) = run_sequence(&mount, &local_path, u64::MAX, &bug1) {
            panic!("the issue's reproduction: {e}");
        }
        let mut runner = runner(cases, seed, 2000);
        let counter = std::sync::atomic::AtomicU64::new(0);
        let r = runner.run(&prop::collection::vec(op(), 1..14), |ops| {
            let case = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            run_sequence(&mount, &local_path, case, &ops)
        });
        (r, counter.into_inner())
    })
    .await
    .unwrap();
    let (r, ran) = result;
    if let Err(e) = r {
        panic!("MORTAR_MODEL_SEED={seed} ({ran} sequences run, shrinking included): {e}");
    }
    // The cases really ran through the mount, under delegations.
    assert!(ran >= cases as u64, "{ran} sequences ran, {cases} asked");
    let log = fs::read_to_string(&m.log).unwrap_or_default();
    let granted = log.matches("directory delegated to this client").count();
    assert!(
        granted as u64 >= ran / 2,
        "only {granted} of {ran} case directories were delegated"
    );
    eprintln!("model: {ran} sequences from seed {seed} agreed with a local directory");
}

/// Two actors, each with a subtree of the case directory to itself, run one step each at the
/// same moment (two requests in flight through the mount, the delegation and its committer at
/// once); after every step each actor's mount must show both subtrees as the reference does:
/// what the other actor closed is visible (close-to-open).
fn run_concurrent(
    mounts: [&Path; 2],
    local: &Path,
    case: u64,
    steps: &[(Op, Op)],
) -> Result<(), TestCaseError> {
    const SUBTREES: [&str; 2] = ["x", "y"];
    let name = format!("pair-{case}");
    fs::create_dir(mounts[0].join(&name)).unwrap();
    fs::create_dir(local.join(&name)).unwrap();
    for (k, sub) in SUBTREES.iter().enumerate() {
        // Each actor makes its own subtree, so on two mounts each holds its delegation.
        fs::create_dir(mounts[k].join(&name).join(sub)).unwrap();
        fs::create_dir(local.join(&name).join(sub)).unwrap();
    }
    let at = |root: &Path, k: usize| root.join(&name).join(SUBTREES[k]);
    for (i, (a, b)) in steps.iter().enumerate() {
        let barrier = std::sync::Barrier::new(2);
        let (ra, rb) = std::thread::scope(|s| {
            let ta = s.spawn(|| {
                barrier.wait();
                apply(&at(mounts[0], 0), a)
            });
            let tb = s.spawn(|| {
                barrier.wait();
                apply(&at(mounts[1], 1), b)
            });
            (ta.join().unwrap(), tb.join().unwrap())
        });
        let (wa, wb) = (apply(&at(local, 0), a), apply(&at(local, 1), b));
        prop_assert_eq!(ra, wa, "step {} actor 0 {:?}", i, a);
        prop_assert_eq!(rb, wb, "step {} actor 1 {:?}", i, b);
        let last = i + 1 == steps.len();
        for (k, sub) in SUBTREES.iter().enumerate() {
            let want = observe(&at(local, k), last);
            for (viewer, mount) in mounts.iter().enumerate() {
                let got = observe(&at(mount, k), last);
                if got != want {
                    return Err(TestCaseError::fail(format!(
                        "after step {i} ({a:?} | {b:?}) actor {viewer}'s mount shows subtree {sub} differently\n mount:\n  {}\n local:\n  {}",
                        describe(&got),
                        describe(&want)
                    )));
                }
            }
        }
    }
    Ok(())
}

/// A proptest runner for `cases` sequences drawn from `seed` (replayable), persisting nothing.
fn runner(cases: u32, seed: u64, max_shrink_iters: u32) -> TestRunner {
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters,
        ..Config::default()
    };
    TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    )
}

/// Run `cases` concurrent sequences with actors on `mounts` (the same mount twice, or two).
fn concurrent_cases(mounts: [PathBuf; 2], local: PathBuf, cases: u32, seed: u64) -> u64 {
    let mut runner = runner(cases, seed, 500);
    let counter = std::sync::atomic::AtomicU64::new(0);
    let r = runner.run(&prop::collection::vec((op(), op()), 1..8), |steps| {
        let case = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        run_concurrent([&mounts[0], &mounts[1]], &local, case, &steps)
    });
    let ran = counter.into_inner();
    if let Err(e) = r {
        panic!("MORTAR_MODEL_SEED={seed} ({ran} sequences run, shrinking included): {e}");
    }
    ran
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Two actors (threads) on one mount. It found that a directory one thread made beneath a
/// delegation was later answered "no such name" by the mount's own cache, which still held
/// what it knew of the parent before the delegation (`MORTAR_MODEL_SEED=14877462345780871192`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_threads_on_one_mount_agree_with_the_model() {
    two_actors(false).await;
}

/// Two actors on two mounts of one volume: close-to-open across mounts, with delegations
/// recalled between them. It found that a mount kept "no such name" cached for a directory
/// another mount was then delegated, and so never asked for the names made there
/// (`MORTAR_MODEL_SEED=5218392213429655648`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_mounts_agree_with_the_model() {
    two_actors(true).await;
}

async fn two_actors(two_mounts: bool) {
    let cases: u32 = env_or("MORTAR_MODEL_CASES", 2000u32) / 4;
    let seed: u64 = env_or("MORTAR_MODEL_SEED", rand::random());
    let cl = Cluster::start(3);
    cl.create_volume("www", 64 * 1024).await;
    let a = cl.mount("www", "a", "").await;
    let b = cl.mount("www", "b", "").await;
    let local = tempfile::tempdir().unwrap();
    let (pa, pb, l) = (a.path.clone(), b.path.clone(), local.path().to_path_buf());
    let ran = tokio::task::spawn_blocking(move || {
        fs::create_dir(pa.join("t")).unwrap();
        let other = if two_mounts {
            pb.join("t")
        } else {
            pa.join("t")
        };
        concurrent_cases([pa.join("t"), other], l, cases, seed)
    })
    .await
    .unwrap();
    assert!(ran >= cases as u64);
    let log = fs::read_to_string(if two_mounts { &b.log } else { &a.log }).unwrap_or_default();
    assert!(
        log.contains("directory delegated to this client"),
        "the second actor's mount never held a delegation"
    );
    eprintln!(
        "model: {ran} two-actor sequences (two mounts: {two_mounts}) from seed {seed} agreed"
    );
}
