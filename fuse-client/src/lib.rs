//! The FUSE mount (`mortar-mount`, `mount.mortar`): a thin adapter (`fs`) over a filesystem
//! core (`core`) that holds open files, write buffers and directory snapshots on top of the
//! volume client library in `mortar-client`.

pub mod core;
pub mod fs;
pub mod metrics;
pub mod mount;
pub mod options;
