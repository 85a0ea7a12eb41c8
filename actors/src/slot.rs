//! A shared, replaceable reference to an actor, so that a supervisor's restart of a child is seen
//! by everyone who talks to it.

use std::sync::{Arc, RwLock};

use ractor::ActorRef;

/// The current `ActorRef` of a supervised actor; empty until the supervisor has started it.
pub struct ActorSlot<M: Send + 'static> {
    inner: Arc<RwLock<Option<ActorRef<M>>>>,
}

impl<M: Send + 'static> Clone for ActorSlot<M> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<M: Send + 'static> Default for ActorSlot<M> {
    fn default() -> Self {
        Self {
            inner: Arc::new(RwLock::new(None)),
        }
    }
}

impl<M: Send + 'static> ActorSlot<M> {
    /// The current actor, if started.
    pub fn get(&self) -> Option<ActorRef<M>> {
        self.inner
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Publishes the actor after a (re)start.
    pub fn set(&self, actor: ActorRef<M>) {
        *self
            .inner
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(actor);
    }
}
