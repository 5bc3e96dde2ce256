//! A source tree on local disk, copied into a volume through the client library and compared
//! back entry by entry: bytes, kind, mode, owner, size, mtime, link counts, symlink targets and
//! user xattrs.

use futures::stream::{self, StreamExt, TryStreamExt};
use mortar_client::mortar_proto::wire::{SetAttr, TimeSet, XattrMode};
use mortar_client::mortar_proto::{Content, FileKind, InodeId, Timestamp, ROOT_INODE};
use mortar_client::Volume;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

pub struct TreeSpec {
    pub dirs: usize,
    pub small_files: usize,
    pub large_files: usize,
    pub symlinks: usize,
    pub hard_links: usize,
    pub xattr_files: usize,
}

impl TreeSpec {
    /// 2,500 regular files (many small, a few large) in 60 nested directories, plus symlinks
    /// and hard links: a web docroot's mix.
    pub fn docroot() -> TreeSpec {
        TreeSpec {
            dirs: 60,
            small_files: 2_492,
            large_files: 8,
            symlinks: 120,
            hard_links: 52,
            xattr_files: 200,
        }
    }
    pub fn entries(&self) -> usize {
        self.dirs + self.small_files + self.large_files + self.symlinks + self.hard_links
    }
}

/// Build the tree under `root` (which must exist), deterministically from `seed`.
pub fn make_tree(root: &Path, spec: &TreeSpec, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut dirs = vec![root.to_path_buf()];
    for i in 0..spec.dirs {
        let parent = dirs[rng.random_range(0..dirs.len())].clone();
        let d = parent.join(format!("dir{i}"));
        std::fs::create_dir(&d).unwrap();
        dirs.push(d);
    }
    let modes = [0o644, 0o600, 0o755, 0o640, 0o444];
    let mut files = Vec::new();
    for i in 0..spec.small_files + spec.large_files {
        let dir = &dirs[rng.random_range(0..dirs.len())];
        let size = if i < spec.large_files {
            // Unaligned sizes around and across chunk boundaries.
            [
                3_407_873,
                1 << 20,
                (1 << 20) + 1,
                2_621_440 - 7,
                5 << 20,
                1_048_575,
                70_000,
                4 << 20,
            ][i % 8]
        } else if rng.random_bool(0.7) {
            rng.random_range(0..8_000)
        } else if rng.random_bool(0.5) {
            rng.random_range(8_000..60_000)
        } else {
            // Past the inline limit: one chunk each.
            rng.random_range(66_000..120_000)
        };
        let mut data = vec![0u8; size];
        rng.fill_bytes(&mut data);
        let name = if i % 97 == 0 {
            format!("file {i} ü.php")
        } else {
            format!("file{i}.html")
        };
        let p = dir.join(name);
        std::fs::write(&p, &data).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(modes[i % modes.len()]))
            .unwrap();
        files.push(p);
    }
    for i in 0..spec.xattr_files.min(files.len()) {
        let p = &files[i * files.len() / spec.xattr_files.max(1)];
        xattr::set(p, "user.mortar.test", format!("value-{i}").as_bytes()).unwrap();
        if i % 3 == 0 {
            xattr::set(p, "user.empty", b"").unwrap();
        }
    }
    for i in 0..spec.hard_links {
        let target = &files[rng.random_range(0..files.len())];
        let dir = &dirs[rng.random_range(0..dirs.len())];
        std::fs::hard_link(target, dir.join(format!("hardlink{i}"))).unwrap();
    }
    for i in 0..spec.symlinks {
        let dir = &dirs[rng.random_range(0..dirs.len())];
        let target = if i % 5 == 0 {
            format!("../dangling{i}")
        } else {
            files[rng.random_range(0..files.len())]
                .display()
                .to_string()
        };
        std::os::unix::fs::symlink(target, dir.join(format!("link{i}"))).unwrap();
    }
    // Times last: creating children changes directory mtimes.
    let all: Vec<_> = walk(root);
    for (k, p) in all.iter().enumerate() {
        let secs = 1_600_000_000 + rng.random_range(0..100_000_000i64);
        let nanos = rng.random_range(0..1_000_000_000u32);
        let t = libc::timespec {
            tv_sec: secs,
            tv_nsec: nanos as i64,
        };
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        let times = [t, t];
        let rc = unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        assert_eq!(rc, 0, "utimensat {k}");
    }
}

/// The regular files under `root` (symlinks not followed), relative to it.
pub fn regular_files(root: &Path) -> Vec<std::path::PathBuf> {
    walk(root)
        .into_iter()
        .filter(|p| std::fs::symlink_metadata(p).unwrap().file_type().is_file())
        .map(|p| p.strip_prefix(root).unwrap().to_path_buf())
        .collect()
}

