//! Issue 19: a power cut of two bricks loses nothing acknowledged. Two bricks store through
//! `lazyfs` (tests/src/bin/lazyfs.rs), which keeps file data in memory until it is fsynced;
//! killing it throws away everything unsynced, as a power cut does, and the brick restarts
//! on what reached the backing directory.

use mortar_tests::mortar_client::Volume;
use mortar_tests::mortar_proto::ROOT_INODE;
use mortar_tests::{bin, is_mounted, wait_for, Cluster, DEADLINE};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const CHUNK: u32 = 64 * 1024;

/// A lazyfs mount over `backing` at `mnt`; dropping it (or `cut`) kills it and unmounts.
struct LazyMount {
    backing: PathBuf,
    mnt: PathBuf,
    child: Option<Child>,
}

impl LazyMount {
    async fn start(root: &Path, name: &str) -> LazyMount {
        let backing = root.join(format!("{name}-disk"));
        let mnt = root.join(format!("{name}-lazy"));
        std::fs::create_dir_all(&backing).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let child = Command::new(bin("lazyfs"))
            .arg(&backing)
            .arg(&mnt)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn lazyfs");
        let m = mnt.clone();
        wait_for("lazyfs to mount", DEADLINE, || {
            let up = is_mounted(&m);
            async move { up.then_some(()) }
        })
        .await;
        LazyMount {
            backing,
            mnt,
            child: Some(child),
        }
    }

