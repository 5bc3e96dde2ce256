//! The timeouts failover depends on, in one place, with the relations between them checked at
//! compile time. Each part uses them from here; docs/failover.md explains the timeline they
//! make.

use std::time::Duration;

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ---- QUIC transport ----

/// Keep-alives well inside the idle timeout, so a silent peer is noticed within seconds
/// instead of GlusterFS's 42-second ping timeout.
pub const KEEP_ALIVE: Duration = ms(300);
/// A connection silent this long is closed (a frozen or cut-off peer).
pub const IDLE_TIMEOUT: Duration = ms(1500);
pub const CONNECT_TIMEOUT: Duration = ms(1500);
/// After a failed connect, a brick is treated as down (requests fail at once) while a
/// background probe reconnects; probes back off from this delay up to [`MAX_PROBE_BACKOFF`].
pub const PROBE_BACKOFF: Duration = ms(250);
pub const MAX_PROBE_BACKOFF: Duration = ms(2000);
/// A brick that timed out is tried after healthy ones for this long (or until it answers),
/// so one slow answer does not demote it for good.
pub const SUSPECT_FOR: Duration = ms(3000);

// ---- The metadata group (Raft) ----

/// The leader's heartbeat to its followers.
pub const HEARTBEAT: Duration = ms(100);
/// A voter that heard from a leader this recently refuses to vote for anyone else (pre-vote
/// and real vote alike).
pub const LEADER_LEASE: Duration = ms(500);
/// A follower stands for election after `LEADER_LEASE + ELECTION_SLACK + jitter ×
/// ELECTION_SPREAD` without a leader.
pub const ELECTION_SLACK: Duration = ms(100);
pub const ELECTION_SPREAD: Duration = ms(200);
/// After a peer could not be reached at all (a refused or failed connect), the leader's next
/// message to it waits this long; a late answer waits for nothing but the next heartbeat.
pub const UNREACHABLE_RETRY: Duration = ms(250);
/// The longest a follower waits without a leader before it stands.
pub const ELECTION_WAIT_MAX: Duration = ms(LEADER_LEASE.as_millis() as u64
    + ELECTION_SLACK.as_millis() as u64
    + ELECTION_SPREAD.as_millis() as u64);

// ---- Watch leases (the coherence protocol) ----

/// How long a granted watch lease lasts, counted by the client from when it asked. A lease is
/// granted only after the leader confirmed its leadership with a quorum since the ask.
pub const WATCH_LEASE: Duration = ms(600);
/// How often a client renews its lease: several times per lease, so one slow renewal costs
/// nothing.
pub const RENEW_EVERY: Duration = ms(150);
/// A lease as the leader counts it: a little longer than the client does, for clock-rate
/// differences between hosts (5 %, and 20 ms).
pub const LEASE_MARGIN: Duration =
    ms(WATCH_LEASE.as_millis() as u64 + WATCH_LEASE.as_millis() as u64 / 20 + 20);
/// How long a new leader answers no change, from when it first leads: until every lease a
/// predecessor granted has run out. A grant needed a quorum's heartbeat answer after the
/// client asked; the new leader's electors each went a [`LEADER_LEASE`] without answering any
/// leader before their vote, and any two quorums share a voter. So every old lease ends by
/// `LEASE_MARGIN - LEADER_LEASE` (less 5 % for clock rates) after the election.
pub const NEW_TERM_WAIT: Duration = ms(LEASE_MARGIN.as_millis() as u64
    - LEADER_LEASE.as_millis() as u64
    + LEADER_LEASE.as_millis() as u64 / 20);

// ---- Namespace requests ----

/// How long a request waits at a brick for a leader (election) or a commit before the brick
/// answers "unavailable" and the client tries again, possibly elsewhere.
pub const META_TIMEOUT: Duration = ms(1500);
/// Per-hop timeout when a follower forwards a request to the leader.
pub const FORWARD_TIMEOUT: Duration = ms(1500);
/// How long one namespace request may take at one brick before the client tries another: a
/// frozen or cut-off brick costs at most this (retries are safe: changes carry an `OpId`).
pub const ATTEMPT_TIMEOUT: Duration = ms(2000);
/// A namespace request not answered within this is also sent to a second brick.
pub const META_HEDGE: Duration = ms(600);
/// Default for how long an operation keeps retrying (leader changes, bricks away) before it
/// fails with ENOTCONN; the mount's `op_timeout` option sets it.
pub const DEFAULT_OP_TIMEOUT: Duration = ms(30_000);

// ---- Chunks ----

/// A chunk read not answered within this is also asked of another replica.
pub const CHUNK_HEDGE: Duration = ms(300);
/// A brick's copy of a chunk to a peer replica; the write is answered at quorum before it.
pub const REPLICA_TIMEOUT: Duration = ms(3000);

const fn lt(a: Duration, b: Duration) -> bool {
    a.as_millis() < b.as_millis()
}

// The new term's wait is a lease less what the election itself already waited.
const _: () = assert!(lt(LEADER_LEASE, LEASE_MARGIN) && lt(NEW_TERM_WAIT, LEASE_MARGIN));
const _: () = assert!(!lt(
    WATCH_LEASE,
    Duration::from_millis(4 * RENEW_EVERY.as_millis() as u64)
));
// Several heartbeats fit in a lease, so a late one or two end nothing on a busy host.
const _: () = assert!(lt(
    Duration::from_millis(3 * HEARTBEAT.as_millis() as u64),
    LEADER_LEASE
));
// The followers hear a heartbeat at slightly different times: the first to stand must find
// the others' leases over too, or its pre-vote is refused and it waits a whole round more.
const _: () = assert!(!lt(ELECTION_SLACK, HEARTBEAT));
// A follower the leader once failed to reach hears it again before it would stand.
const _: () = assert!(lt(
    Duration::from_millis(UNREACHABLE_RETRY.as_millis() as u64 + HEARTBEAT.as_millis() as u64),
    Duration::from_millis(LEADER_LEASE.as_millis() as u64 + ELECTION_SLACK.as_millis() as u64)
));
// A request waiting at a brick for a leader outlives one election.
const _: () = assert!(lt(ELECTION_WAIT_MAX, META_TIMEOUT));
// The client hears a brick's "unavailable" (or a forwarded answer) before its attempt ends.
const _: () = assert!(lt(META_TIMEOUT, ATTEMPT_TIMEOUT));
const _: () = assert!(lt(FORWARD_TIMEOUT, ATTEMPT_TIMEOUT));
// The hedge goes out well before the attempt gives up on the first brick.
const _: () = assert!(lt(META_HEDGE, ATTEMPT_TIMEOUT));
// A silent peer is noticed by several missed keep-alives, not one.
const _: () = assert!(lt(
    Duration::from_millis(3 * KEEP_ALIVE.as_millis() as u64),
    IDLE_TIMEOUT
));
// An operation outlives many attempts (a leader change or two) before it fails.
const _: () = assert!(lt(
    Duration::from_millis(10 * ATTEMPT_TIMEOUT.as_millis() as u64),
    DEFAULT_OP_TIMEOUT
));
// A chunk read hedges well before a replica copy would time out.
const _: () = assert!(lt(CHUNK_HEDGE, REPLICA_TIMEOUT));
