//! The run journal: group commit of run records.
//!
//! A run's transitions are not written to its KV record one put at a time.
//! Each coordinator appends them to its own subject of one stream,
//! `{prefix}_journal.{coordinator id}`, and a single writer task puts every
//! record waiting at that moment, from every run, into one message: one
//! acknowledged publish makes a whole batch durable. At 64 runs in flight
//! that is one write for dozens of transitions instead of one each.
//!
//! The KV records stay the place where runs are found (listing, status,
//! takeover): a checkpoint task copies a run's newest record there once it
//! has been live for a second or more, so short runs never touch the runs
//! bucket. Journal messages that every live run has moved past are purged.
//!
//! **Fencing.** Every append carries `Nats-Expected-Last-Subject-Sequence`:
//! the writer is the only publisher of its subject, so it knows what the
//! last message is. A coordinator taking over from a dead one first appends a
//! *fence* (a message with the [`FENCE`] header) to the dead coordinator's
//! subject, then copies the newest record of each run in it to the KV and
//! purges what preceded the fence. If the "dead" coordinator was only cut
//! off, its next append fails the expected sequence, it finds the fence, and
//! it lets go of every run it had: they are the taker's now.

use std::collections::HashMap;
use std::sync::Mutex;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use tokio::sync::{mpsc, oneshot};

use super::*;

/// Whether `a` is at least as new as `b`, two copies of one run's record
/// (see [`RunRecord::seq`]; an uncounted `b` is taken for the newer, as
/// before records were counted).
pub(super) fn at_least_as_new(a: &RunRecord, b: &RunRecord) -> bool {
    b.seq() > 0 && a.seq() >= b.seq()
}

/// Whether `a` is strictly newer than `b` (both counted).
pub(super) fn newer_than(a: &RunRecord, b: &RunRecord) -> bool {
    b.seq() > 0 && a.seq() > b.seq()
}

/// Header of a fence message; its value is the fencing coordinator's id.
pub(super) const FENCE: &str = "Orchestrix-Fence";
/// Fences of coordinators that never come back expire (the subject with them).
const FENCE_TTL: &str = "24h";
/// How long a coordinator cut off from the store waits before it takes
/// runs over: the others cut off with it renew their heartbeats meanwhile
/// (every second), and one that does not is dead.
pub(super) const CUT_OFF_GRACE: Duration = Duration::from_secs(4);
/// How often live runs are copied to the runs bucket, and how long a run
/// must have been in the journal before it is.
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// The journal's stream name and its subjects' prefix.
pub(super) fn stream_name(prefix: &str) -> String {
    format!("{prefix}_journal")
}

pub(super) fn subject(prefix: &str, owner: &str) -> String {
    format!("{prefix}_journal.{owner}")
}

/// What the store and its writer task share.
#[derive(Default)]
pub(super) struct Shared {
    state: Mutex<State>,
}

#[derive(Default)]
pub(super) struct State {
    /// Runs this coordinator drives, with the revision of their KV record
    /// (0: none written yet). A run not here is not ours to write.
    pub revisions: HashMap<Uuid, u64>,
    /// Runs whose newest record is in the journal only.
    pending: HashMap<Uuid, Entry>,
    /// Sequence of the newest message of this coordinator's subject.
    last: u64,
    /// Checkpoint rounds so far.
    tick: u64,
    /// The newest fence on this coordinator's subject it has obeyed.
    fence: u64,
    /// Live runs this coordinator held only in its journal when it obeyed
    /// that fence: put in the runs bucket by the next checkpoint round, so
    /// that they are found whether or not a taker follows the fence.
    orphaned: Vec<Arc<RunRecord>>,
    /// The fence whose orphaned runs are in the runs bucket.
    settled: u64,
    /// Until when this coordinator, cut off from the store a moment ago,
    /// takes no run over (see [`Shared::may_take_over`]).
    quiet_until: Option<std::time::Instant>,
}

