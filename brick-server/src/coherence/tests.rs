//! The coherence state machine under virtual time: every instant is `t0 + offset`.

use super::*;
use proptest::prelude::*;

const TERM: u64 = 3;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn op(client: u128, seq: u64) -> OpId {
    OpId { client, seq }
}

fn items() -> Vec<Inval> {
    vec![Inval::Entry(1, b"index.html".to_vec())]
}

/// A leader that has led for longer than a lease, with watchers of clients 1..=n holding
/// leases, at `now`.
fn leading(n: u128) -> (Coherence, Instant, Vec<SessionId>) {
    let t0 = Instant::now();
    let mut c = Coherence::default();
    assert!(
        c.settled(TERM, 0, t0).is_err(),
        "a new leader waits out old leases"
    );
    assert!(c.settled(TERM, 0, t0 + NEW_TERM_WAIT - ms(1)).is_err());
    let now = t0 + NEW_TERM_WAIT;
    assert_eq!(c.settled(TERM, 0, now), Ok(()));
    let sids: Vec<SessionId> = (1..=n).map(|client| c.open(client, now)).collect();
    for sid in &sids {
        assert!(c.renew(*sid, now));
    }
    (c, now, sids)
}

fn seq_of(msg: &WatchDown) -> u64 {
    match msg {
        WatchDown::Invalidate { seq, .. } | WatchDown::Recall { seq, .. } => *seq,
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_change_waits_for_every_other_watcher_and_not_for_its_own_client() {
    let (mut c, now, sids) = leading(3);
    c.await_outcome(op(1, 7));
    let sent = c.applied(10, Some(op(1, 7)), &items(), now);
    let to: Vec<SessionId> = sent.iter().map(|(sid, _)| *sid).collect();
    assert_eq!(
        to,
        vec![sids[1], sids[2]],
        "client 1 learns from its answer"
    );
    assert_eq!(c.settled(TERM, 10, now), Err(now + LEASE_MARGIN));
    c.ack(sent[0].0, seq_of(&sent[0].1));
    assert!(c.settled(TERM, 10, now).is_err());
    c.ack(sent[1].0, seq_of(&sent[1].1));
    assert_eq!(c.settled(TERM, 10, now), Ok(()));
    c.outcome_sent(op(1, 7));
}

#[test]
fn a_change_applied_after_its_request_gave_up_reaches_its_own_client_too() {
    let (mut c, now, sids) = leading(2);
    c.await_outcome(op(1, 7));
    c.outcome_sent(op(1, 7)); // the request timed out before the commit
    let sent = c.applied(10, Some(op(1, 7)), &items(), now + ms(2000));
    let to: Vec<SessionId> = sent.iter().map(|(sid, _)| *sid).collect();
    assert_eq!(to, sids, "nobody else will tell client 1 of its own change");
}

#[test]
fn a_silent_watcher_holds_changes_back_for_at_most_its_lease() {
    let (mut c, now, sids) = leading(2);
    let later = now + ms(100);
    let sent = c.applied(10, None, &items(), later);
    // Client 1 acknowledges; client 2 is frozen.
    c.ack(sids[0], seq_of(&sent[0].1));
    let until = now + LEASE_MARGIN;
    assert_eq!(c.settled(TERM, 10, later), Err(until));
    // Its renewals are refused while the invalidation is unacknowledged; the other's go on.
    assert!(!c.renew(sids[1], later + ms(50)));
    assert!(c.renew(sids[0], later + ms(50)));
    assert_eq!(c.settled(TERM, 10, until), Ok(()));
    // Later changes do not wait for it at all.
    let sent = c.applied(11, None, &items(), until + ms(1));
    c.ack(sids[0], seq_of(&sent[0].1));
    assert_eq!(c.settled(TERM, 11, until + ms(1)), Ok(()));
}

fn c_first(sent: &[(SessionId, WatchDown)], sid: SessionId) -> WatchDown {
    sent.iter().find(|(s, _)| *s == sid).unwrap().1.clone()
}

#[test]
fn a_watcher_that_catches_up_is_renewed_and_waited_for_again() {
    let (mut c, now, sids) = leading(2);
    let first = c.applied(10, None, &items(), now);
    let second = c.applied(11, None, &items(), now + ms(10));
    for (sid, msg) in first.iter().chain(&second) {
        if *sid == sids[0] {
            c.ack(*sid, seq_of(msg));
        }
    }
    let thawed = now + ms(3000);
    assert_eq!(c.settled(TERM, 11, thawed), Ok(()), "its lease ran out");
    assert!(!c.renew(sids[1], thawed));
    c.ack(sids[1], seq_of(&c_first(&first, sids[1])));
    assert!(!c.renew(sids[1], thawed), "one of two acknowledged");
    c.ack(sids[1], seq_of(&c_first(&second, sids[1])));
    assert!(c.renew(sids[1], thawed));
    let sent = c.applied(12, None, &items(), thawed);
    c.ack(sids[0], seq_of(&c_first(&sent, sids[0])));
    assert_eq!(c.settled(TERM, 12, thawed), Err(thawed + LEASE_MARGIN));
}

#[test]
fn an_invalidation_crossing_a_renewal_refuses_only_that_renewal() {
    let (mut c, now, sids) = leading(1);
    let sent = c.applied(10, None, &items(), now + ms(100));
    // The renewal was sent before the invalidation arrived, and reaches the leader after it
    // was sent: the client may not have dropped the entry yet.
    assert!(!c.renew(sids[0], now + ms(101)));
    c.ack(sids[0], seq_of(&sent[0].1));
    assert!(c.renew(sids[0], now + ms(350)));
}

#[test]
fn a_watcher_silent_past_give_up_is_closed_and_its_messages_forgotten() {
    let (mut c, now, sids) = leading(2);
    let sent = c.applied(10, None, &items(), now);
    c.ack(sids[0], seq_of(&sent[0].1));
    assert_eq!(c.next_deadline(), Some(now + GIVE_UP));
    assert!(c.expire(now + GIVE_UP - ms(1)).is_empty());
    assert_eq!(c.expire(now + GIVE_UP), vec![sids[1]]);
    assert!(!c.is_open(sids[1]));
    assert_eq!(c.next_deadline(), None);
    assert!(!c.renew(sids[1], now + GIVE_UP));
}

#[test]
fn a_watch_that_ends_holds_changes_back_until_its_lease_ends() {
    let (mut c, now, sids) = leading(2);
    assert!(c.renew(sids[1], now + ms(500)));
    c.close(sids[1], now + ms(600));
    let sent = c.applied(10, None, &items(), now + ms(600));
    assert_eq!(sent.len(), 1, "only the open watch is told");
    c.ack(sids[0], seq_of(&sent[0].1));
    let until = now + ms(500) + LEASE_MARGIN;
    assert_eq!(c.settled(TERM, 10, now + ms(600)), Err(until));
    assert_eq!(c.settled(TERM, 10, until), Ok(()));
}

#[test]
fn a_new_term_waits_out_the_leases_of_the_last() {
    let (mut c, now, _) = leading(1);
    let elected = now + ms(5000);
    assert_eq!(
        c.settled(TERM + 1, 20, elected),
        Err(elected + NEW_TERM_WAIT)
    );
    assert_eq!(c.settled(TERM + 1, 20, elected + NEW_TERM_WAIT), Ok(()));
}

#[test]
fn changes_without_items_ask_nobody() {
    let (mut c, now, _) = leading(2);
    assert!(c.applied(10, None, &[], now).is_empty());
    assert_eq!(c.settled(TERM, 10, now), Ok(()));
}

/// Client 1 holds directory 50 (in parent 1); client 2's requests naming it recall it.
fn delegated() -> (Coherence, Instant, Vec<SessionId>) {
    let (mut c, now, sids) = leading(2);
    c.delegate(1, 50, now, || Ok(Some(1))).unwrap();
    assert!(c.delegates_in(1));
    (c, now, sids)
}

fn names(inos: &[InodeId]) -> Named {
    Named {
        inos: inos.to_vec(),
        ..Named::default()
    }
}

#[test]
fn a_request_naming_a_delegated_directory_waits_for_its_recall() {
    let (mut c, now, sids) = delegated();
    // The holder's own requests go ahead.
    assert_eq!(c.admit(Some(1), &names(&[50]), now), Admit::Go(vec![50]));
    c.done(&[50]);
    let Admit::Wait(sent, until) = c.admit(Some(2), &names(&[50]), now) else {
        panic!("no recall")
    };
    assert_eq!(until, now + RECALL_WAIT);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, sids[0]);
    assert!(matches!(sent[0].1, WatchDown::Recall { dir: 50, .. }));
    // Asking again sends no second recall.
    let Admit::Wait(again, _) = c.admit(Some(2), &names(&[50]), now + ms(10)) else {
        panic!("went ahead before the recall was answered")
    };
    assert!(again.is_empty());
    // A recall being answered does not stop the holder's renewals.
    assert!(c.renew(sids[0], now + ms(20)));
    c.ack(sids[0], seq_of(&sent[0].1));
    assert!(!c.delegates_in(1));
    assert_eq!(c.admit(Some(2), &names(&[50]), now), Admit::Go(vec![50]));
}

#[test]
fn a_snapshot_recalls_every_delegation_and_none_is_granted_while_it_runs() {
    let (mut c, now, sids) = delegated();
    let everything = Named {
        everything: true,
        ..Named::default()
    };
    let Admit::Wait(sent, _) = c.admit(None, &everything, now) else {
        panic!("went ahead with a delegation held")
    };
    assert!(matches!(sent[..], [(sid, WatchDown::Recall { dir: 50, .. })] if sid == sids[0]));
    c.ack(sids[0], seq_of(&sent[0].1));
    let Admit::Go(inos) = c.admit(None, &everything, now) else {
        panic!("waited with nothing delegated")
    };
    assert!(matches!(
        c.delegate(1, 60, now, || Ok(Some(1))),
        Err(FsError::Busy(_))
    ));
    c.done(&inos);
    c.delegate(1, 60, now, || Ok(Some(1))).unwrap();
}

#[test]
fn a_delegated_tree_is_recalled_whole_at_its_first_look() {
    let (mut c, now, sids) = delegated();
    // 51 and 52 beneath 50, held by client 1; 60 elsewhere by client 2.
    c.delegate(1, 51, now, || Ok(Some(50))).unwrap();
    c.delegate(1, 52, now, || Ok(Some(51))).unwrap();
    c.delegate(1, 53, now, || Ok(Some(50))).unwrap();
    c.delegate(2, 60, now, || Ok(Some(1))).unwrap();
    let Admit::Wait(sent, _) = c.admit(Some(2), &names(&[52]), now) else {
        panic!("no recall")
    };
    let mut recalled: Vec<InodeId> = sent
        .iter()
        .map(|(sid, m)| {
            assert_eq!(*sid, sids[0]);
            match m {
                WatchDown::Recall { dir, .. } => *dir,
                other => panic!("unexpected {other:?}"),
            }
        })
        .collect();
    recalled.sort_unstable();
    assert_eq!(recalled, vec![50, 51, 52, 53]);
    // The request waits only for what it names; the others come back as they are answered.
    let seq52 = sent
        .iter()
        .find(|(_, m)| matches!(m, WatchDown::Recall { dir: 52, .. }))
        .map(|(_, m)| seq_of(m))
        .unwrap();
    c.ack(sids[0], seq52);
    assert_eq!(c.admit(Some(2), &names(&[52]), now), Admit::Go(vec![52]));
    c.done(&[52]);
    // A look at 51 now sends no second recall: it is on its way.
    assert!(matches!(c.admit(Some(2), &names(&[51]), now), Admit::Wait(s, _) if s.is_empty()));
    for (sid, m) in &sent {
        c.ack(*sid, seq_of(m));
    }
    assert!(
        !c.delegates_in(50) && c.delegates_in(1),
        "client 2's delegation stays"
    );
}

#[test]
fn a_listing_of_the_parent_recalls_the_delegation() {
    let (mut c, now, _) = delegated();
    let listing = Named {
        inos: vec![1],
        listed: vec![1],
        ..Named::default()
    };
    assert!(matches!(c.admit(Some(2), &listing, now), Admit::Wait(s, _) if s.len() == 1));
}

#[test]
fn a_holder_that_does_not_answer_a_recall_is_waited_out() {
    let (mut c, now, sids) = delegated();
    assert!(c.renew(sids[0], now + ms(200)));
    let Admit::Wait(_, until) = c.admit(Some(2), &names(&[50]), now) else {
        panic!("no recall")
    };
    assert_eq!(c.expire(until), vec![sids[0]]);
    // Its lease ended long ago here, so nothing is left to wait for.
    assert_eq!(c.admit(Some(2), &names(&[50]), until), Admit::Go(vec![50]));
}

#[test]
fn a_holder_whose_watch_broke_keeps_its_delegation_for_the_grace_period() {
    let (mut c, now, sids) = delegated();
    c.close(sids[0], now + ms(400));
    let by = now + ms(400) + RECLAIM_GRACE;
    // Nobody else may look meanwhile, or be delegated the directory.
    assert!(
        matches!(c.admit(Some(2), &names(&[50]), now + ms(500)), Admit::Wait(s, t) if s.is_empty() && t == by)
    );
    assert!(c.delegate(2, 50, now + ms(500), || Ok(Some(1))).is_err());
    assert!(c.take_ended().is_empty());
    // Past the grace period it ends, and is to be recorded as ended.
    assert_eq!(c.admit(Some(2), &names(&[50]), by), Admit::Go(vec![50]));
    assert_eq!(c.take_ended(), vec![50]);
}

#[test]
fn a_holder_that_says_goodbye_gives_everything_back_at_once() {
    let (mut c, now, sids) = delegated();
    c.bye(sids[0]);
    c.close(sids[0], now);
    assert_eq!(c.take_ended(), vec![50]);
    assert_eq!(c.admit(Some(2), &names(&[50]), now), Admit::Go(vec![50]));
}

#[test]
fn a_holder_that_watches_again_is_recalled_through_its_new_watch() {
    let (mut c, now, sids) = delegated();
    c.close(sids[0], now);
    let back = c.open(1, now + ms(2500));
    let Admit::Wait(sent, _) = c.admit(Some(2), &names(&[50]), now + ms(2600)) else {
        panic!("went ahead before the holder gave the directory back")
    };
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, back);
    c.ack(back, seq_of(&sent[0].1));
    assert_eq!(
        c.admit(Some(2), &names(&[50]), now + ms(2600)),
        Admit::Go(vec![50])
    );
    assert_eq!(c.take_ended(), vec![50]);
}

