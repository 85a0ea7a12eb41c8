//! `ChannelSupervisor`: owns one [`ChannelActor`] per configured provider and restarts any that
//! fails, with a clone of its [`ChannelArgs`]: the restarted actor shares the concurrency permits
//! with the sends the failed one left running. Dispatchers find the current actor of a channel in
//! the shared [`ChannelDirectory`].

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use herald_nats::Channel;
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::actor::{ChannelActor, ChannelArgs, ChannelMsg, ChannelSnapshot};

/// The live channel actors, by channel, with the name of the provider each sends through.
/// Updated by the supervisor when it restarts one.
#[derive(Clone, Default)]
pub struct ChannelDirectory {
    inner: Arc<RwLock<HashMap<Channel, Serving>>>,
}

/// The actor serving a channel, and its provider's name.
#[derive(Clone)]
struct Serving {
    actor: ActorRef<ChannelMsg>,
    provider: Arc<str>,
}

impl ChannelDirectory {
    /// The actor currently serving `channel`, if the channel is configured.
    pub fn get(&self, channel: Channel) -> Option<ActorRef<ChannelMsg>> {
        self.serving(channel).map(|(actor, _)| actor)
    }

    /// The actor currently serving `channel` and the name of the provider it sends through, if
    /// the channel is configured: the provider an attempt names when the actor did not answer.
    pub fn serving(&self, channel: Channel) -> Option<(ActorRef<ChannelMsg>, Arc<str>)> {
        self.inner
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&channel)
            .map(|serving| (serving.actor.clone(), serving.provider.clone()))
    }

    /// The configured channels.
    pub fn channels(&self) -> Vec<Channel> {
        let mut channels: Vec<Channel> = self
            .inner
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .keys()
            .copied()
            .collect();
        channels.sort();
        channels
    }

    /// Snapshots of every channel actor that answers within `timeout`, in channel order. They
    /// are asked together: one actor that does not answer (busy, restarting) costs the whole
    /// call `timeout` once and leaves out only its own snapshot, not the others' after it.
    pub async fn snapshots(&self, timeout: Duration) -> Vec<ChannelSnapshot> {
        let asked = self.channels().into_iter().filter_map(|channel| {
            let actor = self.get(channel)?;
            Some(async move { actor.call(ChannelMsg::Snapshot, Some(timeout)).await })
        });
        futures::future::join_all(asked)
            .await
            .into_iter()
            .filter_map(|answer| match answer {
                Ok(ractor::rpc::CallResult::Success(snapshot)) => Some(snapshot),
                _ => None,
            })
            .collect()
    }

    /// Publishes `actor`, sending through the provider named `provider`, as the one serving
    /// `channel` (the supervisor's, and tests' standing in for it).
    pub(crate) fn set(&self, channel: Channel, provider: &str, actor: ActorRef<ChannelMsg>) {
        let serving = Serving {
            actor,
            provider: provider.into(),
        };
        self.inner
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(channel, serving);
    }
}

/// Arguments of the [`ChannelSupervisor`].
pub struct ChannelSupervisorArgs {
    /// The providers to run, one actor each.
    pub channels: Vec<ChannelArgs>,
    /// Where the live actors are published.
    pub directory: ChannelDirectory,
}

/// State of the [`ChannelSupervisor`].
pub struct ChannelSupervisorState {
    children: HashMap<ActorId, ChannelArgs>,
    directory: ChannelDirectory,
}

/// Supervises the channel actors.
pub struct ChannelSupervisor;

impl ChannelSupervisor {
    async fn start_child(
        supervisor: ActorCell,
        state: &mut ChannelSupervisorState,
        args: ChannelArgs,
    ) -> Result<(), ActorProcessingErr> {
        let (channel, provider) = (args.provider().channel(), args.provider().name().to_owned());
        let (actor, _) = Actor::spawn_linked(None, ChannelActor, args.clone(), supervisor).await?;
        state.children.insert(actor.get_id(), args);
        state.directory.set(channel, &provider, actor);
        Ok(())
    }
}