struct Entry {
    /// Journal message holding the newest record.
    seq: u64,
    record: Arc<RunRecord>,
    /// Checkpoint round in which the run entered the journal.
    since: u64,
    /// The checkpoint task is copying it to the KV right now.
    writing: bool,
    /// Finished while being copied: the copy is deleted afterwards.
    retired: bool,
}

impl State {
    /// The run is no longer this coordinator's to checkpoint.
    pub(super) fn forget(&mut self, run_id: Uuid) {
        self.pending.remove(&run_id);
    }
}

impl Shared {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest record of a run driven here, if only the journal has it.
    pub(super) fn pending(&self, run_id: Uuid) -> Option<Arc<RunRecord>> {
        self.lock().pending.get(&run_id).map(|e| e.record.clone())
    }

    /// Every run whose newest record is in the journal only.
    pub(super) fn all_pending(&self) -> Vec<Arc<RunRecord>> {
        self.lock().pending.values().map(|e| e.record.clone()).collect()
    }

    /// Whether the run was lost to a fence with a record that is not in the
    /// runs bucket yet.
    pub(super) fn orphaned(&self, run_id: Uuid) -> bool {
        self.lock().orphaned.iter().any(|r| r.run_id == run_id)
    }

    /// A record of a run this coordinator claimed that must be in the runs
    /// bucket before the run is resumed (see [`State::orphaned`]).
    pub(super) fn keep_to_put_back(&self, record: RunRecord) {
        self.lock().orphaned.push(Arc::new(record));
    }

    /// This coordinator was cut off from the store (its heartbeat lapsed,
    /// or it was fenced): what it saw of the others' heartbeats is stale.
    pub(super) fn was_cut_off(&self) {
        let until = std::time::Instant::now() + CUT_OFF_GRACE;
        let mut s = self.lock();
        s.quiet_until = Some(s.quiet_until.map_or(until, |u| u.max(until)));
    }

    /// Whether this coordinator may take runs of others over now. Not for a
    /// moment after it was cut off: a fault that cut it off (its NATS node
    /// frozen, say) has likely cut off the coordinators beside it too, whose
    /// heartbeats lapsed just like its own and come back as theirs does.
    /// Taking their runs at once would fence live coordinators, which then
    /// take theirs back: each takeover is a window for a step to be sent
    /// twice, and every run in flight an unknown outcome.
    pub(super) fn may_take_over(&self) -> bool {
        self.lock().quiet_until.is_none_or(|u| std::time::Instant::now() >= u)
    }

    /// Tests stage takeovers back and forth without waiting.
    #[cfg(test)]
    pub(super) fn forget_cut_off(&self) {
        self.lock().quiet_until = None;
    }

    /// This coordinator was fenced: none of its runs is its own any more.
    fn lose_everything(&self) {
        self.was_cut_off();
        let mut s = self.lock();
        let lost = s.revisions.len();
        s.revisions.clear();
        // Finished ones too: their history entry may not be written yet
        // (it is, after the final append), and until it is, the bucket's
        // older record would read as a run to resume.
        let orphaned: Vec<_> = s.pending.drain().map(|(_, e)| e.record).collect();
        s.orphaned.extend(orphaned);
        tracing::warn!(
            lost,
            "another coordinator took this coordinator's runs over (it was presumed dead)"
        );
    }
}

/// One record to append, and who waits for it.
pub(super) struct Append {
    pub record: Arc<RunRecord>,
    pub bytes: Bytes,
    pub done: oneshot::Sender<Result<(), StoreError>>,
}

pub(super) type Appender = mpsc::UnboundedSender<Append>;