    /// Power off: every write not yet fsynced is gone.
    fn cut(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

impl Drop for LazyMount {
    fn drop(&mut self) {
        self.cut();
    }
}

fn body(name: &str, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    blake3::Hasher::new()
        .update(name.as_bytes())
        .finalize_xof()
        .fill(&mut b);
    b
}

async fn read_all(vol: &Volume, name: &str) -> Vec<u8> {
    let a = vol
        .lookup(ROOT_INODE, name.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{name} was acknowledged and is gone: {e}"));
    vol.read(a.ino, 0, a.size).await.unwrap()
}

/// Creates and fsynced writes acknowledged by the two bricks that then lose power (the third
/// was frozen throughout, so it never had them) are all there after they restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_of_two_bricks_loses_nothing_acknowledged() {
    let root = tempfile::Builder::new()
        .prefix("mortar-powercut-")
        .tempdir()
        .unwrap();
    let mut disks = vec![
        LazyMount::start(root.path(), "b0").await,
        LazyMount::start(root.path(), "b1").await,
    ];
    let mnts: Vec<PathBuf> = disks.iter().map(|d| d.mnt.join("brick")).collect();
    let mut c = Cluster::start_on(3, &[], |i| mnts.get(i).cloned());
    let vol = c.create_volume("www", CHUNK).await;

    // Only bricks 0 and 1 take part from here: each acknowledgement rests on their disks.
    c.bricks[2].freeze();
    let mut small = Vec::new();
    for i in 0..150 {
        let name = format!("small{i}");
        let a = vol
            .create(ROOT_INODE, name.as_bytes(), 0o644, 0, 0)
            .await
            .unwrap();
        let b = body(&name, 300 + i * 7);
        // Inline content is a metadata commit: acknowledged once on the quorum's logs.
        vol.write(a.ino, 0, &b, false).await.unwrap();
        small.push((name, b));
    }
    let mut synced = Vec::new();
    for i in 0..12 {
        let name = format!("synced{i}");
        let a = vol
            .create(ROOT_INODE, name.as_bytes(), 0o644, 0, 0)
            .await
            .unwrap();
        let b = body(&name, 5 * CHUNK as usize + 1234);
        vol.write(a.ino, 0, &b, true).await.unwrap();
        synced.push((name, b));
    }
    drop(vol);

    // Power off bricks 0 and 1 at once, then bring them back on what their disks kept.
    c.bricks[0].kill();
    c.bricks[1].kill();
    for d in &mut disks {
        d.cut();
    }
    for (i, d) in disks.iter().enumerate() {
        c.bricks[i].data = d.backing.join("brick");
        c.bricks[i].start();
    }
    c.bricks[2].thaw();

    let vol = c.client("www").await;
    for (name, b) in small.iter().chain(&synced) {
        assert_eq!(
            &read_all(&vol, name).await,
            b,
            "{name} differs after the power cut"
        );
    }
    let digests = c.settled_meta_digests().await;
    assert!(digests.iter().all(|d| *d == digests[0]), "{digests:?}");
    // The path under test was taken: the bricks really ran on lazyfs and really restarted.
    for i in 0..2 {
        assert!(
            std::fs::read_to_string(&c.bricks[i].log)
                .unwrap()
                .matches("brick serving")
                .count()
                == 2,
            "brick {i} did not restart"
        );
    }
}

/// A tmpfs of `size` at `dir`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Bricks on small filesystems that fill: writes get ENOSPC, mkdir, unlink and rm -rf still
/// work, no brick exits, everything acknowledged reads back, and writing works again once
/// deleted files' chunks are collected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_keeps_metadata_working_and_recovers() {
    use mortar_tests::mortar_proto::FsError;
    let root = tempfile::Builder::new()
        .prefix("mortar-full-")
        .tempdir()
        .unwrap();
    let disks: Vec<Tmpfs> = (0..3)
        .map(|i| Tmpfs::mount(root.path().join(format!("disk{i}")), "448m"))
        .collect();
    let dirs: Vec<PathBuf> = disks.iter().map(|d| d.0.join("brick")).collect();
    let mut c = Cluster::start_on(3, &["--reserve", "48M"], |i| dirs.get(i).cloned());
    let vol = c
        .create_volume("www", mortar_tests::mortar_proto::DEFAULT_CHUNK_SIZE)
        .await;

    // A directory of small files to rm -rf once the disks are full.
    let pre = vol.mkdir(ROOT_INODE, b"pre", 0o755, 0, 0).await.unwrap();
    for i in 0..30 {
        let name = format!("s{i}");
        let a = vol
            .create(pre.ino, name.as_bytes(), 0o644, 0, 0)
            .await
            .unwrap();
        vol.write(a.ino, 0, &body(&name, 500), false).await.unwrap();
    }

    // Fill: 2 MiB files until the bricks refuse.
    let mut acked = Vec::new();
    let refused = loop {
        let name = format!("big{}", acked.len());
        let a = vol
            .create(ROOT_INODE, name.as_bytes(), 0o644, 0, 0)
            .await
            .unwrap();
        let b = body(&name, 2 << 20);
        match vol.write(a.ino, 0, &b, false).await {
            Ok(_) => acked.push((name, b)),
            Err(e) => break (name, e),
        }
        assert!(acked.len() < 1000, "448 MiB disks never filled");
    };
    eprintln!(
        "{} files of 2 MiB acknowledged, then: {}",
        acked.len(),
        refused.1
    );
    assert!(matches!(refused.1, FsError::NoSpace(_)), "{}", refused.1);
    assert_eq!(refused.1.errno(), libc::ENOSPC);
    assert!(
        acked.len() >= 20,
        "only {} files before the disks filled",
        acked.len()
    );
    // Small files' content is data too.
    // Small files' content is data too. Free space moves around the bound as RocksDB rolls
    // its log, and the leader hears of its peers' disks once a second: small files may still
    // land for a while, but not for long.
    let mut small = Vec::new();
    let e = loop {
        let name = format!("tiny{}", small.len());
        let a = vol
            .create(ROOT_INODE, name.as_bytes(), 0o644, 0, 0)
            .await
            .unwrap();
        let b = body(&name, 60 * 1024);
        match vol.write(a.ino, 0, &b, false).await {
            Ok(_) => small.push((name, b)),
            Err(e) => {
                vol.unlink(ROOT_INODE, name.as_bytes()).await.unwrap();
                break e;
            }
        }
        assert!(small.len() < 2000, "small files never refused");
    };
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    eprintln!(
        "{} small files landed before they were refused",
        small.len()
    );
    acked.extend(small);

    // Metadata still works: mkdir, unlink, rm -rf.
    vol.mkdir(ROOT_INODE, b"made-when-full", 0o755, 0, 0)
        .await
        .unwrap();
    vol.unlink(ROOT_INODE, refused.0.as_bytes()).await.unwrap();
    for i in 0..30 {
        vol.unlink(pre.ino, format!("s{i}").as_bytes())
            .await
            .unwrap();
    }
    vol.rmdir(ROOT_INODE, b"pre").await.unwrap();
    for (i, b) in c.bricks.iter_mut().enumerate() {
        assert!(b.is_running(), "brick {i} exited on a full disk");
    }
    for (name, b) in &acked {
        assert_eq!(
            &read_all(&vol, name).await,
            b,
            "{name} differs on a full disk"
        );
    }

    // Free half, collect it, and writing works again by itself.
    let (gone, kept) = acked.split_at(acked.len() / 2);
    for (name, _) in gone {
        vol.unlink(ROOT_INODE, name.as_bytes()).await.unwrap();
    }
    let r = c.volume_cli("heal", &["--gc-grace", "0s"]);
    eprintln!("heal exit {}", r.code);
    let again = body("again", 2 << 20);
    let a = vol.create(ROOT_INODE, b"again", 0o644, 0, 0).await.unwrap();
    wait_for("writes to work again", DEADLINE, || {
        let (vol, again) = (&vol, &again);
        async move { vol.write(a.ino, 0, again, false).await.ok() }
    })
    .await;
    assert_eq!(read_all(&vol, "again").await, again);
    for (name, b) in kept {
        assert_eq!(
            &read_all(&vol, name).await,
            b,
            "{name} differs after the disk filled"
        );
    }
    for (i, b) in c.bricks.iter_mut().enumerate() {
        assert!(b.is_running(), "brick {i} exited");
    }
    drop(c);
    drop(disks);
}
