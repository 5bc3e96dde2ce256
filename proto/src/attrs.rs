//! How attribute and xattr changes alter an inode. One definition for the namespace (which
//! applies them under Raft) and the client (which shows changes it holds back until a flush),
//! so both compute the same result.

use crate::wire::{MetaOp, SetAttr, TimeSet, XattrMode};
use crate::{
    Attr, Content, FileKind, FsError, Inode, InodeId, Timestamp, INLINE_MAX, XATTR_VALUE_MAX,
};

/// The POSIX access ACL, in the kernel's xattr format: a u32 version (2), then entries of
/// (u16 tag, u16 perm, u32 id), little-endian. Without kernel ACL support it reaches us as an
/// xattr; we keep it and the mode bits in step, as a Linux filesystem does (`cp -a` sets modes
/// through it).
pub const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
pub const ACL_USER_OBJ: u16 = 0x01;
pub const ACL_GROUP_OBJ: u16 = 0x04;
pub const ACL_MASK: u16 = 0x10;
pub const ACL_OTHER: u16 = 0x20;

fn acl_entries(value: &[u8]) -> Option<impl Iterator<Item = (usize, u16, u16)> + '_> {
    if value.len() < 4 || !(value.len() - 4).is_multiple_of(8) || value[..4] != 2u32.to_le_bytes() {
        return None;
    }
    Some(value[4..].chunks_exact(8).enumerate().map(|(i, e)| {
        (
            4 + i * 8,
            u16::from_le_bytes([e[0], e[1]]),
            u16::from_le_bytes([e[2], e[3]]),
        )
    }))
}

/// The rwx bits an access ACL implies (the mask stands for the group bits when present).
pub fn acl_mode(value: &[u8]) -> Option<u32> {
    let (mut user, mut group, mut mask, mut other) = (None, None, None, None);
    for (_, tag, perm) in acl_entries(value)? {
        let p = Some((perm & 7) as u32);
        match tag {
            ACL_USER_OBJ => user = p,
            ACL_GROUP_OBJ => group = p,
            ACL_MASK => mask = p,
            ACL_OTHER => other = p,
            _ => {}
        }
    }
    Some(user? << 6 | mask.or(group)? << 3 | other?)
}

/// Rewrite an access ACL's owner, group (or mask) and other entries after a chmod.
fn acl_chmod(value: &mut [u8], perm: u32) {
    let has_mask = acl_entries(value).is_some_and(|mut it| it.any(|(_, t, _)| t == ACL_MASK));
    let Some(entries) = acl_entries(value) else {
        return;
    };
    let updates: Vec<(usize, u16)> = entries
        .filter_map(|(at, tag, _)| match tag {
            ACL_USER_OBJ => Some((at, (perm >> 6) & 7)),
            ACL_MASK => Some((at, (perm >> 3) & 7)),
            ACL_GROUP_OBJ if !has_mask => Some((at, (perm >> 3) & 7)),
            ACL_OTHER => Some((at, perm & 7)),
            _ => None,
        })
        .map(|(at, p)| (at, p as u16))
        .collect();
    for (at, p) in updates {
        value[at + 2..at + 4].copy_from_slice(&p.to_le_bytes());
    }
}

pub fn check_xattr_name(name: &[u8]) -> Result<(), FsError> {
    if name.is_empty() || name.contains(&0) {
        return Err(FsError::Invalid("empty xattr name".into()));
    }
    if name.len() > 255 {
        return Err(FsError::NameTooLong);
    }
    Ok(())
}

/// Why a `setxattr` would fail whatever the inode holds (name, size, ACL format).
pub fn check_xattr(name: &[u8], value: &[u8]) -> Result<(), FsError> {
    check_xattr_name(name)?;
    if value.len() > XATTR_VALUE_MAX {
        return Err(FsError::TooLarge(format!(
            "xattr value of {} bytes",
            value.len()
        )));
    }
    if name == ACL_ACCESS && acl_mode(value).is_none() {
        return Err(FsError::Invalid("malformed POSIX ACL".into()));
    }
    Ok(())
}

/// Why a regular file's new size and content would be refused whatever the file holds.
pub fn check_content(size: u64, content: &Content) -> Result<(), FsError> {
    crate::chunk_map::check_size(size)?;
    match content {
        Content::Inline(b) if b.len() > INLINE_MAX => Err(FsError::Invalid(format!(
            "inline content of {} bytes exceeds the {INLINE_MAX}-byte limit",
            b.len()
        ))),
        Content::Inline(b) if b.len() as u64 != size => Err(FsError::Invalid(
            "inline content length differs from size".into(),
        )),
        Content::Chunks(m) if m.len() > crate::chunk_map::MAX_STORED_CHUNKS => {
            Err(FsError::FileTooBig(size))
        }
        Content::Inline(_) | Content::Chunks(_) => Ok(()),
        _ => Err(FsError::Invalid(
            "file content must be inline or chunks".into(),
        )),
    }
}

