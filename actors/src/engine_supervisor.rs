//! `EngineSupervisor`: starts the StatusWriter, the ChannelSupervisor, the
//! RateLimiterSupervisor, the Dispatcher, the LeaseKeeper, the Scheduler, the Router and the
//! OutboxRelay, and restarts whichever fails. Messages a failed actor had in flight were not acked, so JetStream
//! redelivers them; every restart is counted in `herald_actor_restarts_total`.

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::channel::{ChannelArgs, ChannelDirectory, ChannelSupervisor, ChannelSupervisorArgs};
use crate::dispatcher::{Dispatcher, DispatcherArgs, DispatcherMsg};
use crate::outbox_relay::{OutboxRelay, OutboxRelayArgs, OutboxRelayMsg};
use crate::partitions::{LeaseKeeper, LeaseKeeperArgs, LeaseKeeperMsg};
use crate::rate_limit::supervisor::{
    RateLimiterSupervisor, RateLimiterSupervisorArgs, RateLimiterSupervisorMsg,
};
use crate::router::{Router, RouterArgs, RouterMsg};
use crate::scheduler::{Scheduler, SchedulerArgs, SchedulerMsg};
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
    /// Partition lease keeper arguments.
    pub lease_keeper: LeaseKeeperArgs,
    /// Filled with the live lease keeper (shutdown asks it to hand the leases back).
    pub lease_keeper_slot: ActorSlot<LeaseKeeperMsg>,
    /// Rate limiter registry arguments.
    pub rate_limiter: RateLimiterSupervisorArgs,
    /// Filled with the live rate limiter registry (deliveries ask it).
    pub rate_limiter_slot: ActorSlot<RateLimiterSupervisorMsg>,
    /// Scheduler arguments.
    pub scheduler: SchedulerArgs,
    /// Filled with the live scheduler.
    pub scheduler_slot: ActorSlot<SchedulerMsg>,
    /// Router arguments.
    pub router: RouterArgs,
    /// Filled with the live router (for fault injection).
    pub router_slot: ActorSlot<RouterMsg>,
    /// Outbox relay arguments.
    pub outbox_relay: OutboxRelayArgs,
}

