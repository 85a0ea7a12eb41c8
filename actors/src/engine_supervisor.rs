//! `EngineSupervisor`: starts the StatusWriter, the ChannelSupervisor, the
//! RateLimiterSupervisor, the Dispatcher, the LeaseKeeper, the Scheduler, the Router and the
//! OutboxRelay, and restarts whichever fails, at once the first time and after a growing delay
//! when it fails again soon ([`RestartBackoff`]). Messages a failed actor had in flight were not
//! acked, so JetStream redelivers them; every restart is counted in `herald_actor_restarts_total`.
//! A child is restarted with a clone of its arguments, so what they share outlives it: the
//! dispatcher's [`crate::dispatcher::PartitionDeliveries`] (a drain after a restart waits for
//! the deliveries started before it) and the lease deadlines (a restarted lease keeper tells the
//! rate limiter only of the partitions it took without telling it).
//!
//! The supervisor itself fails when a child cannot be restarted (its `pre_start` fails) or when
//! the ChannelSupervisor stops; its children are killed with it (ractor runs no `post_stop` for
//! them, so the partition leases expire after their TTL rather than being handed back while
//! deliveries of this process may still run), and `herald serve` exits with an error
//! (the engine's end is watched, see `Herald::engine_stopped`) for the process supervisor to
//! restart it.

use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::time::Instant;

use crate::channel::{ChannelArgs, ChannelDirectory, ChannelSupervisor, ChannelSupervisorArgs};
use crate::dispatcher::{Dispatcher, DispatcherArgs, DispatcherMsg};
use crate::outbox_relay::{OutboxRelay, OutboxRelayArgs};
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

/// A supervised child: its current reference, what it was started with, where it is published,
/// and the pace of its restarts.
struct Child<A: Actor> {
    /// Its label in logs and in `herald_actor_restarts_total`.
    name: &'static str,
    actor: ActorRef<A::Msg>,
    args: A::Arguments,
    slot: Option<ActorSlot<A::Msg>>,
    backoff: RestartBackoff,
}

impl<A> Child<A>
where
    A: Actor,
    A::Arguments: Clone,
{
    async fn start(
        name: &'static str,
        actor: A,
        args: A::Arguments,
        slot: Option<ActorSlot<A::Msg>>,
        supervisor: ActorCell,
    ) -> Result<Self, ActorProcessingErr> {
        let (started, _) = Actor::spawn_linked(None, actor, args.clone(), supervisor).await?;
        if let Some(slot) = &slot {
            slot.set(started.clone());
        }
        Ok(Child {
            name,
            actor: started,
            args,
            slot,
            backoff: RestartBackoff::default(),
        })
    }

    fn is(&self, cell: &ActorCell) -> bool {
        self.actor.get_id() == cell.get_id()
    }

    /// Starts it again after its backoff delay; an error (it failed in `pre_start`) fails the
    /// engine.
    async fn restart(
        &mut self,
        actor: A,
        supervisor: ActorCell,
        why: &str,
    ) -> Result<(), ActorProcessingErr> {
        let delay = self.backoff.next(Instant::now());
        tracing::warn!(
            actor = self.name,
            %why,
            delay_ms = delay.as_millis() as u64,
            "actor stopped; restarting"
        );
        metrics::counter!("herald_actor_restarts_total", "actor" => self.name).increment(1);
        tokio::time::sleep(delay).await;
        let (started, _) = Actor::spawn_linked(None, actor, self.args.clone(), supervisor)
            .await
            .map_err(|err| format!("{} could not be restarted: {err}", self.name))?;
        if let Some(slot) = &self.slot {
            slot.set(started.clone());
        }
        self.actor = started;
        Ok(())
    }
}

/// The first restart of a child that has run for [`RestartBackoff::RESET_AFTER`] is immediate;
/// each further one within that time waits twice as long as the last, from
/// [`RestartBackoff::FIRST_DELAY`] up to [`RestartBackoff::MAX_DELAY`]. A child failing as it
/// starts is so restarted a few times a second at first and then every few seconds, not in a
/// tight loop.
#[derive(Debug, Default)]
pub struct RestartBackoff {
    last: Option<(Instant, Duration)>,
}

impl RestartBackoff {
    /// A child that ran this long since its last restart is restarted at once.
    pub const RESET_AFTER: Duration = Duration::from_secs(30);
    /// The delay of the second restart in a row.
    pub const FIRST_DELAY: Duration = Duration::from_millis(100);
    /// The longest delay.
    pub const MAX_DELAY: Duration = Duration::from_secs(5);

