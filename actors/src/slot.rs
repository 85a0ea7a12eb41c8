//! A shared, replaceable reference to an actor, so that a supervisor's restart of a child is seen
//! by everyone who talks to it.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use ractor::{ActorRef, MessagingErr};
use tokio::time::Instant;

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

    /// Casts `message` to the current actor; while there is none, or it has stopped (its
    /// supervisor restarting it), tries again until one takes it, for at most `within`. Whether
    /// one did.
    pub async fn cast_within(&self, message: M, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut pause = Duration::from_millis(10);
        let mut message = message;
        loop {
            message = match self.get() {
                Some(actor) => match actor.cast(message) {
                    Ok(()) => return true,
                    Err(MessagingErr::SendErr(back)) => back,
                    // Not for a typed reference's cast; nothing to try again with.
                    Err(_) => return false,
                },
                None => message,
            };
            if Instant::now() + pause > deadline {
                return false;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ractor::{Actor, ActorProcessingErr, ActorRef};
    use tokio::sync::mpsc;

    use super::ActorSlot;

    /// Hands each message it gets to the test.
    struct Forward;

    impl Actor for Forward {
        type Msg = u32;
        type State = mpsc::UnboundedSender<u32>;
        type Arguments = mpsc::UnboundedSender<u32>;

        async fn pre_start(
            &self,
            _me: ActorRef<u32>,
            out: Self::Arguments,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(out)
        }

        async fn handle(
            &self,
            _me: ActorRef<u32>,
            message: u32,
            out: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            let _ = out.send(message);
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_cast_waits_for_the_actor_that_replaces_a_stopped_one() {
        let (out, mut received) = mpsc::unbounded_channel();
        let slot = ActorSlot::default();
        let (first, handle) = Actor::spawn(None, Forward, out.clone())
            .await
            .expect("spawn");
        slot.set(first.clone());
        first.stop(None);
        handle.await.expect("stopped");
        let restarted = {
            let slot = slot.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let (second, _) = Actor::spawn(None, Forward, out).await.expect("spawn");
                slot.set(second);
            })
        };
        assert!(slot.cast_within(7, Duration::from_secs(10)).await);
        let got = tokio::time::timeout(Duration::from_secs(10), received.recv())
            .await
            .expect("the new actor handled the cast within 10 s");
        assert_eq!(got, Some(7), "the new actor got it");
        restarted.await.expect("restarted");
    }

    #[tokio::test]
    async fn a_cast_gives_up_when_no_actor_takes_it_in_time() {
        let slot = ActorSlot::<u32>::default();
        assert!(!slot.cast_within(7, Duration::from_millis(50)).await);
    }
}
