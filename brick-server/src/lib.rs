//! A mortar brick: stores chunks and a replica of the volume's metadata in RocksDB, replicates
//! chunk writes to its replica set, and runs the metadata group with openraft.

pub mod access;
pub mod background;
pub mod chunk;
pub mod coherence;
pub mod config;
pub mod heal;
pub mod lag;
pub mod log_bound;
pub mod membership;
pub mod metrics;
pub mod namespace;
pub mod proposals;
pub mod raft;
pub mod reconfigure;
pub mod release;
pub mod server;
pub mod snapshot;
pub mod space;
pub mod store;
pub mod watch;