/// The writer task: batches what is waiting, one publish in flight.
pub(super) async fn writer(
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    subject: String,
    shared: Arc<Shared>,
    max_payload: usize,
    mut rx: mpsc::UnboundedReceiver<Append>,
) {
    // Room for headers and the subject.
    let limit = max_payload.saturating_sub(1024).max(1);
    let mut known: Option<u64> = None;
    let mut carry: Option<Append> = None;
    loop {
        let first = match carry.take() {
            Some(a) => a,
            None => match rx.recv().await {
                Some(a) => a,
                None => return,
            },
        };
        let mut batch = vec![first];
        let mut size = batch[0].bytes.len();
        while let Ok(a) = rx.try_recv() {
            if size + a.bytes.len() > limit {
                carry = Some(a);
                break;
            }
            size += a.bytes.len();
            batch.push(a);
        }
        // A waiter gone (its actor timed out and will write again) needs
        // nothing; of several records of one run, the newest is enough.
        batch.retain(|a| !a.done.is_closed());
        let mut superseded = Vec::new();
        if batch.len() > 1 {
            let mut newest: HashMap<Uuid, usize> = HashMap::with_capacity(batch.len());
            for (i, a) in batch.iter().enumerate() {
                newest.insert(a.record.run_id, i);
            }
            if newest.len() < batch.len() {
                let mut kept = Vec::with_capacity(newest.len());
                for (i, a) in batch.into_iter().enumerate() {
                    if newest.get(&a.record.run_id) == Some(&i) {
                        kept.push(a);
                    } else {
                        superseded.push(a);
                    }
                }
                // Overtaken by a newer record of their run: they share its fate.
                batch = kept;
            }
        }
        // A run fenced meanwhile is not written.
        {
            let s = shared.lock();
            let (ours, lost): (Vec<_>, Vec<_>) =
                batch.into_iter().partition(|a| s.revisions.contains_key(&a.record.run_id));
            drop(s);
            for a in lost {
                let _ = a.done.send(Err(StoreError::Fenced(a.record.run_id)));
            }
            batch = ours;
        }
        if batch.is_empty() {
            continue;
        }
        let mut body = Vec::with_capacity(size);
        for a in &batch {
            body.extend_from_slice(&a.bytes);
        }
        let body = Bytes::from(body);
        let result = publish(&js, &stream, &subject, &shared, &mut known, body).await;
        for a in superseded {
            let _ = a.done.send(match &result {
                Ok(_) => Ok(()),
                Err(Lost::Fenced) => Err(StoreError::Fenced(a.record.run_id)),
                Err(Lost::Error(e)) => Err(e.clone()),
            });
        }
        match result {
            Ok(seq) => {
                let mut s = shared.lock();
                s.last = seq;
                let tick = s.tick;
                for a in batch {
                    let id = a.record.run_id;
                    if !s.revisions.contains_key(&id) {
                        let _ = a.done.send(Err(StoreError::Fenced(id)));
                        continue;
                    }
                    match s.pending.get_mut(&id) {
                        Some(e) => {
                            e.seq = seq;
                            e.record = a.record;
                        }
                        None => {
                            let entry = Entry {
                                seq,
                                record: a.record,
                                since: tick,
                                writing: false,
                                retired: false,
                            };
                            s.pending.insert(id, entry);
                        }
                    }
                    let _ = a.done.send(Ok(()));
                }
            }
            Err(e) => {
                for a in batch {
                    let e = match &e {
                        Lost::Fenced => StoreError::Fenced(a.record.run_id),
                        Lost::Error(e) => e.clone(),
                    };
                    let _ = a.done.send(Err(e));
                }
            }
        }
    }
}

enum Lost {
    Fenced,
    Error(StoreError),
}