fn resolve(t: TimeSet, now: Timestamp) -> Timestamp {
    match t {
        TimeSet::Now => now,
        TimeSet::At(ts) => ts,
    }
}

impl Attr {
    /// A new inode's attributes as a create makes them.
    pub fn new(
        ino: InodeId,
        kind: FileKind,
        perm: u32,
        uid: u32,
        gid: u32,
        now: Timestamp,
    ) -> Attr {
        Attr {
            ino,
            kind,
            perm: perm & 0o7777,
            uid,
            gid,
            size: 0,
            nlink: if kind == FileKind::Directory { 2 } else { 1 },
            rdev: 0,
            atime: now,
            mtime: now,
            ctime: now,
            version: 0,
        }
    }

    /// A directory gained or lost an entry (`nlink_delta` counts subdirectories).
    pub fn touch_dir(&mut self, nlink_delta: i32, now: Timestamp) {
        self.nlink = (self.nlink as i64 + nlink_delta as i64).max(0) as u32;
        self.mtime = now;
        self.ctime = now;
    }
}

impl Inode {
    /// What a create (Mknod, Mkdir, Symlink) makes, numbered `ino`: its parent, its name and
    /// the new inode (None for any other change). The namespace and a client holding a
    /// delegation both make new inodes with this.
    pub fn created_by(
        op: &MetaOp,
        ino: InodeId,
        now: Timestamp,
    ) -> Option<(InodeId, &[u8], Inode)> {
        let (parent, name, attr, content) = match op {
            MetaOp::Mknod {
                parent,
                name,
                kind,
                perm,
                uid,
                gid,
                rdev,
                ..
            } => {
                let mut attr = Attr::new(ino, *kind, *perm, *uid, *gid, now);
                attr.rdev = *rdev;
                let content = match kind {
                    FileKind::Regular => Content::Inline(Vec::new()),
                    _ => Content::None,
                };
                (parent, name, attr, content)
            }
            MetaOp::Mkdir {
                parent,
                name,
                perm,
                uid,
                gid,
            } => (
                parent,
                name,
                Attr::new(ino, FileKind::Directory, *perm, *uid, *gid, now),
                Content::None,
            ),
            MetaOp::Symlink {
                parent,
                name,
                target,
                uid,
                gid,
            } => {
                let mut attr = Attr::new(ino, FileKind::Symlink, 0o777, *uid, *gid, now);
                attr.size = target.len() as u64;
                (parent, name, attr, Content::Symlink(target.clone()))
            }
            _ => return None,
        };
        let inode = Inode {
            attr,
            content,
            xattrs: Vec::new(),
        };
        Some((*parent, name.as_slice(), inode))
    }

    /// A regular file's new content: size and times follow, and the version moves on so
    /// concurrent writers notice.
    pub fn set_content(&mut self, size: u64, content: Content, now: Timestamp) {
        self.content = content;
        self.attr.size = size;
        self.attr.mtime = now;
        self.attr.ctime = now;
        self.attr.version += 1;
    }

    /// A change of this one inode (SetAttr, SetXattr, RemoveXattr, SetContent of a regular
    /// file at its version) as the namespace applies it; anything else is refused.
    pub fn apply_change(&mut self, op: &MetaOp, now: Timestamp) -> Result<(), FsError> {
        match op {
            MetaOp::SetAttr { set, .. } => self.set_attr(set, now),
            MetaOp::SetXattr {
                name, value, mode, ..
            } => self.set_xattr(name, value, *mode, now)?,
            MetaOp::RemoveXattr { name, .. } => self.remove_xattr(name, now)?,
            MetaOp::SetContent {
                expect_version,
                size,
                content,
                ..
            } => {
                match self.attr.kind {
                    FileKind::Regular => {}
                    FileKind::Directory => return Err(FsError::IsDir),
                    _ => return Err(FsError::Invalid("not a regular file".into())),
                }
                if self.attr.version != *expect_version {
                    return Err(FsError::Conflict(self.attr.version));
                }
                check_content(*size, content)?;
                self.set_content(*size, content.clone(), now);
            }
            other => {
                return Err(FsError::Invalid(format!(
                    "not a change of one inode: {other:?}"
                )))
            }
        }
        Ok(())
    }

