//! The holder's state machine without sockets: what is held, how changes fold, what is
//! forgotten when, when a recall may be answered, and how a change that could not commit is
//! reported; then random interleavings against a model of the leader.
use super::*;
use mortar_proto::wire::{SetAttr, RENAME_EXCHANGE};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const ROOT: InodeId = 50;
const EPOCH: (BrickId, u64) = (1, 1);

/// A batch id in tests: its number.
impl BatchId for u64 {
    fn id(&self) -> OpId {
        OpId {
            client: 7,
            seq: *self,
        }
    }
}

fn dir_inode(ino: InodeId) -> Inode {
    Inode {
        attr: Attr::new(ino, FileKind::Directory, 0o755, 0, 0, Timestamp::now()),
        content: Content::None,
        xattrs: Vec::new(),
    }
}

/// A holder of a delegation of each of `roots` (in the volume root).
fn holding(roots: &[InodeId]) -> Holder<u64> {
    let mut h = Holder::default();
    for r in roots {
        assert!(h.granted(*r, dir_inode(*r), EPOCH, true));
    }
    h
}

fn mknod(parent: InodeId, name: &str) -> MetaOp {
    MetaOp::Mknod {
        parent,
        name: name.as_bytes().to_vec(),
        kind: FileKind::Regular,
        perm: 0o644,
        uid: 0,
        gid: 0,
        rdev: 0,
        exclusive: false,
    }
}

fn chmod_op(ino: InodeId, perm: u32) -> MetaOp {
    MetaOp::SetAttr {
        ino,
        set: SetAttr {
            perm: Some(perm),
            ..SetAttr::default()
        },
    }
}

fn create(h: &mut Holder<u64>, root: InodeId, name: &str, ino: InodeId) -> Result<Attr, FsError> {
    h.create(root, &mknod(root, name), ino, Timestamp::now())
}

/// Send the next batch under `id` (fresh when one is needed): its id's number and size.
fn send(h: &mut Holder<u64>, id: u64) -> Option<(u64, usize)> {
    let fresh = h.needs_id().then_some(id);
    h.next_batch(fresh).map(|(once, ops)| (once.seq, ops.len()))
}

/// The names `dir`'s listing from memory shows, in its order.
fn listed_names(h: &Holder<u64>, dir: InodeId) -> Vec<Vec<u8>> {
    h.listing(dir)
        .expect("a listing from memory")
        .into_iter()
        .map(|e| e.name)
        .collect()
}

#[test]
fn creates_are_held_exclusive_and_a_taken_name_is_refused_from_memory() {
    let mut h = holding(&[ROOT]);
    let attr = create(&mut h, ROOT, "a", 100).unwrap();
    assert_eq!(attr.ino, 100);
    assert_eq!(h.held.len(), 1);
    match &h.held[0].op {
        MetaOp::Local {
            ino: Some(100), op, ..
        } => {
            assert!(matches!(
                **op,
                MetaOp::Mknod {
                    exclusive: true,
                    ..
                }
            ))
        }
        other => panic!("held as {other:?}"),
    }
    assert_eq!(create(&mut h, ROOT, "a", 101), Err(FsError::Exists));
    assert_eq!(h.held.len(), 1, "a refused create holds nothing");
}

#[test]
fn changes_of_one_inode_made_back_to_back_fold_into_one() {
    let mut h = holding(&[ROOT]);
    create(&mut h, ROOT, "a", 100).unwrap();
    // The create stays on its own; the two chmods after it become one whole-inode change from
    // the version the first found.
    h.change(100, &chmod_op(100, 0o600), Timestamp::now())
        .unwrap();
    let found = h.held[1].found.expect("a change");
    h.change(100, &chmod_op(100, 0o640), Timestamp::now())
        .unwrap();
    assert_eq!(h.held.len(), 2);
    match &h.held[1].op {
        MetaOp::Local { op, .. } => match &**op {
            MetaOp::SetInode {
                expect_version,
                inode,
            } => {
                assert_eq!(*expect_version, found);
                assert_eq!(inode.attr.perm & 0o777, 0o640);
            }
            other => panic!("folded into {other:?}"),
        },
        other => panic!("held as {other:?}"),
    }
    let bytes: usize = h.held.iter().map(|h| h.bytes).sum();
    assert_eq!(h.held_bytes, bytes, "the byte count follows the fold");
}

#[test]
fn a_given_back_subtree_is_shown_whole_until_all_it_holds_is_committed() {
    let mut h = holding(&[ROOT]);
    create(&mut h, ROOT, "a", 100).unwrap();
    h.give_back(ROOT);
    assert_eq!(h.usable(100, true), None, "no more changes from memory");
    // Still held: nothing of the subtree is forgotten (its names must keep answering).
    assert!(h.forget_if_due(false).is_empty());
    assert!(matches!(h.name(ROOT, b"a"), Name::Found(_)));
    // Committed: all of it goes, and the directory is named for the cache to forget.
    assert_eq!(send(&mut h, 1), Some((1, 1)));
    let (settled, _) = h.batch_answered(Answer::Committed);
    assert_eq!(settled.forget, HashSet::from([ROOT]));
    assert!(h.nodes.is_empty());
    assert!(matches!(h.name(ROOT, b"a"), Name::Elsewhere));
}