/// Appends `body`; on failure, looks at the subject to tell a lost
/// acknowledgement from a fence.
async fn publish(
    js: &jetstream::Context,
    stream: &jetstream::stream::Stream,
    subject: &str,
    shared: &Shared,
    known: &mut Option<u64>,
    body: Bytes,
) -> Result<u64, Lost> {
    for _ in 0..2 {
        let expected = match *known {
            Some(seq) => seq,
            None => match last_message(stream, subject).await {
                Ok(None) => 0,
                Ok(Some(m)) if fenced_by(&m).is_some() && m.sequence > fence_seen(shared) => {
                    note_fence(shared, m.sequence);
                    *known = Some(m.sequence);
                    return Err(Lost::Fenced);
                }
                Ok(Some(m)) => m.sequence,
                Err(e) => return Err(Lost::Error(e)),
            },
        };
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Expected-Last-Subject-Sequence", expected.to_string().as_str());
        let sent = match js.publish_with_headers(subject.to_owned(), headers, body.clone()).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        let error = match sent {
            Ok(ack) => {
                *known = Some(ack.sequence);
                return Ok(ack.sequence);
            }
            Err(e) => e,
        };
        *known = None;
        let wrong = error.kind() == PublishErrorKind::WrongLastSequence;
        match last_message(stream, subject).await {
            Ok(Some(m)) if fenced_by(&m).is_some() => {
                *known = Some(m.sequence);
                if m.sequence > fence_seen(shared) {
                    note_fence(shared, m.sequence);
                    return Err(Lost::Fenced);
                }
            }
            Ok(Some(m)) if m.payload == body => {
                // It landed; only the acknowledgement was lost.
                *known = Some(m.sequence);
                return Ok(m.sequence);
            }
            Ok(Some(m)) => *known = Some(m.sequence),
            // Emptied: a taker purged it all (a fence that expired since).
            Ok(None) if expected > 0 => {
                *known = Some(0);
                shared.lose_everything();
                return Err(Lost::Fenced);
            }
            Ok(None) => *known = Some(0),
            Err(e) => return Err(Lost::Error(e)),
        }
        if !wrong {
            return Err(Lost::Error(unavailable("cannot append to the journal", error)));
        }
    }
    Err(Lost::Error(StoreError::Unavailable("cannot append to the journal".into())))
}

/// Sequence of the newest fence this coordinator has already obeyed.
fn fence_seen(shared: &Shared) -> u64 {
    shared.lock().fence
}

fn note_fence(shared: &Shared, seq: u64) {
    shared.lose_everything();
    shared.lock().fence = seq;
}

pub(super) fn fenced_by(m: &StreamMessage) -> Option<String> {
    m.headers.get(FENCE).map(|v| v.as_str().to_owned())
}

/// The newest message of a subject, if any.
pub(super) async fn last_message(
    stream: &jetstream::stream::Stream,
    subject: &str,
) -> Result<Option<StreamMessage>, StoreError> {
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(unavailable("cannot read the journal", e)),
    }
}

/// Whether `name` can be a KV key (a coordinator id always is).
fn is_key(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.ends_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_=./".contains(&b))
}

/// The records in one journal message, in the order they were appended.
pub(super) fn records(body: &[u8]) -> Result<Vec<RunRecord>, StoreError> {
    let mut cursor = std::io::Cursor::new(body);
    let mut out = Vec::new();
    while (cursor.position() as usize) < body.len() {
        let mut de = rmp_serde::Deserializer::new(&mut cursor);
        de.set_max_depth(orchestrix_proto::MAX_DEPTH);
        out.push(RunRecord::deserialize(&mut de).map_err(|e| StoreError::Corrupt(e.to_string()))?);
    }
    Ok(out)
}

impl Inner {
    /// Appends the run's newest record to the journal; resolves once it is
    /// durable (or the run turned out not to be this coordinator's).
    pub(super) async fn append(&self, record: &Arc<RunRecord>) -> Result<(), StoreError> {
        let bytes = super::encode(&**record)?;
        self.fits(&bytes)?;
        let (done, rx) = oneshot::channel();
        self.appender
            .send(Append { record: record.clone(), bytes, done })
            .map_err(|_| StoreError::Unavailable("the journal writer stopped".into()))?;
        rx.await.map_err(|_| StoreError::Unavailable("the journal writer stopped".into()))?
    }