/// Children of the engine and how to restart them.
pub struct EngineState {
    status_writer: (ActorRef<StatusWriterMsg>, StatusWriterArgs),
    status_writer_slot: ActorSlot<StatusWriterMsg>,
    dispatcher: (ActorRef<DispatcherMsg>, DispatcherArgs),
    dispatcher_slot: ActorSlot<DispatcherMsg>,
    channels: ActorCell,
    lease_keeper: (ActorRef<LeaseKeeperMsg>, LeaseKeeperArgs),
    lease_keeper_slot: ActorSlot<LeaseKeeperMsg>,
    rate_limiter: (
        ActorRef<RateLimiterSupervisorMsg>,
        RateLimiterSupervisorArgs,
    ),
    rate_limiter_slot: ActorSlot<RateLimiterSupervisorMsg>,
    scheduler: (ActorRef<SchedulerMsg>, SchedulerArgs),
    scheduler_slot: ActorSlot<SchedulerMsg>,
    router: (ActorRef<RouterMsg>, RouterArgs),
    router_slot: ActorSlot<RouterMsg>,
    outbox_relay: (ActorRef<OutboxRelayMsg>, OutboxRelayArgs),
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
        let (rate_limiter, _) = Actor::spawn_linked(
            None,
            RateLimiterSupervisor,
            args.rate_limiter.clone(),
            myself.get_cell(),
        )
        .await?;
        args.rate_limiter_slot.set(rate_limiter.clone());
        let (dispatcher, _) =
            Actor::spawn_linked(None, Dispatcher, args.dispatcher.clone(), myself.get_cell())
                .await?;
        args.dispatcher_slot.set(dispatcher.clone());
        let (lease_keeper, _) = Actor::spawn_linked(
            None,
            LeaseKeeper,
            args.lease_keeper.clone(),
            myself.get_cell(),
        )
        .await?;
        args.lease_keeper_slot.set(lease_keeper.clone());
        let (scheduler, _) =
            Actor::spawn_linked(None, Scheduler, args.scheduler.clone(), myself.get_cell()).await?;
        args.scheduler_slot.set(scheduler.clone());
        let (router, _) =
            Actor::spawn_linked(None, Router, args.router.clone(), myself.get_cell()).await?;
        args.router_slot.set(router.clone());
        let (relay, _) = Actor::spawn_linked(
            None,
            OutboxRelay,
            args.outbox_relay.clone(),
            myself.get_cell(),
        )
        .await?;
        Ok(EngineState {
            router: (router, args.router),
            router_slot: args.router_slot,
            outbox_relay: (relay, args.outbox_relay),
            rate_limiter: (rate_limiter, args.rate_limiter),
            rate_limiter_slot: args.rate_limiter_slot,
            scheduler: (scheduler, args.scheduler),
            scheduler_slot: args.scheduler_slot,
            status_writer: (writer, args.status_writer),
            status_writer_slot: args.status_writer_slot,
            dispatcher: (dispatcher, args.dispatcher),
            dispatcher_slot: args.dispatcher_slot,
            channels: channels.get_cell(),
            lease_keeper: (lease_keeper, args.lease_keeper),
            lease_keeper_slot: args.lease_keeper_slot,
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
        } else if id == state.lease_keeper.0.get_id() {
            tracing::warn!(%why, "lease keeper stopped; restarting");
            metrics::counter!("herald_actor_restarts_total", "actor" => "lease_keeper")
                .increment(1);
            let args = state.lease_keeper.1.clone();
            let (keeper, _) =
                Actor::spawn_linked(None, LeaseKeeper, args, myself.get_cell()).await?;
            state.lease_keeper_slot.set(keeper.clone());
            state.lease_keeper.0 = keeper;
        } else if id == state.router.0.get_id() {
            tracing::warn!(%why, "router stopped; restarting");
            metrics::counter!("herald_actor_restarts_total", "actor" => "router").increment(1);
            let args = state.router.1.clone();
            let (router, _) = Actor::spawn_linked(None, Router, args, myself.get_cell()).await?;
            state.router_slot.set(router.clone());
            state.router.0 = router;
        } else if id == state.outbox_relay.0.get_id() {
            tracing::warn!(%why, "outbox relay stopped; restarting");
            metrics::counter!("herald_actor_restarts_total", "actor" => "outbox_relay")
                .increment(1);
            let args = state.outbox_relay.1.clone();
            let (relay, _) =
                Actor::spawn_linked(None, OutboxRelay, args, myself.get_cell()).await?;
            state.outbox_relay.0 = relay;
        } else if id == state.status_writer.0.get_id() {
            tracing::warn!(%why, "status writer stopped; restarting");
            metrics::counter!("herald_actor_restarts_total", "actor" => "status_writer")
                .increment(1);
            let args = state.status_writer.1.clone();
            let (writer, _) =
                Actor::spawn_linked(None, StatusWriter, args, myself.get_cell()).await?;
            state.status_writer_slot.set(writer.clone());
            state.status_writer.0 = writer;
        } else if id == state.rate_limiter.0.get_id() {
            tracing::warn!(%why, "rate limiter registry stopped; restarting");
            metrics::counter!("herald_actor_restarts_total", "actor" => "rate_limiter_supervisor")
                .increment(1);
            let args = state.rate_limiter.1.clone();
            let (limiter, _) =
                Actor::spawn_linked(None, RateLimiterSupervisor, args, myself.get_cell()).await?;
            state.rate_limiter_slot.set(limiter.clone());
            state.rate_limiter.0 = limiter;
        } else if id == state.scheduler.0.get_id() {
            tracing::warn!(%why, "scheduler stopped; restarting");
            metrics::counter!("herald_actor_restarts_total", "actor" => "scheduler").increment(1);
            let args = state.scheduler.1.clone();
            let (scheduler, _) =
                Actor::spawn_linked(None, Scheduler, args, myself.get_cell()).await?;
            state.scheduler_slot.set(scheduler.clone());
            state.scheduler.0 = scheduler;
        } else if id == state.channels.get_id() {
            // The channel supervisor only fails if it cannot restart a channel actor; that is
            // fatal for the engine, and the process supervisor (systemd, Kubernetes) restarts it.
            return Err(format!("channel supervisor stopped: {why}").into());
        }
        Ok(())
    }
}