#[test]
fn a_new_leader_adopts_recorded_delegations_and_waits_for_their_holders() {
    let t0 = Instant::now();
    let mut c = Coherence::default();
    let recorded = [
        Recorded {
            dir: 50,
            client: 1,
            parent: 1,
        },
        Recorded {
            dir: 70,
            client: 1,
            parent: 1,
        },
    ];
    c.adopt(TERM, &recorded, t0);
    assert!(c.adopted(TERM));
    assert!(c.delegates_in(1));
    // Adopting again in the same term changes nothing (the holder may have given one back).
    let reader = c.open(2, t0);
    assert!(matches!(c.admit(Some(2), &names(&[70]), t0), Admit::Wait(s, _) if s.is_empty()));
    let holder = c.open(1, t0 + ms(3000));
    c.adopt(TERM, &recorded, t0 + ms(3000));
    let Admit::Wait(sent, _) = c.admit(Some(2), &names(&[70]), t0 + ms(3000)) else {
        panic!("no recall through the holder's new watch")
    };
    let dirs: Vec<InodeId> = sent
        .iter()
        .map(|(sid, m)| {
            assert_eq!(*sid, holder);
            match m {
                WatchDown::Recall { dir, .. } => *dir,
                other => panic!("unexpected {other:?}"),
            }
        })
        .collect();
    assert_eq!(
        dirs,
        vec![70],
        "only what is asked for (50 and 70 are siblings)"
    );
    c.ack(holder, seq_of(&sent[0].1));
    assert_eq!(
        c.admit(Some(2), &names(&[70]), t0 + ms(3000)),
        Admit::Go(vec![70])
    );
    assert_eq!(c.take_ended(), vec![70]);
    let _ = reader;
    // A later term adopts afresh.
    c.adopt(TERM + 1, &recorded[..1], t0 + ms(4000));
    assert!(c.adopted(TERM + 1));
}