    /// A run ended and its end is recorded elsewhere: it leaves the journal
    /// (and the runs bucket, if a checkpoint put it there).
    pub(super) async fn retire(&self, run_id: Uuid) -> Result<(), StoreError> {
        let revision = {
            let mut s = self.shared.lock();
            match s.pending.get_mut(&run_id) {
                Some(e) if e.writing => {
                    // The checkpoint in flight deletes its copy when done.
                    e.retired = true;
                    return Ok(());
                }
                // Let go of now, whatever the delete below does: not every
                // caller retries a failed one, and a finished run kept here
                // would hold the journal's purge back for good. A status
                // meanwhile finds its history entry.
                Some(_) => {
                    s.pending.remove(&run_id);
                }
                None => {}
            }
            s.revisions.get(&run_id).copied()
        };
        if revision.is_some_and(|r| r > 0) {
            self.runs
                .delete(run_id.to_string())
                .await
                .map_err(|e| unavailable("cannot retire the run", e))?;
        }
        // Only now: were the delete refused, the run must stay this
        // coordinator's, or its own scan would resume the checkpoint.
        self.shared.lock().revisions.remove(&run_id);
        Ok(())
    }

    /// One checkpoint round: runs live in the journal for a round or more
    /// are copied to the runs bucket, then what no run needs is purged.
    pub(super) async fn checkpoint(&self) {
        let due: Vec<(Uuid, u64, Arc<RunRecord>)> = {
            let mut s = self.shared.lock();
            s.tick += 1;
            let tick = s.tick;
            s.pending
                .iter_mut()
                .filter(|(_, e)| {
                    !e.writing
                        && !e.retired
                        && e.since + 2 <= tick
                        && e.record.phase != Phase::Finished
                })
                .map(|(id, e)| {
                    e.writing = true;
                    (*id, e.seq, e.record.clone())
                })
                .collect()
        };
        for (id, seq, record) in due {
            let written = self.write(&record, false).await;
            let retire = {
                let mut s = self.shared.lock();
                let Some(e) = s.pending.get_mut(&id) else { continue };
                e.writing = false;
                match written {
                    Err(StoreError::Fenced(_)) => {
                        s.pending.remove(&id);
                        false
                    }
                    _ if e.retired => true,
                    Ok(()) if e.seq == seq => {
                        s.pending.remove(&id);
                        false
                    }
                    _ => false,
                }
            };
            if retire {
                if let Some(e) = self.shared.lock().pending.get_mut(&id) {
                    e.retired = false;
                }
                if let Err(e) = self.retire(id).await {
                    tracing::warn!(run_id = %id, error = %e, "cannot retire a finished run's record");
                }
            }
        }
        // Runs lost to a fence: put where any coordinator finds them (a
        // taker that fenced and then died, or a fence that nobody follows,
        // would otherwise leave them in this journal only).
        // They stay listed until they are there: while listed, the
        // takeover scan leaves them alone, and it must not resume one from
        // the bucket's older record while its restore is on the way (found
        // by a fault-testing helper: whole runs ran twice).
        let (fence, orphaned) = {
            let s = self.shared.lock();
            (s.fence, s.orphaned.clone())
        };
        let mut restored = Vec::new();
        for record in orphaned {
            match self.restore(&self.id, (*record).clone()).await {
                Ok(()) => restored.push(record),
                Err(e) => {
                    tracing::warn!(run_id = %record.run_id, error = %e, "cannot put a run lost to a fence in the runs bucket yet")
                }
            }
        }
        let (keep_from, last, settled) = {
            let mut s = self.shared.lock();
            s.orphaned.retain(|r| !restored.iter().any(|done| Arc::ptr_eq(r, done)));
            let settled = s.orphaned.is_empty();
            if settled {
                s.settled = s.settled.max(fence);
            }
            let keep_from = s.pending.values().map(|e| e.seq).min().unwrap_or(s.last).min(s.last);
            (keep_from, s.last, s.settled >= fence)
        };
        // What precedes a fence this coordinator obeyed is the taker's to
        // read and purge: nothing is purged before the taker has, or before
        // this coordinator has put those runs in the bucket itself.
        if fence > 0 && !settled {
            match self.journal.get_first_raw_message_by_subject(&self.journal_subject, 0).await {
                Ok(first) if first.sequence >= fence => {}
                _ => return,
            }
        }
        if keep_from > self.purged.load(std::sync::atomic::Ordering::Relaxed) && last > 0 {
            let purged =
                self.journal.purge().filter(&self.journal_subject).sequence(keep_from).await;
            match purged {
                Ok(_) => self.purged.store(keep_from, std::sync::atomic::Ordering::Relaxed),
                Err(e) => tracing::warn!(error = %e, "cannot purge the journal"),
            }
        }
    }