/// Every path under `root`, parents after their children (so directory times can be set last).
pub fn walk(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    fn rec(p: &Path, out: &mut Vec<std::path::PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for e in entries {
            if std::fs::symlink_metadata(&e).unwrap().is_dir() {
                rec(&e, out);
            }
            out.push(e);
        }
    }
    rec(root, &mut out);
    out
}

fn ts(m: &std::fs::Metadata) -> Timestamp {
    Timestamp {
        secs: m.mtime(),
        nanos: m.mtime_nsec() as u32,
    }
}

fn name_of(p: &Path) -> Vec<u8> {
    p.file_name().unwrap().as_encoded_bytes().to_vec()
}

/// Copy `src` into the volume's root directory.
pub async fn upload(vol: &Volume, src: &Path) {
    let links: Links = tokio::sync::Mutex::new(HashMap::new());
    upload_dir(vol, src, ROOT_INODE, &links).await;
}

/// Source inode -> volume inode of files with several names. Held across create so that two
/// names of one file, uploaded concurrently, make one inode.
type Links = tokio::sync::Mutex<HashMap<u64, InodeId>>;

fn upload_dir<'a>(
    vol: &'a Volume,
    dir: &'a Path,
    ino: InodeId,
    links: &'a Links,
) -> futures::future::BoxFuture<'a, ()> {
    Box::pin(async move {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        stream::iter(entries)
            .map(|p| async move {
                let p = p.as_path();
                let m = std::fs::symlink_metadata(p).unwrap();
                let name = name_of(p);
                let perm = m.mode() & 0o7777;
                if m.is_dir() {
                    let a = vol.mkdir(ino, &name, perm, m.uid(), m.gid()).await.unwrap();
                    upload_dir(vol, p, a.ino, links).await;
                    set_times(vol, a.ino, &m).await;
                } else if m.file_type().is_symlink() {
                    let target = std::fs::read_link(p).unwrap();
                    vol.symlink(
                        ino,
                        &name,
                        target.as_os_str().as_encoded_bytes(),
                        m.uid(),
                        m.gid(),
                    )
                    .await
                    .unwrap();
                } else {
                    let a = if m.nlink() > 1 {
                        let mut known = links.lock().await;
                        if let Some(target) = known.get(&m.ino()) {
                            vol.link(*target, ino, &name).await.unwrap();
                            return;
                        }
                        let a = vol
                            .create(ino, &name, perm, m.uid(), m.gid())
                            .await
                            .unwrap();
                        known.insert(m.ino(), a.ino);
                        a
                    } else {
                        vol.create(ino, &name, perm, m.uid(), m.gid())
                            .await
                            .unwrap()
                    };
                    let f = tokio::fs::File::open(p).await.unwrap();
                    vol.write_from(a.ino, f, false).await.unwrap();
                    for x in xattr::list(p).unwrap() {
                        let v = xattr::get(p, &x).unwrap().unwrap_or_default();
                        vol.setxattr(a.ino, x.as_encoded_bytes(), &v, XattrMode::Create)
                            .await
                            .unwrap();
                    }
                    set_times(vol, a.ino, &m).await;
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<()>>()
            .await;
        // Children changed this directory's mtime; set it again now they are done.
        if ino != ROOT_INODE {
            let m = std::fs::symlink_metadata(dir).unwrap();
            set_times(vol, ino, &m).await;
        }
    })
}

async fn set_times(vol: &Volume, ino: InodeId, m: &std::fs::Metadata) {
    let at = Timestamp {
        secs: m.atime(),
        nanos: m.atime_nsec() as u32,
    };
    let set = SetAttr {
        atime: Some(TimeSet::At(at)),
        mtime: Some(TimeSet::At(ts(m))),
        ..Default::default()
    };
    vol.setattr(ino, set).await.unwrap();
}

/// Compare the volume's root with `src`; returns the number of entries compared.
pub async fn verify(vol: &Volume, src: &Path) -> usize {
    verify_dir(vol, src, ROOT_INODE).await
}

fn verify_dir<'a>(
    vol: &'a Volume,
    dir: &'a Path,
    ino: InodeId,
) -> futures::future::BoxFuture<'a, usize> {
    Box::pin(async move {
        let listed: BTreeSet<Vec<u8>> = vol
            .readdir_all(ino)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        let expected: BTreeSet<Vec<u8>> = entries.iter().map(|p| name_of(p)).collect();
        assert_eq!(
            listed,
            expected,
            "directory listing differs for {}",
            dir.display()
        );
        let counts: Vec<usize> = stream::iter(entries)
            .map(|p| async move {
                let p = p.as_path();
                let m = std::fs::symlink_metadata(p).unwrap();
                let a = vol.lookup(ino, &name_of(p)).await.unwrap();
                let what = p.display();
                assert_eq!(a.perm, m.mode() & 0o7777, "mode of {what}");
                assert_eq!((a.uid, a.gid), (m.uid(), m.gid()), "owner of {what}");
                if m.is_dir() {
                    assert_eq!(a.kind, FileKind::Directory, "kind of {what}");
                    let n = verify_dir(vol, p, a.ino).await;
                    assert_eq!(a.mtime, ts(&m), "mtime of {what}");
                    return n + 1;
                }
                if m.file_type().is_symlink() {
                    assert_eq!(a.kind, FileKind::Symlink, "kind of {what}");
                    let target = std::fs::read_link(p).unwrap();
                    assert_eq!(
                        vol.readlink(a.ino).await.unwrap(),
                        target.as_os_str().as_encoded_bytes(),
                        "target of {what}"
                    );
                    return 1;
                }
                assert_eq!(a.kind, FileKind::Regular, "kind of {what}");
                assert_eq!(a.size, m.len(), "size of {what}");
                assert_eq!(a.nlink, m.nlink() as u32, "link count of {what}");
                assert_eq!(a.mtime, ts(&m), "mtime of {what}");
                let mut got = Vec::new();
                vol.read_to(a.ino, &mut got).await.unwrap();
                let want = std::fs::read(p).unwrap();
                assert!(
                    got == want,
                    "content of {what} differs ({} vs {} bytes)",
                    got.len(),
                    want.len()
                );
                let mut want_x: Vec<Vec<u8>> = xattr::list(p)
                    .unwrap()
                    .map(|x| x.as_encoded_bytes().to_vec())
                    .collect();
                want_x.sort();
                let mut got_x = vol.listxattr(a.ino).await.unwrap();
                got_x.sort();
                assert_eq!(got_x, want_x, "xattr names of {what}");
                for x in want_x {
                    let v = xattr::get(
                        p,
                        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&x),
                    )
                    .unwrap()
                    .unwrap_or_default();
                    assert_eq!(vol.getxattr(a.ino, &x).await.unwrap(), v, "xattr of {what}");
                }
                1
            })
            .buffer_unordered(16)
            .collect()
            .await;
        counts.into_iter().sum()
    })
}

