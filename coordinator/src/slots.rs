//! Concurrency slots: at most `limit` holders of a slot at once, the others
//! waiting in arrival order. A run holds the slot of its concurrency key
//! (`key.{flow}.{hex key}`) for its whole life; an attempt of a step with
//! `max_in_flight` holds the step's slot (`step.{flow}.{step}`) while it is in
//! flight. Holders are run ids (a run has one attempt per step at a time).
//!
//! The state of a slot is one small value that stores change with a
//! compare-and-set ([`SlotState`]), so the queue is shared by every
//! coordinator of a cluster and survives any of them.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The answer to asking for a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// The slot is held: go on.
    Granted,
    /// Every slot is taken: waiting, this many ahead.
    Queued {
        /// Holders-to-be ahead of this one.
        ahead: usize,
    },
}

/// One slot's holders and queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotState {
    /// How many may hold it at once (the last asker's limit).
    pub limit: u32,
    /// Who holds it, in the order they got it.
    pub holders: Vec<Uuid>,
    /// Who waits, in arrival order.
    pub waiting: Vec<Uuid>,
}

impl SlotState {
    /// `holder` asks for the slot: granted at once while there is room and
    /// nobody waits, else queued at the end. Asking again changes nothing.
    pub fn acquire(&mut self, holder: Uuid, limit: u32) -> Grant {
        self.limit = limit.max(1);
        if self.holders.contains(&holder) {
            return Grant::Granted;
        }
        if let Some(ahead) = self.waiting.iter().position(|w| *w == holder) {
            return Grant::Queued { ahead };
        }
        if self.waiting.is_empty() && self.holders.len() < self.limit as usize {
            self.holders.push(holder);
            return Grant::Granted;
        }
        self.waiting.push(holder);
        Grant::Queued { ahead: self.waiting.len() - 1 }
    }

    /// `holder` lets go (or stops waiting); the first waiting take the
    /// room. True if anything changed.
    pub fn release(&mut self, holder: Uuid) -> bool {
        let before = (self.holders.len(), self.waiting.len());
        self.holders.retain(|h| *h != holder);
        self.waiting.retain(|h| *h != holder);
        self.promote();
        before != (self.holders.len(), self.waiting.len())
    }

    /// Moves waiting holders up while there is room.
    fn promote(&mut self) {
        while self.holders.len() < self.limit.max(1) as usize && !self.waiting.is_empty() {
            self.holders.push(self.waiting.remove(0));
        }
    }

    /// Whether `holder` holds the slot.
    pub fn holds(&self, holder: Uuid) -> bool {
        self.holders.contains(&holder)
    }

    /// Whether `holder` holds the slot or waits for it.
    pub fn knows(&self, holder: Uuid) -> bool {
        self.holds(holder) || self.waiting.contains(&holder)
    }
}

/// The slot of a concurrency key of `flow`. Keys are free text: hex keeps
/// the name a valid KV key and subject token.
pub fn key_slot(flow: &str, key: &str) -> String {
    let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
    format!("key.{flow}.{hex}")
}

/// The slot of step `step` of `flow` (its `max_in_flight`).
pub fn step_slot(flow: &str, step: &str) -> String {
    format!("step.{flow}.{step}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_up_to_the_limit_then_first_come_first_served() {
        let ids: Vec<Uuid> = (1..=5).map(Uuid::from_u128).collect();
        let mut s = SlotState::default();
        assert_eq!(s.acquire(ids[0], 2), Grant::Granted);
        assert_eq!(s.acquire(ids[1], 2), Grant::Granted);
        assert_eq!(s.acquire(ids[2], 2), Grant::Queued { ahead: 0 });
        assert_eq!(s.acquire(ids[3], 2), Grant::Queued { ahead: 1 });
        // Asking again is harmless.
        assert_eq!(s.acquire(ids[0], 2), Grant::Granted);
        assert_eq!(s.acquire(ids[3], 2), Grant::Queued { ahead: 1 });
        // A newcomer never jumps the queue, even when room frees up.
        assert!(s.release(ids[1]));
        assert_eq!(s.holders, [ids[0], ids[2]]);
        assert_eq!(s.acquire(ids[4], 2), Grant::Queued { ahead: 1 });
        // A waiting one may leave (a cancel); releasing twice changes nothing.
        assert!(s.release(ids[3]));
        assert!(!s.release(ids[3]));
        assert!(s.release(ids[0]));
        assert_eq!(s.holders, [ids[2], ids[4]]);
        assert!(s.waiting.is_empty());
    }

    #[test]
    fn slot_names_are_kv_keys() {
        assert_eq!(key_slot("pay", "account:42"), "key.pay.6163636f756e743a3432");
        assert_eq!(step_slot("pay", "charge"), "step.pay.charge");
    }
}