#[test]
fn a_lapsed_lease_gives_the_delegation_back_at_first_use() {
    let mut h = holding(&[ROOT]);
    create(&mut h, ROOT, "a", 100).unwrap();
    assert_eq!(h.usable(100, true), Some(ROOT));
    assert_eq!(h.usable(100, false), None);
    assert_eq!(h.usable(100, true), None, "given back for good");
}

#[test]
fn held_changes_are_bounded() {
    let mut h = holding(&[ROOT]);
    for i in 0..HELD_OPS as u64 {
        assert!(!h.full());
        create(&mut h, ROOT, &format!("f{i}"), 1000 + i).unwrap();
    }
    assert!(h.full());
}

#[test]
fn a_batch_without_answer_goes_again_under_its_id_before_anything_else() {
    let mut h = holding(&[ROOT]);
    create(&mut h, ROOT, "a", 100).unwrap();
    assert_eq!(send(&mut h, 1), Some((1, 1)));
    assert_eq!(send(&mut h, 2), None, "one batch in flight at a time");
    h.batch_answered(Answer::Retry);
    create(&mut h, ROOT, "b", 101).unwrap();
    assert!(
        !h.needs_id(),
        "the unanswered batch goes first, under its own id"
    );
    assert_eq!(send(&mut h, 2), Some((1, 1)), "again as it was: b waits");
    h.batch_answered(Answer::Committed);
    assert_eq!(send(&mut h, 2), Some((2, 1)));
    h.batch_answered(Answer::Committed);
    assert!(!h.holds_any());
}

#[test]
fn a_change_held_while_an_id_was_awaited_waits_for_one() {
    let mut h = holding(&[ROOT]);
    assert!(!h.needs_id(), "nothing held: no id needed");
    // The committer asked, found nothing, and a create came before it took the next batch.
    create(&mut h, ROOT, "a", 100).unwrap();
    assert_eq!(
        h.next_batch(None),
        None,
        "a new batch needs an id: ask again"
    );
    assert!(h.needs_id());
    assert_eq!(send(&mut h, 1), Some((1, 1)));
}

#[test]
fn a_recall_is_answered_only_once_what_was_held_is_committed() {
    let mut h = holding(&[ROOT]);
    create(&mut h, ROOT, "a", 100).unwrap();
    assert_eq!(
        h.recall(ROOT, 1, 9, std::time::Instant::now()),
        Settled::default(),
        "a is not committed"
    );
    assert!(h.urgent());
    send(&mut h, 1).unwrap();
    // The commit failed (no quorum, no answer): the leader must not let anyone look yet.
    let (settled, _) = h.batch_answered(Answer::Retry);
    assert!(settled.acks.is_empty());
    send(&mut h, 2).unwrap();
    let (settled, _) = h.batch_answered(Answer::Committed);
    assert_eq!(settled.acks, vec![(1, 9)]);
    assert!(!h.urgent());
}

#[test]
fn a_recall_with_nothing_held_is_answered_at_once() {
    let mut h = holding(&[ROOT]);
    let settled = h.recall(ROOT, 1, 3, std::time::Instant::now());
    assert_eq!(settled.acks, vec![(1, 3)]);
    assert_eq!(settled.forget, HashSet::from([ROOT]));
}

#[test]
fn changes_made_after_a_recall_do_not_hold_it_back() {
    let other = ROOT + 1;
    let mut h = holding(&[ROOT, other]);
    create(&mut h, ROOT, "a", 100).unwrap();
    assert!(h
        .recall(ROOT, 1, 4, std::time::Instant::now())
        .acks
        .is_empty());
    send(&mut h, 1).unwrap();
    create(&mut h, other, "b", 101).unwrap();
    let (settled, _) = h.batch_answered(Answer::Committed);
    assert_eq!(
        settled.acks,
        vec![(1, 4)],
        "b is beneath another delegation"
    );
    assert!(h.holds_any());
}

#[test]
fn a_recall_from_an_ended_watch_is_not_answered() {
    let mut h = holding(&[ROOT]);
    create(&mut h, ROOT, "a", 100).unwrap();
    assert!(h
        .recall(ROOT, 1, 4, std::time::Instant::now())
        .acks
        .is_empty());
    assert!(h.lease_lost().forget.is_empty(), "a is still held");
    send(&mut h, 1).unwrap();
    let (settled, _) = h.batch_answered(Answer::Committed);
    assert!(settled.acks.is_empty(), "the new leader recalls again");
}