#[test]
fn a_grant_that_could_not_be_recorded_is_withdrawn() {
    let (mut c, now, _) = delegated();
    c.withdraw(50);
    assert!(!c.delegates_in(1));
    assert_eq!(c.take_ended(), vec![50]);
    assert_eq!(c.admit(Some(2), &names(&[50]), now), Admit::Go(vec![50]));
}

#[test]
fn no_delegation_of_a_directory_being_changed_or_to_a_client_without_a_lease() {
    let (mut c, now, _) = leading(2);
    assert_eq!(c.admit(Some(2), &names(&[60]), now), Admit::Go(vec![60]));
    assert!(matches!(
        c.delegate(1, 60, now, || Ok(Some(1))),
        Err(FsError::Busy(_))
    ));
    c.done(&[60]);
    c.delegate(1, 60, now, || Ok(Some(1))).unwrap();
    assert!(matches!(
        c.delegate(2, 60, now, || Ok(Some(1))),
        Err(FsError::Busy(_))
    ));
    assert!(matches!(
        c.delegate(3, 61, now, || Ok(Some(1))),
        Err(FsError::Busy(_))
    ));
    assert!(matches!(
        c.delegate(1, 62, now + LEASE_MARGIN, || Ok(Some(1))),
        Err(FsError::Busy(_))
    ));
    assert!(matches!(
        c.delegate(1, 63, now, || Ok(None)),
        Err(FsError::Busy(_))
    ));
}