/// Every chunk id the volume's metadata references.
pub async fn referenced_chunks(vol: &Volume) -> BTreeSet<mortar_client::mortar_proto::ChunkId> {
    let mut out = BTreeSet::new();
    let mut stack = vec![ROOT_INODE];
    while let Some(dir) = stack.pop() {
        let entries = vol.readdir_all(dir).await.unwrap();
        let inodes: Vec<_> = stream::iter(entries)
            .map(|e| async move { vol.inode(e.attr.ino).await })
            .buffer_unordered(16)
            .try_collect()
            .await
            .unwrap();
        for i in inodes {
            match i.content {
                Content::Chunks(c) => out.extend(c.ids().copied()),
                Content::None if i.attr.kind == FileKind::Directory => stack.push(i.attr.ino),
                _ => {}
            }
        }
    }
    out
}

/// What [`manifest`] gives: each entry's description by its path under the root.
pub type Manifest = std::collections::BTreeMap<std::path::PathBuf, String>;

/// Every entry under `root` (and `root` itself, as "."), as it is on disk: kind, mode, owner,
/// size, mtime to the nanosecond, and the bytes' hash or the symlink's target. Two trees with
/// equal manifests are byte- and attribute-identical (access and change times aside). Fails
/// rather than panics, so it can be polled while the tree changes.
pub fn manifest(root: &Path) -> std::io::Result<Manifest> {
    fn describe(p: &Path) -> std::io::Result<String> {
        let m = std::fs::symlink_metadata(p)?;
        let what = if m.file_type().is_symlink() {
            format!("-> {}", std::fs::read_link(p)?.display())
        } else if m.is_file() {
            blake3::hash(&std::fs::read(p)?).to_hex().to_string()
        } else {
            String::new()
        };
        let size = if m.is_dir() { 0 } else { m.size() };
        Ok(format!(
            "mode {:o} uid {} gid {} size {size} mtime {}.{:09} {what}",
            m.mode(),
            m.uid(),
            m.gid(),
            m.mtime(),
            m.mtime_nsec()
        ))
    }
    fn rec(root: &Path, dir: &Path, out: &mut Manifest) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            out.insert(p.strip_prefix(root).unwrap().to_path_buf(), describe(&p)?);
            if std::fs::symlink_metadata(&p)?.is_dir() {
                rec(root, &p, out)?;
            }
        }
        Ok(())
    }
    let mut out = Manifest::new();
    out.insert(".".into(), describe(root)?);
    rec(root, root, &mut out)?;
    Ok(out)
}

/// The entries of two manifests that differ, for a failure message (at most `max`).
pub fn manifest_diff(a: &Manifest, b: &Manifest, max: usize) -> Vec<String> {
    let keys: BTreeSet<_> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .take(max)
        .map(|k| format!("{}: {:?} vs {:?}", k.display(), a.get(k), b.get(k)))
        .collect()
}