#[test]
fn a_refused_batch_goes_one_by_one_and_each_refused_change_fails_its_file_and_directory_once() {
    let mut h = holding(&[ROOT]);
    create(&mut h, ROOT, "a", 100).unwrap();
    create(&mut h, ROOT, "b", 101).unwrap();
    assert!(h
        .recall(ROOT, 1, 5, std::time::Instant::now())
        .acks
        .is_empty());
    send(&mut h, 1).unwrap();
    let (settled, singles) = h.batch_answered(Answer::Refused);
    assert_eq!(singles.len(), 2);
    assert!(settled.acks.is_empty(), "still in flight, one by one");
    assert!(matches!(h.name(ROOT, b"b"), Name::Found(_)));
    let (settled, notes) = h.singles_answered(vec![Ok(()), Err(FsError::Exists)]);
    assert_eq!(settled.acks, vec![(1, 5)]);
    assert_eq!(notes.len(), 1);
    let note = h.take_lost(101).expect("the file is reported");
    assert!(
        note.contains("\"b\"") && note.contains("could not be committed"),
        "{note}"
    );
    assert!(h.take_lost(ROOT).is_some(), "and its directory");
    assert_eq!(h.take_lost(101), None, "once");
    assert_eq!(h.take_lost(100), None, "a was committed");
}

fn ren(parent: InodeId, name: &[u8], new_parent: InodeId, new_name: &[u8], flags: u32) -> MetaOp {
    MetaOp::Rename {
        parent,
        name: name.to_vec(),
        new_parent,
        new_name: new_name.to_vec(),
        flags,
    }
}

fn mkdir(h: &mut Holder<u64>, parent: InodeId, name: &str, ino: InodeId) {
    let op = MetaOp::Mkdir {
        parent,
        name: name.as_bytes().to_vec(),
        perm: 0o755,
        uid: 0,
        gid: 0,
    };
    h.create(ROOT, &op, ino, Timestamp::now()).unwrap();
}

/// The change held last, inside its `Local`, and the inode number it names (creates only).
fn last_held(h: &Holder<u64>) -> (&MetaOp, Option<InodeId>) {
    match &h.held.back().expect("a held change").op {
        MetaOp::Local { op, ino, .. } => (op, *ino),
        other => panic!("held as {other:?}"),
    }
}

#[test]
fn unlinks_and_rmdirs_are_answered_and_held_with_the_namespace_rules() {
    let mut h = holding(&[ROOT]);
    create(&mut h, ROOT, "a", 100).unwrap();
    mkdir(&mut h, ROOT, "d", 101);
    create(&mut h, 101, "inner", 102).unwrap();
    let nlink = h.attr(ROOT).unwrap().nlink;
    let later = Timestamp {
        secs: Timestamp::now().secs + 100,
        nanos: 0,
    };

    for (name, rmdir, refused) in [
        ("a", true, FsError::NotDir),
        ("d", false, FsError::IsDir),
        ("d", true, FsError::NotEmpty),
        ("zz", false, FsError::NotFound),
    ] {
        assert_eq!(
            h.remove(ROOT, name.as_bytes(), rmdir, later),
            Some(Err(refused))
        );
    }
    assert_eq!(h.held.len(), 3, "a refused removal holds nothing");

    assert_eq!(h.remove(ROOT, b"a", false, later), Some(Ok(())));
    assert!(matches!(h.name(ROOT, b"a"), Name::Absent));
    assert_eq!(h.attr(100), None, "the file's last link went with it");
    let dir = h.attr(ROOT).unwrap();
    assert_eq!((dir.mtime, dir.ctime, dir.nlink), (later, later, nlink));
    let (op, ino) = last_held(&h);
    assert!(matches!(op, MetaOp::Unlink { parent: ROOT, .. }) && ino.is_none());

    assert_eq!(h.remove(101, b"inner", false, later), Some(Ok(())));
    assert_eq!(h.remove(ROOT, b"d", true, later), Some(Ok(())));
    assert_eq!(
        h.attr(ROOT).unwrap().nlink,
        nlink - 1,
        "rmdir drops the '..' link"
    );
    assert_eq!(h.listing(ROOT), Some(Vec::new()));
    assert_eq!(h.held.len(), 6);
}

