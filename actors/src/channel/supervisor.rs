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

/// The live channel actors, by channel. Updated by the supervisor when it restarts one.
#[derive(Clone, Default)]
pub struct ChannelDirectory {
    inner: Arc<RwLock<HashMap<Channel, ActorRef<ChannelMsg>>>>,
}

impl ChannelDirectory {
    /// The actor currently serving `channel`, if the channel is configured.
    pub fn get(&self, channel: Channel) -> Option<ActorRef<ChannelMsg>> {
        self.inner
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&channel)
            .cloned()
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

    /// Snapshots of every channel actor that answers within `timeout`.
    pub async fn snapshots(&self, timeout: Duration) -> Vec<ChannelSnapshot> {
        let mut out = Vec::new();
        for channel in self.channels() {
            if let Some(actor) = self.get(channel)
                && let Ok(ractor::rpc::CallResult::Success(snapshot)) =
                    actor.call(ChannelMsg::Snapshot, Some(timeout)).await
            {
                out.push(snapshot);
            }
        }
        out
    }

    fn set(&self, channel: Channel, actor: ActorRef<ChannelMsg>) {
        self.inner
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(channel, actor);
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
        let channel = args.provider().channel();
        let (actor, _) = Actor::spawn_linked(None, ChannelActor, args.clone(), supervisor).await?;
        state.children.insert(actor.get_id(), args);
        state.directory.set(channel, actor);
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
