//! `EngineSupervisor`: starts the StatusWriter, the ChannelSupervisor and the Dispatcher, and
//! restarts whichever fails. Messages a failed actor had in flight were not acked, so JetStream
//! redelivers them; every restart is counted in `herald_actor_restarts_total`.

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::channel::{ChannelArgs, ChannelDirectory, ChannelSupervisor, ChannelSupervisorArgs};
use crate::dispatcher::{Dispatcher, DispatcherArgs, DispatcherMsg};
use crate::slot::ActorSlot;
use crate::status_writer::{StatusWriter, StatusWriterArgs, StatusWriterMsg};

/// Arguments of the [`EngineSupervisor`].
pub struct EngineArgs {
    /// Status writer arguments.
    pub status_writer: StatusWriterArgs,
    /// Filled with the live status writer (the dispatcher's deliveries use the same slot).
    pub status_writer_slot: ActorSlot<StatusWriterMsg>,
    /// One entry per configured provider.
    pub channels: Vec<ChannelArgs>,
    /// Where channel actors are published.
    pub directory: ChannelDirectory,
    /// Dispatcher arguments.
    pub dispatcher: DispatcherArgs,
    /// Filled with the live dispatcher (for fault injection and introspection).
    pub dispatcher_slot: ActorSlot<DispatcherMsg>,
}

/// Children of the engine and how to restart them.
pub struct EngineState {
    status_writer: (ActorRef<StatusWriterMsg>, StatusWriterArgs),
    status_writer_slot: ActorSlot<StatusWriterMsg>,
    dispatcher: (ActorRef<DispatcherMsg>, DispatcherArgs),
    dispatcher_slot: ActorSlot<DispatcherMsg>,
    channels: ActorCell,
}

/// The root supervisor.
pub struct EngineSupervisor;

impl Actor for EngineSupervisor {
    type Msg = ();
    type State = EngineState;
    type Arguments = EngineArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<()>,
        args: EngineArgs,
    ) -> Result<EngineState, ActorProcessingErr> {
        let (writer, _) = Actor::spawn_linked(
            None,
            StatusWriter,
            args.status_writer.clone(),
            myself.get_cell(),
        )
        .await?;
        args.status_writer_slot.set(writer.clone());
        let (channels, _) = Actor::spawn_linked(
            None,
            ChannelSupervisor,
            ChannelSupervisorArgs {
                channels: args.channels,
                directory: args.directory,
            },
            myself.get_cell(),
        )
        .await?;
        let (dispatcher, _) =
            Actor::spawn_linked(None, Dispatcher, args.dispatcher.clone(), myself.get_cell())
                .await?;
        args.dispatcher_slot.set(dispatcher.clone());
        Ok(EngineState {
            status_writer: (writer, args.status_writer),
            status_writer_slot: args.status_writer_slot,
            dispatcher: (dispatcher, args.dispatcher),
            dispatcher_slot: args.dispatcher_slot,
            channels: channels.get_cell(),
        })
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        event: SupervisionEvent,
        state: &mut EngineState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match &event {
            SupervisionEvent::ActorFailed(cell, err) => (cell.clone(), err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (
                cell.clone(),
                reason.clone().unwrap_or_else(|| "stopped".into()),
            ),
            _ => return Ok(()),
        };
        let id = cell.get_id();
        if id == state.dispatcher.0.get_id() {
            tracing::warn!(%why, "dispatcher stopped; restarting");
            metrics::counter!("herald_actor_restarts_total", "actor" => "dispatcher").increment(1);
            let args = state.dispatcher.1.clone();
            let (dispatcher, _) =
                Actor::spawn_linked(None, Dispatcher, args, myself.get_cell()).await?;
            state.dispatcher_slot.set(dispatcher.clone());
            state.dispatcher.0 = dispatcher;
        } else if id == state.status_writer.0.get_id() {
            tracing::warn!(%why, "status writer stopped; restarting");
            metrics::counter!("herald_actor_restarts_total", "actor" => "status_writer")
                .increment(1);
            let args = state.status_writer.1.clone();
            let (writer, _) =
                Actor::spawn_linked(None, StatusWriter, args, myself.get_cell()).await?;
            state.status_writer_slot.set(writer.clone());
            state.status_writer.0 = writer;
        } else if id == state.channels.get_id() {
            // The channel supervisor only fails if it cannot restart a channel actor; that is
            // fatal for the engine, and the process supervisor (systemd, Kubernetes) restarts it.
            return Err(format!("channel supervisor stopped: {why}").into());
        }
        Ok(())
    }
}