#[test]
fn renames_within_a_delegation_replace_and_refuse_as_the_namespace_does() {
    let mut h = holding(&[ROOT, ROOT + 1]);
    create(&mut h, ROOT, ".a.tmp", 100).unwrap();
    create(&mut h, ROOT, "a", 101).unwrap();
    mkdir(&mut h, ROOT, "d", 102);
    let now = Timestamp::now();
    // rsync's last step: the temporary file takes the place of the old one.
    assert_eq!(
        h.rename(&ren(ROOT, b".a.tmp", ROOT, b"a", 0), now),
        Some(Ok(()))
    );
    match h.name(ROOT, b"a") {
        Name::Found(a) => assert_eq!(a.ino, 100),
        other => panic!("{other:?}"),
    }
    assert!(matches!(h.name(ROOT, b".a.tmp"), Name::Absent));
    assert_eq!(h.attr(101), None, "the replaced file is gone");
    assert_eq!(listed_names(&h, ROOT), vec![b"a".to_vec(), b"d".to_vec()]);

    let held = h.held.len();
    assert_eq!(
        h.rename(&ren(ROOT, b"d", ROOT, b"a", 0), now),
        Some(Err(FsError::NotDir))
    );
    assert_eq!(
        h.rename(&ren(ROOT, b"a", ROOT, b"d", 0), now),
        Some(Err(FsError::IsDir))
    );
    assert_eq!(
        h.rename(&ren(ROOT, b"a", ROOT, b"d", RENAME_NOREPLACE), now),
        Some(Err(FsError::Exists))
    );
    assert_eq!(h.rename(&ren(ROOT, b"a", ROOT, b"a", 0), now), Some(Ok(())));
    assert_eq!(
        h.held.len(),
        held,
        "refusals and a rename onto itself hold nothing"
    );
    // Left to the namespace: exchanges, a directory moving to another parent (its loop
    // check), and renames across delegations.
    assert_eq!(
        h.rename(&ren(ROOT, b"a", ROOT, b"d", RENAME_EXCHANGE), now),
        None
    );
    assert_eq!(h.rename(&ren(ROOT, b"d", 102, b"x", 0), now), None);
    assert_eq!(h.rename(&ren(ROOT, b"a", ROOT + 1, b"a", 0), now), None);

    // A change right after a rename is not folded into it.
    h.change(100, &chmod_op(100, 0o600), now).unwrap();
    assert_eq!(h.held.len(), held + 1);
    assert!(h.held.iter().any(
        |c| matches!(&c.op, MetaOp::Local { op, .. } if matches!(**op, MetaOp::Rename { .. }))
    ));
}

#[test]
fn a_listing_is_answered_from_memory_only_when_every_entry_is_shown() {
    let mut h = holding(&[ROOT]);
    create(&mut h, ROOT, "b", 100).unwrap();
    create(&mut h, ROOT, "a", 101).unwrap();
    assert_eq!(listed_names(&h, ROOT), vec![b"a".to_vec(), b"b".to_vec()]);
    // Committed and forgotten (as when memory is short): its attributes are elsewhere.
    h.nodes.remove(&100);
    assert_eq!(h.listing(ROOT), None);
    assert_eq!(h.remove(ROOT, b"b", false, Timestamp::now()), None);
}

// ---- random interleavings against a model of the leader ----

#[derive(Clone, Debug)]
enum Step {
    Create {
        root: usize,
        name: u8,
    },
    Chmod {
        root: usize,
        name: u8,
        perm: u32,
    },
    Unlink {
        root: usize,
        name: u8,
    },
    Recall {
        root: usize,
    },
    Send,
    /// What became of the batch in flight.
    Answer(Outcome),
    LeaseLost,
    /// An fsync or give-back found nothing to commit and forgets what is due.
    Forget,
    /// The lease lapsed without the watch ending (a change finds it so).
    Lapse {
        root: usize,
        name: u8,
    },
}

#[derive(Clone, Copy, Debug)]
enum Outcome {
    Committed,
    /// No answer, though the leader applied it.
    LostAnswer,
    /// No answer, not applied.
    Unavailable,
    /// Refused whole; one by one, the changes whose bit is set are refused too.
    Refused(u16),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..2usize, 0..6u8).prop_map(|(root, name)| Step::Create { root, name }),
        3 => (0..2usize, 0..6u8, 0o600..0o700u32)
            .prop_map(|(root, name, perm)| Step::Chmod { root, name, perm }),
        2 => (0..2usize, 0..6u8).prop_map(|(root, name)| Step::Unlink { root, name }),
        1 => (0..2usize).prop_map(|root| Step::Recall { root }),
        4 => Just(Step::Send),
        1 => Just(Step::Answer(Outcome::Committed)),
        1 => Just(Step::Answer(Outcome::LostAnswer)),
        1 => Just(Step::Answer(Outcome::Unavailable)),
        1 => any::<u16>().prop_map(|m| Step::Answer(Outcome::Refused(m))),
        1 => Just(Step::LeaseLost),
        1 => Just(Step::Forget),
        1 => (0..2usize, 0..6u8).prop_map(|(root, name)| Step::Lapse { root, name }),
    ]
}

/// The leader as the model sees it: batch ids applied, names and permissions.
#[derive(Default)]
struct Leader {
    applied: HashSet<u64>,
    names: HashMap<(InodeId, Vec<u8>), InodeId>,
    /// Where each create the holder sent made its inode (for an unlink in the same batch).
    made_as: HashMap<InodeId, (InodeId, Vec<u8>)>,
    perms: HashMap<InodeId, u32>,
}

