//! What a delivery holds until its outcome is written and acknowledged: an in-flight permit (the
//! dispatcher's bound on concurrent work, with the partition's lease deadline) and a reservation
//! of its notification id in this process.
//!
//! The reservation keeps a second copy of the same command out while the first is being worked
//! on: after a NATS restart, JetStream redelivers messages whose processing is still under way
//! here, and without it both copies would pass the database claim (a `processing` notification is
//! claimed again, for the redelivery of a delivery that stopped) and send.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::task::task_tracker::TaskTrackerToken;
use uuid::Uuid;

use crate::partitions::PartitionLease;

/// What the dispatcher hands a delivery: a slot of the in-flight bound, a token of its
/// partition's tracker (a partition being handed to another instance waits for its tokens), and
/// the partition's lease deadline.
pub struct DeliveryPermit {
    /// The in-flight slot.
    pub slot: OwnedSemaphorePermit,
    /// Held while the delivery runs.
    pub partition: TaskTrackerToken,
    /// The partition's lease, checked again right before the channels are tried.
    pub lease: PartitionLease,
}

/// Notification ids being delivered by this process.
#[derive(Clone, Default)]
pub struct InFlight {
    ids: Arc<Mutex<HashSet<Uuid>>>,
}

impl InFlight {
    /// Reserves `id`; `None` when another delivery of it is under way.
    pub fn reserve(&self, id: Uuid) -> Option<Reservation> {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        ids.insert(id).then(|| Reservation {
            id,
            ids: self.ids.clone(),
        })
    }

    /// How many notifications are being delivered.
    pub fn len(&self) -> usize {
        self.ids.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A reservation of one notification id, released when dropped.
pub struct Reservation {
    id: Uuid,
    ids: Arc<Mutex<HashSet<Uuid>>>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// The permit and, once the command is decoded, the reservation; both released together.
pub struct Lease {
    permit: DeliveryPermit,
    reservation: Option<Reservation>,
}

impl Lease {
    /// A lease holding only the permit.
    pub fn new(permit: DeliveryPermit) -> Self {
        Self {
            permit,
            reservation: None,
        }
    }

    /// Adds the reservation of the notification.
    pub fn with_reservation(mut self, reservation: Reservation) -> Self {
        self.reservation = Some(reservation);
        self
    }

    /// Whether this instance still holds the command's partition (its lease deadline has not
    /// passed while the delivery waited).
    pub fn partition_held(&self) -> bool {
        self.permit.lease.holds()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_reservation_waits_for_the_first_to_be_dropped() {
        let in_flight = InFlight::default();
        let id = Uuid::now_v7();
        let first = in_flight.reserve(id).expect("first reservation");
        assert!(
            in_flight.reserve(id).is_none(),
            "a copy is refused while in flight"
        );
        assert!(
            in_flight.reserve(Uuid::now_v7()).is_some(),
            "other ids are free"
        );
        drop(first);
        assert!(in_flight.reserve(id).is_some(), "released with the first");
        assert!(in_flight.is_empty());
    }
}
