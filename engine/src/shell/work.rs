//! The per-core queue of work the core asks for that outlives one input: agent dials and tool
//! calls. `drive` only pushes here; the work task `run_core` starts pops and spawns each item's
//! task (see `core_task::work_task`), so the module that runs inputs never imports the tasks it
//! would start.
//!
//! Invariant: bounded ([`WorkQueue::new`]); pushing never awaits, and only a push wakes the work
//! task: media outputs never come here, so no frame costs a wake-up.

use std::cell::RefCell;
use std::collections::VecDeque;

use event_listener::{Event, EventListener};

use crate::core::ToolCall;
use crate::id::{ConnectionId, SessionId};
use crate::secret::Secret;
use crate::session::agent::AgentUrl;

/// Where and how to dial an agent.
pub(crate) struct Dial {
    pub(crate) url: AgentUrl,
    /// `Authorization: Bearer` for the upgrade request.
    pub(crate) bearer: Option<Secret>,
    /// One more header field for the upgrade request (the Realtime beta's `OpenAI-Beta`).
    pub(crate) header: Option<(&'static str, &'static str)>,
}

/// One piece of work for the work task.
pub(crate) enum Work {
    /// Dial an agent for leg `conn` of `session` and serve it (`agent::agent_task`).
    Dial { conn: ConnectionId, session: SessionId, target: Box<Dial> },
    /// POST a tool call to the tools server (`tools::tool_task`).
    Tool(Box<ToolCall>),
}

/// A bounded FIFO of [`Work`] with a wake-up for its one consumer. Single-threaded (one per core).
pub(crate) struct WorkQueue {
    items: RefCell<VecDeque<Work>>,
    capacity: usize,
    /// Wakes the work task after a push into an empty queue.
    event: Event,
}

impl WorkQueue {
    /// A queue of at most `capacity` items (at least 1).
    pub(crate) fn new(capacity: usize) -> Self {
        Self { items: RefCell::new(VecDeque::new()), capacity: capacity.max(1), event: Event::new() }
    }

    /// Queues `work`; gives it back when the queue is full. Wakes the consumer only when the queue
    /// was empty (it drains everything queued each time it runs).
    pub(crate) fn push(&self, work: Work) -> Result<(), Work> {
        let mut items = self.items.borrow_mut();
        if items.len() >= self.capacity {
            return Err(work);
        }
        let was_empty = items.is_empty();
        items.push_back(work);
        if was_empty {
            self.event.notify(1);
        }
        Ok(())
    }

    /// The oldest queued item.
    pub(crate) fn pop(&self) -> Option<Work> {
        self.items.borrow_mut().pop_front()
    }

    /// A listener woken by the next push into an empty queue. Take it before checking
    /// [`WorkQueue::pop`], so a push in between is not missed.
    pub(crate) fn listen(&self) -> EventListener {
        self.event.listen()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dial(n: u64) -> Work {
        Work::Dial {
            conn: ConnectionId(n),
            session: SessionId::parse("s").unwrap(),
            target: Box::new(Dial { url: AgentUrl::parse("ws://127.0.0.1:1/").unwrap(), bearer: None, header: None }),
        }
    }

    /// Whether `listener` has been woken (polled once, never waiting).
    fn woken(listener: &mut EventListener) -> bool {
        futures_lite::future::block_on(futures_lite::future::poll_once(listener)).is_some()
    }

    fn conn_of(work: Option<Work>) -> Option<u64> {
        match work? {
            Work::Dial { conn, .. } => Some(conn.0),
            Work::Tool(_) => None,
        }
    }

    /// Work comes out in the order it went in, and a full queue gives the new item back.
    #[test]
    fn fifo_and_bounded() {
        let queue = WorkQueue::new(2);
        assert!(queue.push(dial(1)).is_ok());
        assert!(queue.push(dial(2)).is_ok());
        assert_eq!(conn_of(queue.push(dial(3)).err()), Some(3));
        assert_eq!(conn_of(queue.pop()), Some(1));
        assert_eq!(conn_of(queue.pop()), Some(2));
        assert!(queue.pop().is_none());
    }

    /// Only a push into an empty queue wakes the consumer: a burst costs one wake-up, not one each.
    #[test]
    fn one_wakeup_per_burst() {
        let queue = WorkQueue::new(8);
        let mut first = queue.listen();
        queue.push(dial(1)).ok();
        let mut second = queue.listen();
        queue.push(dial(2)).ok();
        assert!(woken(&mut first));
        assert!(!woken(&mut second), "a push into a non-empty queue must not wake the consumer again");
        // The consumer's listener ends when it wakes; then it drains the queue.
        drop((first, second));
        while queue.pop().is_some() {}
        let mut third = queue.listen();
        queue.push(dial(3)).ok();
        assert!(woken(&mut third));
    }
}