impl Leader {
    /// The inode a change concerns (an unlink: its directory), and whether it is a create.
    fn target(op: &MetaOp) -> (InodeId, bool) {
        let MetaOp::Local { ino, op, .. } = op else {
            panic!("not a held change: {op:?}")
        };
        match (&**op, ino) {
            (_, Some(i)) => (*i, true),
            (MetaOp::Unlink { parent, .. }, None) => (*parent, false),
            (MetaOp::SetAttr { ino, .. }, None) => (*ino, false),
            (MetaOp::SetInode { inode, .. }, None) => (inode.attr.ino, false),
            other => panic!("unexpected held change {other:?}"),
        }
    }

    /// Whether the leader takes `op`: a change of an inode whose create was refused is refused
    /// too; any other change before its create is the holder's fault.
    fn takes(&self, op: &MetaOp, lost: &HashSet<InodeId>) -> bool {
        self.takes_after(op, lost, &HashSet::new())
    }

    /// Whether the leader takes `op` after the creates of `made` earlier in its batch.
    fn takes_after(&self, op: &MetaOp, lost: &HashSet<InodeId>, made: &HashSet<InodeId>) -> bool {
        if let MetaOp::Local { op, .. } = op {
            if let MetaOp::Unlink { parent, name } = &**op {
                // The name is there unless its create was lost (or was made earlier in this
                // batch, which is then applied before it).
                return match self.names.get(&(*parent, name.clone())) {
                    Some(_) => true,
                    None => made
                        .iter()
                        .any(|i| self.made_as.get(i) == Some(&(*parent, name.clone()))),
                };
            }
        }
        let (ino, create) = Self::target(op);
        if create {
            // Exclusive: refused when the name is taken (an unlink of it was lost). Names
            // freed earlier in the same batch are not counted: the batch is then refused
            // whole and goes one by one, which the model allows.
            return !self
                .made_as
                .get(&ino)
                .is_some_and(|n| self.names.contains_key(n));
        }
        if self.perms.contains_key(&ino) || made.contains(&ino) {
            return true;
        }
        assert!(lost.contains(&ino), "a change of {ino} before its create");
        false
    }

    fn apply(&mut self, op: &MetaOp) {
        let MetaOp::Local { ino, op, .. } = op else {
            panic!("not a held change: {op:?}")
        };
        match (&**op, ino) {
            (MetaOp::Mknod { parent, name, .. }, Some(i)) => {
                let old = self.names.insert((*parent, name.clone()), *i);
                assert_eq!(old, None, "a create applied twice");
                assert!(
                    self.perms.insert(*i, 0o644).is_none(),
                    "a create applied twice"
                );
            }
            (MetaOp::SetAttr { ino, set }, None) => {
                self.perms.insert(*ino, set.perm.expect("chmod"));
            }
            (MetaOp::SetInode { inode, .. }, None) => {
                self.perms.insert(inode.attr.ino, inode.attr.perm & 0o7777);
            }
            (MetaOp::Unlink { parent, name }, None) => {
                let ino = self
                    .names
                    .remove(&(*parent, name.clone()))
                    .expect("an unlink of a name the leader has");
                self.perms.remove(&ino);
            }
            other => panic!("unexpected held change {other:?}"),
        }
    }
}

/// The holder, the leader, and what the holder showed the application.
struct Model {
    holder: Holder<u64>,
    leader: Leader,
    roots: [InodeId; 2],
    /// Files shown, by (root, name): inode and the permission shown last.
    shown: BTreeMap<(usize, u8), (InodeId, u32)>,
    /// Names shown unlinked since (and not made again): they must stay gone, unless the
    /// unlink could not commit (reported as lost).
    gone: BTreeSet<(usize, u8)>,
    /// Inodes with a change refused one by one: their loss must be reported.
    lost: HashSet<InodeId>,
    next_ino: InodeId,
    next_id: u64,
    watch: u64,
    next_seq: u64,
    /// Recalls not answered yet: (watch, seq) and the files shown beneath the root then.
    recalls: HashMap<(u64, u64), Vec<(InodeId, u32)>>,
    flying: Option<(u64, Vec<MetaOp>)>,
}

impl Model {
    fn new() -> Model {
        let roots = [ROOT, ROOT + 1];
        Model {
            holder: holding(&roots),
            leader: Leader::default(),
            roots,
            shown: BTreeMap::new(),
            gone: BTreeSet::new(),
            lost: HashSet::new(),
            next_ino: 1000,
            next_id: 1,
            watch: 1,
            next_seq: 1,
            recalls: HashMap::new(),
            flying: None,
        }
    }

    fn name(n: u8) -> String {
        format!("f{n}")
    }