/// What reaches a modelled client, in order.
#[derive(Debug, Clone)]
enum Msg {
    Down(WatchDown),
    /// The answer to a renewal it sent at this instant.
    Renewed(Instant),
}

/// One watcher as the client sees it: its lease by its own reckoning, what is on its way to
/// it, and the newest change whose invalidation it has processed.
#[derive(Debug, Clone)]
struct Client {
    sid: SessionId,
    lease_until: Option<Instant>,
    inbox: Vec<Msg>,
    /// Renewals sent and not yet at the leader: when each was sent.
    asking: Vec<Instant>,
    frozen: bool,
    seen: u64,
}

#[derive(Debug, Clone)]
enum Step {
    /// A change by client `.0` (or by nobody) is applied; `.1`: its request had given up
    /// before (so the client learns nothing from an answer).
    Change(Option<(usize, bool)>),
    /// Client `0` processes its next message (acknowledging an invalidation).
    Deliver(usize),
    /// Client `0` sends a renewal.
    Renew(usize),
    /// The leader receives client `0`'s oldest renewal (and confirms its leadership).
    Arrive(usize),
    Freeze(usize),
    Thaw(usize),
    /// Time passes.
    Wait(u64),
    /// Its watch ends (the stream broke).
    Drop(usize),
    /// Another brick leads, in the next term, a leader lease after the old one was last heard:
    /// every watch ends there, clients watch the new leader (still holding the leases of the
    /// old one until they run out).
    NewLeader,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        proptest::option::of((0..3usize, any::<bool>())).prop_map(Step::Change),
        (0..3usize).prop_map(Step::Deliver),
        (0..3usize).prop_map(Step::Deliver),
        (0..3usize).prop_map(Step::Renew),
        (0..3usize).prop_map(Step::Arrive),
        (0..3usize).prop_map(Step::Freeze),
        (0..3usize).prop_map(Step::Thaw),
        (1..1500u64).prop_map(Step::Wait),
        (0..3usize).prop_map(Step::Drop),
        Just(Step::NewLeader),
    ]
}