    /// Makes a dead coordinator's journal safe to take over: fences it, then
    /// copies the newest record of each run in it to the runs bucket. The
    /// fence's sequence (all before it is in the bucket); `None` when
    /// another live coordinator is doing that right now.
    pub(super) async fn take_journal(
        &self,
        owner: &str,
        messages: usize,
        alive: &mut HashMap<String, bool>,
    ) -> Result<Option<u64>, StoreError> {
        let subject = subject(&self.options.prefix, owner);
        // A fresh fence may follow anything, even what was appended since
        // the subject was listed: read it all back.
        let mut replay = true;
        let fence = match last_message(&self.journal, &subject).await? {
            Some(m) => match fenced_by(&m) {
                Some(by) if by != self.id && self.alive(&by, alive).await? => {
                    // A live taker blocks others only while it has records
                    // before its fence left to copy.
                    return Ok((self.messages_on(&subject).await? <= 1).then_some(m.sequence));
                }
                Some(_) => {
                    // Fenced already; anything before the fence is left
                    // over from a taker that stopped half way.
                    replay = messages > 1;
                    m.sequence
                }
                None => match self.fence(&subject, m.sequence).await? {
                    Some(seq) => seq,
                    None => return Ok(None),
                },
            },
            None => match self.fence(&subject, 0).await? {
                Some(seq) => seq,
                None => return Ok(None),
            },
        };
        let mut latest: HashMap<Uuid, RunRecord> = HashMap::new();
        if replay {
            for (seq, read) in self.read_before(&subject, 1, fence).await? {
                match read {
                    Ok(rs) => {
                        for r in rs {
                            match latest.get(&r.run_id) {
                                Some(had) if at_least_as_new(had, &r) => {}
                                _ => {
                                    latest.insert(r.run_id, r);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, owner, seq, "a journal message does not decode")
                    }
                }
            }
        }
        for record in latest.into_values() {
            self.restore(owner, record).await?;
        }
        if replay {
            self.journal
                .purge()
                .filter(&subject)
                .sequence(fence)
                .await
                .map_err(|e| unavailable("cannot purge a journal", e))?;
        }
        Ok(Some(fence))
    }

    /// Before a claim of one of `owner`'s runs: fences its journal again,
    /// and puts what it holds in the runs bucket, unless its last message
    /// is this coordinator's fence already (nothing appended since). The
    /// sequence up to which its journal is in the bucket, to read what it
    /// appends after it from (not a later read of its last message: what it
    /// appended in between would be in neither).
    pub(super) async fn fence_again(
        &self,
        owner: &str,
        alive: &mut HashMap<String, bool>,
    ) -> Result<Option<u64>, StoreError> {
        let subject = subject(&self.options.prefix, owner);
        match last_message(&self.journal, &subject).await? {
            Some(m) if fenced_by(&m).as_deref() == Some(self.id.as_str()) => Ok(Some(m.sequence)),
            _ => self.take_journal(owner, usize::MAX, alive).await,
        }
    }

    /// Fences `subject` after its last message, then returns the newest
    /// record of `run_id` appended after sequence `since` and before that
    /// fence, if any: what a presumed-dead owner did with the run after
    /// its record was read.
    pub(super) async fn progress_since(
        &self,
        subject: &str,
        since: u64,
        run_id: Uuid,
    ) -> Result<Option<RunRecord>, StoreError> {
        let fence = loop {
            let last = last_message(&self.journal, subject).await?;
            let last = last.map_or(0, |m| m.sequence);
            if let Some(seq) = self.fence(subject, last).await? {
                break seq;
            }
        };
        if fence <= since + 1 {
            return Ok(None);
        }
        let mut newest = None;
        for (_, read) in self.read_before(subject, since + 1, fence).await? {
            if let Ok(rs) = read {
                newest = rs.into_iter().rfind(|r| r.run_id == run_id).or(newest);
            }
        }
        Ok(newest)
    }

    /// The records of each message of `subject` from sequence `from` up to
    /// `fence` (not included), fences left out, with each message's sequence.
    async fn read_before(
        &self,
        subject: &str,
        from: u64,
        fence: u64,
    ) -> Result<Vec<(u64, Result<Vec<RunRecord>, StoreError>)>, StoreError> {
        let consumer = self
            .journal
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subject.to_owned(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from.max(1),
                },
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable("cannot read a journal", e))?;
        let mut messages =
            consumer.messages().await.map_err(|e| unavailable("cannot read a journal", e))?;
        let mut out = Vec::new();
        loop {
            let next = tokio::time::timeout(SCAN_STEP_TIMEOUT, messages.next())
                .await
                .map_err(|_| StoreError::Unavailable("a journal did not answer".into()))?;
            let Some(m) = next else { break };
            let m = m.map_err(|e| unavailable("cannot read a journal", e))?;
            let seq =
                m.info().map_err(|e| unavailable("cannot read a journal", e))?.stream_sequence;
            if seq >= fence {
                break;
            }
            if m.headers.as_ref().is_some_and(|h| h.get(FENCE).is_some()) {
                continue;
            }
            out.push((seq, records(&m.payload)));
        }
        Ok(out)
    }

    /// The journal subjects matching `filter`, with how many messages each holds.
    async fn journal_subjects(&self, filter: &str) -> Result<Vec<(String, usize)>, StoreError> {
        let mut subjects = self
            .journal
            .clone()
            .info_with_subjects(filter)
            .await
            .map_err(|e| unavailable("cannot list journals", e))?;
        let mut found = Vec::new();
        while let Some(s) = subjects.next().await {
            found.push(s.map_err(|e| unavailable("cannot list journals", e))?);
        }
        Ok(found)
    }

    /// How many messages a journal subject holds.
    async fn messages_on(&self, subject: &str) -> Result<usize, StoreError> {
        Ok(self.journal_subjects(subject).await?.iter().map(|(_, n)| n).sum())
    }

    /// Appends a fence after `last`; `None` if something else was appended first.
    pub(super) async fn fence(&self, subject: &str, last: u64) -> Result<Option<u64>, StoreError> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Expected-Last-Subject-Sequence", last.to_string().as_str());
        headers.insert("Nats-TTL", FENCE_TTL);
        headers.insert(FENCE, self.id.as_str());
        let ack =
            match self.js.publish_with_headers(subject.to_owned(), headers, Bytes::new()).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
        match ack {
            Ok(ack) => Ok(Some(ack.sequence)),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(None),
            Err(e) => Err(unavailable("cannot fence a journal", e)),
        }
    }