    fn settle(&mut self, s: Settled) {
        for ack in s.acks {
            assert_eq!(ack.0, self.watch, "acknowledged on another watch");
            let shown = self.recalls.remove(&ack).expect("a recall asked for");
            for (ino, perm) in shown {
                if self.lost.contains(&ino) {
                    continue;
                }
                assert_eq!(
                    self.leader.perms.get(&ino),
                    Some(&perm),
                    "recall answered before inode {ino} as shown was committed"
                );
            }
        }
    }

    fn step(&mut self, s: &Step) {
        let now = Timestamp::now();
        match s {
            Step::Create { root, name } => {
                let r = self.roots[*root];
                if self.holder.usable(r, true).is_some() {
                    let ino = self.next_ino;
                    self.next_ino += 1;
                    let op = mknod(r, &Self::name(*name));
                    match self.holder.create(r, &op, ino, now) {
                        Ok(_) => {
                            assert!(self.shown.insert((*root, *name), (ino, 0o644)).is_none());
                            self.gone.remove(&(*root, *name));
                            self.leader
                                .made_as
                                .insert(ino, (r, Self::name(*name).into_bytes()));
                        }
                        Err(FsError::Exists) => {
                            assert!(self.shown.contains_key(&(*root, *name)))
                        }
                        Err(e) => panic!("{e:?}"),
                    }
                }
            }
            Step::Chmod { root, name, perm } => {
                if let Some((ino, _)) = self.shown.get(&(*root, *name)).copied() {
                    if self.holder.usable(ino, true).is_some() {
                        self.holder.change(ino, &chmod_op(ino, *perm), now).unwrap();
                        self.shown.insert((*root, *name), (ino, *perm));
                    }
                }
            }
            Step::Unlink { root, name } => {
                let r = self.roots[*root];
                if self.shown.contains_key(&(*root, *name)) && self.holder.usable(r, true).is_some()
                {
                    let n = Self::name(*name).into_bytes();
                    match self.holder.remove(r, &n, false, now) {
                        Some(Ok(())) => {
                            self.shown.remove(&(*root, *name));
                            self.gone.insert((*root, *name));
                        }
                        // Committed and forgotten: it goes the usual way (not modelled).
                        None => {}
                        Some(Err(e)) => panic!("{e:?}"),
                    }
                }
            }
            Step::Lapse { root, name } => {
                let ino = self
                    .shown
                    .get(&(*root, *name))
                    .map_or(self.roots[*root], |s| s.0);
                assert_eq!(self.holder.usable(ino, false), None);
            }
            Step::Recall { root } => {
                let seq = self.next_seq;
                self.next_seq += 1;
                let beneath = self
                    .shown
                    .iter()
                    .filter(|((r, _), _)| r == root)
                    .map(|(_, v)| *v)
                    .collect();
                self.recalls.insert((self.watch, seq), beneath);
                let s = self.holder.recall(
                    self.roots[*root],
                    self.watch,
                    seq,
                    std::time::Instant::now(),
                );
                self.settle(s);
            }
            Step::Send => {
                let fresh = self.holder.needs_id().then(|| {
                    self.next_id += 1;
                    self.next_id
                });
                if let Some((once, ops)) = self.holder.next_batch(fresh) {
                    assert!(self.flying.is_none(), "two batches in flight");
                    self.flying = Some((once.seq, ops));
                }
            }
            Step::Answer(outcome) => {
                let Some((id, ops)) = self.flying.take() else {
                    return;
                };
                let mut made = HashSet::new();
                // A batch applied before is answered from the once table, not applied again.
                let again = self.leader.applied.contains(&id);
                let whole = again
                    || ops.iter().all(|op| {
                        let (ino, create) = Leader::target(op);
                        if create {
                            made.insert(ino);
                        }
                        self.leader.takes_after(op, &self.lost, &made)
                    });
                let answer = match outcome {
                    Outcome::Unavailable => Answer::Retry,
                    // Sent again after it was applied: the once table answers as before.
                    _ if self.leader.applied.contains(&id) => match outcome {
                        Outcome::LostAnswer => Answer::Retry,
                        _ => Answer::Committed,
                    },
                    Outcome::Refused(_) => Answer::Refused,
                    _ if !whole => Answer::Refused,
                    Outcome::Committed | Outcome::LostAnswer => {
                        self.leader.applied.insert(id);
                        ops.iter().for_each(|op| self.leader.apply(op));
                        match outcome {
                            Outcome::Committed => Answer::Committed,
                            _ => Answer::Retry,
                        }
                    }
                };
                let (settled, singles) = self.holder.batch_answered(answer);
                self.settle(settled);
                if singles.is_empty() {
                    return self.check_no_window();
                }
                let mask = match outcome {
                    Outcome::Refused(mask) => *mask,
                    _ => 0,
                };
                let mut results = Vec::new();
                for (i, op) in singles.iter().enumerate() {
                    if mask & (1 << (i % 16)) != 0 || !self.leader.takes(op, &self.lost) {
                        self.lost.insert(Leader::target(op).0);
                        self.not_gone(op);
                        results.push(Err(FsError::Exists));
                    } else {
                        self.leader.apply(op);
                        results.push(Ok(()));
                    }
                }
                let (settled, _) = self.holder.singles_answered(results);
                self.settle(settled);
            }
            Step::Forget => {
                self.holder.forget_if_due(false);
            }
            Step::LeaseLost => {
                let s = self.holder.lease_lost();
                self.settle(s);
                self.recalls.clear();
                self.watch += 1;
            }
        }
        self.check_no_window();
    }