proptest! {
    // Cheap cases, and the rarer races (a request giving up on a leased client) need many.
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// Close-to-open across mounts: whenever a change is answered, no client can serve an
    /// older state from its cache. A client serves from cache only under its own lease
    /// (counted from when it asked), so every client still holding a lease then has processed
    /// the change's invalidation, whatever was frozen, delayed, refused or dropped.
    #[test]
    fn no_answered_change_leaves_a_leased_cache_behind(steps in proptest::collection::vec(step(), 1..150)) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut c = Coherence::default();
        let mut term = TERM;
        let _ = c.settled(term, 0, now);
        now += LEASE_MARGIN;
        let mut clients: Vec<Client> = (0..3u128)
            .map(|i| Client {
                sid: c.open(i, now),
                lease_until: None,
                inbox: Vec::new(),
                asking: Vec::new(),
                frozen: false,
                seen: 0,
            })
            .collect();
        let mut index = 0u64;
        // Changes applied and not answered yet.
        let mut pending: Vec<u64> = Vec::new();
        for s in steps {
            match s {
                Step::Change(by) => {
                    index += 1;
                    let once = by.map(|(i, _)| op(i as u128, index));
                    let gave_up = by.is_some_and(|(_, g)| g);
                    if let Some(o) = once {
                        c.await_outcome(o);
                        if gave_up {
                            c.outcome_sent(o);
                        }
                    }
                    for (sid, msg) in c.applied(index, once, &items(), now) {
                        if let Some(cl) = clients.iter_mut().find(|cl| cl.sid == sid) {
                            cl.inbox.push(Msg::Down(msg));
                        }
                    }
                    if let Some(o) = once.filter(|_| !gave_up) {
                        c.outcome_sent(o);
                        // The proposer learns of its own change from its answer.
                        let i = o.client as usize;
                        clients[i].seen = clients[i].seen.max(index);
                    }
                    pending.push(index);
                }
                Step::Deliver(i) => {
                    let cl = &mut clients[i];
                    if !cl.frozen && !cl.inbox.is_empty() {
                        match cl.inbox.remove(0) {
                            Msg::Down(WatchDown::Invalidate { seq, index, .. }) => {
                                cl.seen = cl.seen.max(index);
                                c.ack(cl.sid, seq);
                            }
                            Msg::Down(other) => panic!("unexpected {other:?}"),
                            Msg::Renewed(asked) => {
                                let until = asked + WATCH_LEASE;
                                cl.lease_until = Some(cl.lease_until.map_or(until, |u| u.max(until)));
                            }
                        }
                    }
                }
                Step::Renew(i) => {
                    if !clients[i].frozen {
                        clients[i].asking.push(now);
                    }
                }
                Step::Arrive(i) => {
                    let cl = &mut clients[i];
                    if !cl.asking.is_empty() {
                        let sent = cl.asking.remove(0);
                        if c.renew(cl.sid, now) {
                            cl.inbox.push(Msg::Renewed(sent));
                        }
                    }
                }
                Step::Freeze(i) => clients[i].frozen = true,
                Step::Thaw(i) => clients[i].frozen = false,
                Step::Wait(n) => {
                    now += ms(n);
                    for sid in c.expire(now) {
                        if let Some(cl) = clients.iter_mut().find(|cl| cl.sid == sid) {
                            // The stream is gone: the client drops its cache when it notices.
                            cl.inbox.clear();
                            cl.asking.clear();
                        }
                    }
                }
                Step::Drop(i) => {
                    c.close(clients[i].sid, now);
                    clients[i].inbox.clear();
                    clients[i].asking.clear();
                }
                Step::NewLeader => {
                    // Elected only after its electors went a leader lease without answering
                    // the old leader, so it confirmed (and granted) nothing meanwhile.
                    now += mortar_proto::timing::LEADER_LEASE;
                    c = Coherence::default();
                    term += 1;
                    // What the old leader had not answered it never will.
                    pending.clear();
                    for (i, cl) in clients.iter_mut().enumerate() {
                        cl.sid = c.open(i as u128, now);
                        cl.inbox.clear();
                        cl.asking.clear();
                    }
                }
            }
            // Answer whatever may be answered now, and check the rule for each.
            let mut still = Vec::new();
            for p in pending.drain(..) {
                if c.settled(term, p, now).is_ok() {
                    for cl in &clients {
                        let leased = cl.lease_until.is_some_and(|u| u > now);
                        prop_assert!(
                            !leased || cl.seen >= p,
                            "change {} answered at {:?} while {:?} still serves its cache",
                            p,
                            now - t0,
                            cl
                        );
                    }
                } else {
                    still.push(p);
                }
            }
            pending = still;
        }
    }
}