    /// Puts a dead coordinator's newest record of a run into the runs
    /// bucket, under that coordinator's name, unless the run has moved on
    /// (another owner there, a newer record in its name, or ended: in the
    /// history). A newer record in its name is what a claim of its own
    /// left there (it won the run back from a taker, and was fenced again
    /// before appending anything): its journal's record is from before.
    async fn restore(&self, owner: &str, record: RunRecord) -> Result<(), StoreError> {
        let key = record.run_id.to_string();
        let value = encode(&StoredRef { owner, record: &record })?;
        for _ in 0..3 {
            let entry =
                self.runs.entry(&key).await.map_err(|e| unavailable("cannot read a run", e))?;
            let revision = match entry {
                Some(e) if e.operation == kv::Operation::Put => match decode::<Stored>(&e.value) {
                    Ok(s) if s.owner != owner || at_least_as_new(&s.record, &record) => {
                        return Ok(());
                    }
                    _ => e.revision,
                },
                other => {
                    let ended = self
                        .history
                        .get(&key)
                        .await
                        .map_err(|e| unavailable("cannot read the history", e))?;
                    if ended.is_some() {
                        return Ok(());
                    }
                    other.map(|e| e.revision).unwrap_or(0)
                }
            };
            if self.runs.update(&key, value.clone(), revision).await.is_ok() {
                return Ok(());
            }
        }
        Err(StoreError::Unavailable(format!("cannot restore run {key} from a journal")))
    }