    /// A refused unlink: its name may still be at the leader (the loss is reported).
    fn not_gone(&mut self, op: &MetaOp) {
        let MetaOp::Local { op, .. } = op else { return };
        let MetaOp::Unlink { parent, name } = &**op else {
            return;
        };
        let root = self.roots.iter().position(|r| r == parent).expect("a root");
        let n: u8 = std::str::from_utf8(&name[1..]).unwrap().parse().unwrap();
        self.gone.remove(&(root, n));
    }

    /// Every file shown and not lost is answered by the holder or found at the leader, and
    /// no name shown unlinked is.
    fn check_no_window(&self) {
        for (root, name) in &self.gone {
            let r = self.roots[*root];
            let n = Self::name(*name).into_bytes();
            match self.holder.name(r, &n) {
                Name::Absent => {}
                Name::Elsewhere => assert_eq!(
                    self.leader.names.get(&(r, n)),
                    None,
                    "an unlinked name came back"
                ),
                other => panic!("an unlinked name is answered {other:?}"),
            }
        }
        for ((root, name), (ino, _)) in &self.shown {
            if self.lost.contains(ino) {
                continue;
            }
            let r = self.roots[*root];
            let n = Self::name(*name).into_bytes();
            match self.holder.name(r, &n) {
                Name::Found(a) => assert_eq!(a.ino, *ino),
                Name::Committed(i) => {
                    assert_eq!(i, *ino);
                    assert_eq!(self.leader.names.get(&(r, n)), Some(ino));
                }
                Name::Absent => panic!("a shown name answered absent"),
                Name::Elsewhere => assert_eq!(
                    self.leader.names.get(&(r, n)),
                    Some(ino),
                    "forgotten before it was committed"
                ),
            }
        }
    }

