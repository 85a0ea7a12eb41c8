//! The sends a [`ChannelActor`](super::ChannelActor) holds while its circuit's half-open probe is
//! out. Refused then, they would be told to come back once the probe's result is due (up to the
//! send timeout, 15 s by default) or fail over to the next channel of their chain, though a probe
//! that succeeds a moment later closes the circuit. Held, they wait for the probe's result
//! instead, and the actor decides them in the order they arrived once it has it.
//!
//! At most as many sends are held as the provider has concurrency permits (all of them may go
//! out at once when the circuit closes); the actor refuses those beyond, as before. A held send
//! that could no longer finish before its caller stops waiting is taken out when that moment
//! comes (its timer reports it to the actor) and answered unsent. Sends still held when the actor
//! fails or stops are answered unsent at once, like the sends waiting for a permit: the circuit
//! that held them went with the actor.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ractor::RpcReplyPort;
use tokio::task::AbortHandle;

use super::OutboundMessage;
use super::actor::{NotStartedCause, SendReport, answer_not_started};

/// A send held while the probe is out.
pub(super) struct HeldSend {
    /// What to send.
    pub message: OutboundMessage,
    /// When its caller stops waiting for the answer.
    pub answer_by: Instant,
    /// Where the answer goes.
    pub reply: RpcReplyPort<SendReport>,
}

/// A held send with its timer.
struct Entry {
    id: u64,
    send: HeldSend,
    /// The timer that reports the send's last moment to start.
    timer: AbortHandle,
}

/// The sends held while the probe is out, oldest first.
pub(super) struct Hold {
    /// The provider's name, for the answers of the sends left when the actor goes.
    provider: String,
    limit: usize,
    entries: VecDeque<Entry>,
    next_id: u64,
}

impl Hold {
    /// An empty hold for `provider`'s sends, holding at most `limit` (at least one).
    pub fn new(provider: String, limit: usize) -> Self {
        Self {
            provider,
            limit: limit.max(1),
            entries: VecDeque::new(),
            next_id: 0,
        }
    }

    /// Whether it holds as many sends as it may.
    pub fn is_full(&self) -> bool {
        self.entries.len() >= self.limit
    }

    /// Holds `send`; `timer` starts the timer that reports, with the id it is given, the send's
    /// last moment to start.
    pub fn push(&mut self, send: HeldSend, timer: impl FnOnce(u64) -> AbortHandle) {
        let id = self.next_id;
        self.next_id += 1;
        self.entries.push_back(Entry {
            id,
            send,
            timer: timer(id),
        });
    }

    /// Takes out the send held longest, its timer stopped.
    pub fn pop_front(&mut self) -> Option<HeldSend> {
        self.entries.pop_front().map(|entry| {
            entry.timer.abort();
            entry.send
        })
    }

    /// Takes out the send whose timer reported `id`, if it is still held.
    pub fn take(&mut self, id: u64) -> Option<HeldSend> {
        let at = self.entries.iter().position(|entry| entry.id == id)?;
        self.entries.remove(at).map(|entry| entry.send)
    }
}

impl Drop for Hold {
    /// The actor failed or stopped: the sends it still held are answered unsent, at once.
    fn drop(&mut self) {
        for entry in self.entries.drain(..) {
            entry.timer.abort();
            answer_not_started(
                entry.send.reply,
                &self.provider,
                Duration::ZERO,
                NotStartedCause::ActorFailed,
            );
        }
    }
}
