//! Shared by every mortar part: wire messages and framing, QUIC transport with mutual TLS,
//! identifiers, chunk placement and errno-carrying errors.

pub mod attrs;
pub mod chunk_map;
pub mod digest;
pub mod error;
pub mod layout;
pub mod logfile;
pub mod metrics;
pub mod options;
pub mod range;
pub mod replication;
pub mod timing;
pub mod tls;
pub mod transport;
pub mod types;
pub mod wire;

pub use chunk_map::{ChunkMap, ChunkPatch, MAX_FILE_SIZE};
pub use error::FsError;
pub use types::*;