    /// The leader answers again: everything held commits, every recall of this watch is
    /// answered, and the leader has every change shown that was not reported lost.
    fn drain(&mut self) {
        for _ in 0..64 {
            self.step(&Step::Send);
            self.step(&Step::Answer(Outcome::Committed));
        }
        assert!(!self.holder.holds_any(), "still held after the drain");
        assert!(
            self.recalls.is_empty(),
            "recalls not answered: {:?}",
            self.recalls.keys()
        );
        for ((root, name), (ino, perm)) in &self.shown {
            if self.lost.contains(ino) {
                assert!(self.holder.take_lost(*ino).is_some(), "loss not reported");
                continue;
            }
            let key = (self.roots[*root], Self::name(*name).into_bytes());
            assert_eq!(self.leader.names.get(&key), Some(ino));
            assert_eq!(self.leader.perms.get(ino), Some(perm), "{key:?}");
        }
        for (root, name) in &self.gone {
            let key = (self.roots[*root], Self::name(*name).into_bytes());
            assert_eq!(
                self.leader.names.get(&key),
                None,
                "unlinked, yet at the leader"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Whatever the order of changes, recalls, sends, answers (lost, refused) and lease ends:
    /// nothing shown goes missing (held here or at the leader), nothing is applied twice or
    /// out of order, a recall is answered only after what it covers is committed, and what
    /// could not commit is reported.
    #[test]
    fn nothing_shown_is_lost_or_answered_early(steps in proptest::collection::vec(step(), 1..120)) {
        let mut m = Model::new();
        for s in &steps {
            m.step(s);
        }
        m.drain();
    }
}

#[test]
fn a_listed_delegation_is_asked_for_at_the_second_change_and_not_after_a_refusal_or_recall() {
    let mut h = holding(&[ROOT]);
    let t0 = std::time::Instant::now();
    let (dir, other) = (70, 71);
    assert!(!h.ask_listed(dir, t0), "one change is made the usual way");
    assert!(h.ask_listed(dir, t0 + Duration::from_millis(200)));
    // A change after the window starts counting again.
    assert!(!h.ask_listed(other, t0));
    assert!(!h.ask_listed(other, t0 + Duration::from_secs(2)));
    assert!(h.ask_listed(other, t0 + Duration::from_millis(2100)));
    // Never the volume's root (nor a clone's), nor a directory already shown from memory.
    for at in [0, 10] {
        assert!(!h.ask_listed(mortar_proto::ROOT_INODE, t0 + Duration::from_millis(at)));
        assert!(!h.ask_listed(mortar_proto::root_of(2), t0 + Duration::from_millis(at)));
        assert!(!h.ask_listed(ROOT, t0 + Duration::from_millis(at)));
    }
    // Refused, or recalled: not again for a while.
    h.refused(dir, t0);
    assert!(!h.ask_listed(dir, t0 + Duration::from_millis(300)));
    assert!(!h.ask_listed(dir, t0 + Duration::from_millis(400)));
    assert!(!h.ask_listed(dir, t0 + RECALL_BACKOFF + Duration::from_millis(1)));
    assert!(h.ask_listed(dir, t0 + RECALL_BACKOFF + Duration::from_millis(2)));
    h.recall(ROOT, 1, 1, t0);
    assert_eq!(
        h.attr(ROOT),
        None,
        "given back with nothing held, so forgotten"
    );
    assert!(!h.ask_listed(ROOT, t0 + Duration::from_millis(1)));
    assert!(!h.ask_listed(ROOT, t0 + Duration::from_millis(2)));
}

#[test]
fn a_listed_grant_shows_names_but_not_the_attributes_of_what_it_did_not_make() {
    let mut h = holding(&[]);
    let dir = 80;
    let entry = |name: &str, ino: InodeId, kind: FileKind| DirEntry {
        name: name.as_bytes().to_vec(),
        attr: Attr::new(ino, kind, 0o644, 0, 0, Timestamp::now()),
    };
    let entries = vec![
        entry("old", 81, FileKind::Regular),
        entry("sub", 82, FileKind::Directory),
    ];
    assert!(h.granted_listed(dir, dir_inode(dir), entries, EPOCH, true));
    assert!(matches!(h.name(dir, b"old"), Name::Committed(81)));
    assert!(matches!(h.name(dir, b"new"), Name::Absent));
    assert_eq!(
        h.attr(81),
        None,
        "others may change it: its attributes are asked for"
    );
    assert_eq!(h.listing(dir), None);
    assert_eq!(h.usable(81, true), None);
    assert!(h
        .change(81, &chmod_op(81, 0o600), Timestamp::now())
        .is_err());
    assert_eq!(create(&mut h, dir, "old", 90), Err(FsError::Exists));
    // rsync's replace, and an unlink of a name it did not make.
    create(&mut h, dir, ".old.tmp", 91).unwrap();
    let now = Timestamp::now();
    assert_eq!(
        h.rename(&ren(dir, b".old.tmp", dir, b"old", 0), now),
        Some(Ok(()))
    );
    assert!(matches!(h.name(dir, b"old"), Name::Found(a) if a.ino == 91));
    assert_eq!(h.remove(dir, b"old", false, now), Some(Ok(())));
    // A directory known by name only: its emptiness is not known here.
    assert_eq!(h.remove(dir, b"sub", true, now), None);
    // Renamed here: its new ctime is shown from here until the rename is committed.
    let later = Timestamp {
        secs: now.secs + 50,
        nanos: 0,
    };
    assert_eq!(
        h.rename(&ren(dir, b"sub", dir, b"sub2", 0), later),
        Some(Ok(()))
    );
    assert_eq!(h.attr(82).map(|a| a.ctime), Some(later));
    assert!(matches!(h.name(dir, b"sub2"), Name::Found(a) if a.ino == 82));
    // Everything committed: the leader answers for it again.
    while send(&mut h, 1).is_some() {
        h.batch_answered(Answer::Committed);
    }
    assert_eq!(h.attr(82), None);
    assert!(matches!(h.name(dir, b"sub2"), Name::Committed(82)));
}

#[test]
fn unlinking_one_name_of_a_file_the_listing_named_shows_its_link_count_until_committed() {
    let mut h = holding(&[]);
    let dir = 80;
    let mut attr = Attr::new(81, FileKind::Regular, 0o644, 0, 0, Timestamp::now());
    attr.nlink = 2;
    let entries = ["a", "b"].map(|n| DirEntry {
        name: n.as_bytes().to_vec(),
        attr: attr.clone(),
    });
    assert!(h.granted_listed(dir, dir_inode(dir), entries.to_vec(), EPOCH, true));
    let now = Timestamp::now();
    assert_eq!(h.remove(dir, b"a", false, now), Some(Ok(())));
    assert!(matches!(h.name(dir, b"b"), Name::Found(a) if a.nlink == 1 && a.ctime == now));
    assert_eq!(h.remove(dir, b"b", false, now), Some(Ok(())));
    assert_eq!(
        h.attr(81).map(|a| a.nlink),
        Some(0),
        "an open handle sees no links"
    );
    while send(&mut h, 1).is_some() {
        h.batch_answered(Answer::Committed);
    }
    assert_eq!(h.attr(81), None, "gone at the leader too");
}