    /// Whether a coordinator's heartbeat is there, remembered for one scan.
    pub(super) async fn alive(
        &self,
        owner: &str,
        alive: &mut HashMap<String, bool>,
    ) -> Result<bool, StoreError> {
        if let Some(a) = alive.get(owner) {
            return Ok(*a);
        }
        // No heartbeat can have a name that is not a valid key (garbage on
        // a journal subject, a corrupt record): never alive, never an error
        // that stops the whole scan.
        if !is_key(owner) {
            return Ok(false);
        }
        let read = |id: &str| {
            let id = id.to_owned();
            async move {
                let entry = self
                    .coordinators
                    .entry(&id)
                    .await
                    .map_err(|e| unavailable("cannot read heartbeats", e))?;
                Ok::<_, StoreError>(
                    entry
                        .filter(|e| e.operation == kv::Operation::Put)
                        .map(|e| e.created.unix_timestamp_nanos()),
                )
            }
        };
        // A heartbeat is alive while its key is there, unless it is much
        // older than this coordinator's own (renewed every second, stamped
        // by the same server): see `outlived`. Much: its TTL and 30 s, so
        // that a pause of the server or of every coordinator (no one
        // renews meanwhile) never reads as a death by this rule, only a key
        // kept far past its TTL.
        let a = match read(owner).await? {
            None => false,
            Some(beat) => {
                let newest = read(&self.id).await?.unwrap_or(beat);
                let after = super::HEARTBEAT_TTL + Duration::from_secs(30);
                !orchestrix_worker::registry::outlived(beat, newest, after)
            }
        };
        alive.insert(owner.to_owned(), a);
        Ok(a)
    }

    /// Takes over the journals of dead coordinators; returns the owners
    /// whose runs may now be claimed.
    pub(super) async fn take_dead_journals(
        &self,
        alive: &mut HashMap<String, bool>,
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let prefix = format!("{}.", stream_name(&self.options.prefix));
        let found = self.journal_subjects(&format!("{prefix}*")).await?;
        let mut taken = std::collections::HashSet::new();
        for (subject, count) in found {
            let Some(owner) = subject.strip_prefix(&prefix) else { continue };
            if owner == self.id {
                continue;
            }
            match self.alive(owner, alive).await {
                Ok(false) => {}
                Ok(true) => continue,
                Err(e) => {
                    tracing::warn!(owner, error = %e, "cannot tell whether a coordinator lives");
                    continue;
                }
            }
            // Taken already, and nothing appended since: only the fence.
            if count <= 1
                && self.done_journals.lock().unwrap_or_else(|p| p.into_inner()).contains(owner)
            {
                taken.insert(owner.to_owned());
                continue;
            }
            // One journal that cannot be read now holds up only its owner's runs.
            match self.take_journal(owner, count, alive).await {
                Ok(Some(_)) => {
                    self.done_journals
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(owner.to_owned());
                    taken.insert(owner.to_owned());
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(owner, error = %e, "cannot take a dead coordinator's journal yet");
                }
            }
        }
        Ok(taken)
    }
}

#[cfg(test)]
#[path = "journal_tests.rs"]
mod tests;