    /// How long to wait before the restart asked for `now`.
    pub fn next(&mut self, now: Instant) -> Duration {
        let delay = match self.last {
            Some((at, delay)) if now.saturating_duration_since(at) < Self::RESET_AFTER => {
                (delay * 2).clamp(Self::FIRST_DELAY, Self::MAX_DELAY)
            }
            _ => Duration::ZERO,
        };
        // Counted from when the restarted child runs.
        self.last = Some((now + delay, delay));
        delay
    }
}

/// Children of the engine and how to restart them.
pub struct EngineState {
    status_writer: Child<StatusWriter>,
    dispatcher: Child<Dispatcher>,
    channels: ActorCell,
    lease_keeper: Child<LeaseKeeper>,
    rate_limiter: Child<RateLimiterSupervisor>,
    scheduler: Child<Scheduler>,
    router: Child<Router>,
    outbox_relay: Child<OutboxRelay>,
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
        let me = myself.get_cell();
        let status_writer = Child::start(
            "status_writer",
            StatusWriter,
            args.status_writer,
            Some(args.status_writer_slot),
            me.clone(),
        )
        .await?;
        let (channels, _) = Actor::spawn_linked(
            None,
            ChannelSupervisor,
            ChannelSupervisorArgs {
                channels: args.channels,
                directory: args.directory,
            },
            me.clone(),
        )
        .await?;
        let rate_limiter = Child::start(
            "rate_limiter_supervisor",
            RateLimiterSupervisor,
            args.rate_limiter,
            Some(args.rate_limiter_slot),
            me.clone(),
        )
        .await?;
        let dispatcher = Child::start(
            "dispatcher",
            Dispatcher,
            args.dispatcher,
            Some(args.dispatcher_slot),
            me.clone(),
        )
        .await?;
        let lease_keeper = Child::start(
            "lease_keeper",
            LeaseKeeper,
            args.lease_keeper,
            Some(args.lease_keeper_slot),
            me.clone(),
        )
        .await?;
        let scheduler = Child::start(
            "scheduler",
            Scheduler,
            args.scheduler,
            Some(args.scheduler_slot),
            me.clone(),
        )
        .await?;
        let router = Child::start(
            "router",
            Router,
            args.router,
            Some(args.router_slot),
            me.clone(),
        )
        .await?;
        let outbox_relay =
            Child::start("outbox_relay", OutboxRelay, args.outbox_relay, None, me).await?;
        Ok(EngineState {
            status_writer,
            dispatcher,
            channels: channels.get_cell(),
            lease_keeper,
            rate_limiter,
            scheduler,
            router,
            outbox_relay,
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
        let me = myself.get_cell();
        if state.dispatcher.is(&cell) {
            state.dispatcher.restart(Dispatcher, me, &why).await?;
        } else if state.lease_keeper.is(&cell) {
            state.lease_keeper.restart(LeaseKeeper, me, &why).await?;
        } else if state.router.is(&cell) {
            state.router.restart(Router, me, &why).await?;
        } else if state.outbox_relay.is(&cell) {
            state.outbox_relay.restart(OutboxRelay, me, &why).await?;
        } else if state.status_writer.is(&cell) {
            state.status_writer.restart(StatusWriter, me, &why).await?;
        } else if state.rate_limiter.is(&cell) {
            state
                .rate_limiter
                .restart(RateLimiterSupervisor, me, &why)
                .await?;
        } else if state.scheduler.is(&cell) {
            state.scheduler.restart(Scheduler, me, &why).await?;
        } else if cell.get_id() == state.channels.get_id() {
            // The channel supervisor only fails if it cannot restart a channel actor; that is
            // fatal for the engine, and the process supervisor (systemd, Kubernetes) restarts it.
            return Err(format!("channel supervisor stopped: {why}").into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_in_a_row_back_off_up_to_a_bound_and_reset_after_a_quiet_run() {
        let mut backoff = RestartBackoff::default();
        let mut now = Instant::now();
        assert_eq!(
            backoff.next(now),
            Duration::ZERO,
            "the first restart is immediate"
        );
        let mut delays = Vec::new();
        for _ in 0..10 {
            let delay = backoff.next(now);
            delays.push(delay);
            now += delay;
        }
        assert_eq!(delays[0], RestartBackoff::FIRST_DELAY);
        assert_eq!(delays[1], RestartBackoff::FIRST_DELAY * 2);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
        assert_eq!(delays[9], RestartBackoff::MAX_DELAY, "{delays:?}");
        now += RestartBackoff::RESET_AFTER;
        assert_eq!(
            backoff.next(now),
            Duration::ZERO,
            "a quiet run resets the backoff"
        );
    }
}