impl Actor for ChannelSupervisor {
    type Msg = ();
    type State = ChannelSupervisorState;
    type Arguments = ChannelSupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<()>,
        args: ChannelSupervisorArgs,
    ) -> Result<ChannelSupervisorState, ActorProcessingErr> {
        let mut state = ChannelSupervisorState {
            children: HashMap::new(),
            directory: args.directory,
        };
        for child in args.channels {
            Self::start_child(myself.get_cell(), &mut state, child).await?;
        }
        Ok(state)
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        event: SupervisionEvent,
        state: &mut ChannelSupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match &event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.clone().unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        if let Some(args) = state.children.remove(&cell.get_id()) {
            tracing::warn!(provider = args.provider().name(), %why, "channel actor stopped; restarting");
            metrics::counter!("herald_actor_restarts_total", "actor" => "channel").increment(1);
            Self::start_child(myself.get_cell(), state, args).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::Notify;

    use super::*;
    use crate::channel::circuit::CircuitState;

    /// A stand-in channel actor: answers a snapshot only once `answer_after` is notified (none:
    /// at once), or never when `silent`, and notifies `asked` when a snapshot is asked of it.
    struct StandIn;

    struct StandInArgs {
        channel: Channel,
        silent: bool,
        asked: Arc<Notify>,
        answer_after: Option<Arc<Notify>>,
    }

    impl Actor for StandIn {
        type Msg = ChannelMsg;
        type State = StandInArgs;
        type Arguments = StandInArgs;

        async fn pre_start(
            &self,
            _myself: ActorRef<ChannelMsg>,
            args: StandInArgs,
        ) -> Result<StandInArgs, ActorProcessingErr> {
            Ok(args)
        }

        async fn handle(
            &self,
            _myself: ActorRef<ChannelMsg>,
            message: ChannelMsg,
            state: &mut StandInArgs,
        ) -> Result<(), ActorProcessingErr> {
            let ChannelMsg::Snapshot(reply) = message else {
                return Ok(());
            };
            state.asked.notify_one();
            if state.silent {
                // Never answered: the port is kept until the actor stops.
                std::mem::forget(reply);
                return Ok(());
            }
            let channel = state.channel;
            let answer_after = state.answer_after.clone();
            tokio::spawn(async move {
                if let Some(signal) = answer_after {
                    signal.notified().await;
                }
                let _ = reply.send(snapshot(channel));
            });
            Ok(())
        }
    }

    fn snapshot(channel: Channel) -> ChannelSnapshot {
        ChannelSnapshot {
            channel,
            provider: channel.as_str().into(),
            circuit: CircuitState::Closed,
            throttled: false,
            recent_failures: 0,
            times_opened: 0,
            probe_at: None,
            in_flight: 0,
            sent: 0,
            failed: 0,
            refused: 0,
            last_error: None,
        }
    }

    /// The actors are asked together: email answers only once sms, after it in channel order and
    /// silent, has been asked; asked one after another, email's call would run out first.
    #[tokio::test]
    async fn a_silent_channel_actor_leaves_out_only_its_own_snapshot() {
        let sms_asked = Arc::new(Notify::new());
        let (email, _) = Actor::spawn(
            None,
            StandIn,
            StandInArgs {
                channel: Channel::Email,
                silent: false,
                asked: Arc::new(Notify::new()),
                answer_after: Some(sms_asked.clone()),
            },
        )
        .await
        .expect("email stand-in");
        let (sms, _) = Actor::spawn(
            None,
            StandIn,
            StandInArgs {
                channel: Channel::Sms,
                silent: true,
                asked: sms_asked,
                answer_after: None,
            },
        )
        .await
        .expect("sms stand-in");
        let directory = ChannelDirectory::default();
        directory.set(Channel::Email, "email", email.clone());
        directory.set(Channel::Sms, "sms", sms.clone());
        assert_eq!(directory.channels(), [Channel::Email, Channel::Sms]);

        let snapshots = directory.snapshots(Duration::from_secs(2)).await;
        let answered: Vec<Channel> = snapshots.iter().map(|s| s.channel).collect();
        assert_eq!(
            answered,
            [Channel::Email],
            "the silent one left out, only it"
        );
        email.stop(None);
        sms.stop(None);
    }
}
