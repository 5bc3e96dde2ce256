//! The FUSE mount (`mortar-mount`, `mount.mortar`) over the volume client library in
//! `mortar-client`. Not built yet: it is the subject of the FUSE issue; the client library it
//! will adapt (connect, layout, chunked reads and writes, leader following) is complete.