    /// Take what a run of changes under a delegation made of this inode, `to`
    /// ([`MetaOp::SetInode`]), if nobody changed it since `expect_version`: mode, owner,
    /// times, xattrs and, for a regular file, size, content and version. Its number, kind,
    /// links and device stay, and so does anything else's content. Refused unless `to` is
    /// what such changes can make (the same checks as each change).
    pub fn set_whole(&mut self, expect_version: u64, to: &Inode) -> Result<(), FsError> {
        let invalid = |why: &str| Err(FsError::Invalid(format!("inode {}: {why}", to.attr.ino)));
        if to.attr.ino != self.attr.ino || to.attr.kind != self.attr.kind {
            return invalid("its number and kind cannot change");
        }
        if self.attr.version != expect_version {
            return Err(FsError::Conflict(self.attr.version));
        }
        for (name, value) in &to.xattrs {
            check_xattr(name, value)?;
        }
        if !to.xattrs.windows(2).all(|w| w[0].0 < w[1].0) {
            return invalid("xattrs must be sorted by name, each name once");
        }
        let acl = to.xattrs.iter().find(|(n, _)| n == ACL_ACCESS);
        if acl.is_some_and(|(_, v)| acl_mode(v) != Some(to.attr.perm & 0o777)) {
            return invalid("mode bits and the access ACL differ");
        }
        let new_content = to.content != self.content || to.attr.size != self.attr.size;
        if self.attr.kind == FileKind::Regular {
            if new_content {
                check_content(to.attr.size, &to.content)?;
            }
            if to.attr.version < expect_version + u64::from(new_content) {
                return invalid("new content needs a new version");
            }
            self.content = to.content.clone();
            self.attr.size = to.attr.size;
            self.attr.version = to.attr.version;
        } else if new_content || to.attr.version != expect_version {
            return invalid("only a regular file's content changes");
        }
        let (attr, from) = (&mut self.attr, &to.attr);
        attr.perm = from.perm & 0o7777;
        attr.uid = from.uid;
        attr.gid = from.gid;
        attr.atime = from.atime;
        attr.mtime = from.mtime;
        attr.ctime = from.ctime;
        self.xattrs = to.xattrs.clone();
        Ok(())
    }

    /// chmod, chown, utimens: the attributes change, ctime becomes `now`, and a chmod keeps
    /// the access ACL in step.
    pub fn set_attr(&mut self, set: &SetAttr, now: Timestamp) {
        let attr = &mut self.attr;
        if let Some(p) = set.perm {
            attr.perm = p & 0o7777;
            if let Some((_, acl)) = self.xattrs.iter_mut().find(|(n, _)| n == ACL_ACCESS) {
                acl_chmod(acl, p);
            }
        }
        if let Some(u) = set.uid {
            attr.uid = u;
        }
        if let Some(g) = set.gid {
            attr.gid = g;
        }
        if let Some(t) = set.atime {
            attr.atime = resolve(t, now);
        }
        if let Some(t) = set.mtime {
            attr.mtime = resolve(t, now);
        }
        attr.ctime = now;
    }

    /// setxattr; setting the access ACL also sets the mode bits.
    pub fn set_xattr(
        &mut self,
        name: &[u8],
        value: &[u8],
        mode: XattrMode,
        now: Timestamp,
    ) -> Result<(), FsError> {
        check_xattr(name, value)?;
        let pos = self.xattrs.iter().position(|(n, _)| n == name);
        match (pos, mode) {
            (Some(_), XattrMode::Create) => return Err(FsError::Exists),
            (None, XattrMode::Replace) => return Err(FsError::NoXattr),
            (Some(i), _) => self.xattrs[i].1 = value.to_vec(),
            (None, _) => {
                self.xattrs.push((name.to_vec(), value.to_vec()));
                self.xattrs.sort();
            }
        }
        if let Some(bits) = (name == ACL_ACCESS).then(|| acl_mode(value)).flatten() {
            self.attr.perm = (self.attr.perm & !0o777) | bits;
        }
        self.attr.ctime = now;
        Ok(())
    }

    pub fn remove_xattr(&mut self, name: &[u8], now: Timestamp) -> Result<(), FsError> {
        check_xattr_name(name)?;
        let pos = self
            .xattrs
            .iter()
            .position(|(n, _)| n == name)
            .ok_or(FsError::NoXattr)?;
        self.xattrs.remove(pos);
        self.attr.ctime = now;
        Ok(())
    }
}
