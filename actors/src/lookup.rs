//! Reads the dispatcher makes for every command, grouped: lookups that arrive together are
//! answered by one query per table, an idle lookup at once. One query per command cost more than
//! the send: at 10,000 notifications/s the three reads of a recipient alone were 30,000 queries
//! a second, each a trip to the pool and back.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use herald_entities::{
    WriteGate, customer,
    repo::{
        self,
        customers::{ContactSet, Held},
        notifications::Claimed,
        preferences::Wishes,
    },
};
use herald_nats::Channel;
use sea_orm::DatabaseConnection;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Most keys per query.
const MAX_BATCH: usize = 500;

type Reply<V> = oneshot::Sender<Result<Option<V>, String>>;

/// Handle to a lookup task that answers lookups of `K` in batches; cheap to clone. The task ends
/// when every handle is dropped.
pub struct BatchLookup<K, V> {
    requests: mpsc::Sender<(K, Reply<V>)>,
}

impl<K, V> Clone for BatchLookup<K, V> {
    fn clone(&self) -> Self {
        Self {
            requests: self.requests.clone(),
        }
    }
}

impl<K, V> BatchLookup<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + 'static,
{
    /// Starts the lookup task: `load` answers a batch of distinct keys with the values found.
    pub fn spawn<L, F>(load: L) -> Self
    where
        L: Fn(Vec<K>) -> F + Send + 'static,
        F: Future<Output = Result<HashMap<K, V>, String>> + Send + 'static,
    {
        Self::start(load, None)
    }

    /// Like [`BatchLookup::spawn`], for a `load` that writes: each load runs in a turn at `gate`,
    /// and the keys that arrived while it waited for the turn join its batch.
    pub fn spawn_gated<L, F>(gate: WriteGate, load: L) -> Self
    where
        L: Fn(Vec<K>) -> F + Send + 'static,
        F: Future<Output = Result<HashMap<K, V>, String>> + Send + 'static,
    {
        Self::start(load, Some(gate))
    }

    fn start<L, F>(load: L, gate: Option<WriteGate>) -> Self
    where
        L: Fn(Vec<K>) -> F + Send + 'static,
        F: Future<Output = Result<HashMap<K, V>, String>> + Send + 'static,
    {
        let (requests, receiver) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(serve(load, receiver, gate));
        Self { requests }
    }

    /// The value of `key`, `None` if there is none.
    pub async fn get(&self, key: K) -> Result<Option<V>, String> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send((key, reply))
            .await
            .map_err(|_| "lookup stopped".to_string())?;
        answer
            .await
            .map_err(|_| "lookup dropped the request".to_string())?
    }
}

async fn serve<K, V, L, F>(
    load: L,
    mut receiver: mpsc::Receiver<(K, Reply<V>)>,
    gate: Option<WriteGate>,
) where
    K: Eq + Hash + Clone,
    V: Clone,
    L: Fn(Vec<K>) -> F,
    F: Future<Output = Result<HashMap<K, V>, String>>,
{
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while receiver.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let turn = match &gate {
            Some(gate) => {
                let turn = gate.enter().await;
                take_waiting(&mut receiver, &mut batch);
                Some(turn)
            }
            None => None,
        };
        let keys: HashSet<&K> = batch.iter().map(|(key, _)| key).collect();
        // A load that panics answers its batch with an error; the task goes on serving.
        let found = AssertUnwindSafe(load(keys.into_iter().cloned().collect()))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| Err("the lookup failed unexpectedly (it panicked)".to_string()));
        drop(turn);
        for (key, reply) in batch.drain(..) {
            let answer = match &found {
                Ok(values) => Ok(values.get(&key).cloned()),
                Err(err) => Err(err.clone()),
            };
            let _ = reply.send(answer);
        }
    }
}

/// Moves the requests already waiting into `batch`, up to [`MAX_BATCH`].
fn take_waiting<T>(receiver: &mut mpsc::Receiver<T>, batch: &mut Vec<T>) {
    while batch.len() < MAX_BATCH {
        match receiver.try_recv() {
            Ok(request) => batch.push(request),
            Err(_) => return,
        }
    }
}

/// Claims by notification id: the dispatcher claims every command's notification before
/// delivering it ([`repo::notifications::claim`]) and sends only what it claimed.
pub type ClaimLookup = BatchLookup<Uuid, Claimed>;

/// Starts a [`ClaimLookup`] on `db`; each batch's claim takes a turn at `gate`, and the ids that
/// arrived while it waited for the turn are claimed with it.
pub fn claims(db: DatabaseConnection, gate: WriteGate) -> ClaimLookup {
    BatchLookup::spawn_gated(gate, move |ids: Vec<Uuid>| {
        let db = db.clone();
        async move {
            repo::notifications::claim(&db, &ids)
                .await
                .map_err(|e| e.to_string())
        }
    })
}

/// What is stored about a recipient: the customer row, if any, and their wishes (which may be
/// stored for a customer id with no customer row).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recipient {
    /// The customer, `None` if no customer has this external id.
    pub customer: Option<customer::Model>,
    /// Preferences and quiet hours (empty when none are stored).
    pub wishes: Wishes,
}

/// Recipients by customer external id; every id has an answer.
pub type RecipientLookup = BatchLookup<String, Recipient>;

/// Starts a [`RecipientLookup`] on `db`: three queries per batch (customers, preferences, quiet
/// hours) instead of three per command.
pub fn recipients(db: DatabaseConnection) -> RecipientLookup {
    BatchLookup::spawn(move |ids: Vec<String>| {
        let db = db.clone();
        async move {
            let mut customers = repo::customers::find_many_by_external_id(&db, &ids)
                .await
                .map_err(|e| e.to_string())?;
            let wishes = repo::preferences::load_many(&db, &ids)
                .await
                .map_err(|e| e.to_string())?;
            Ok(wishes
                .into_iter()
                .map(|(id, wishes)| {
                    let customer = customers.remove(&id);
                    (id, Recipient { customer, wishes })
                })
                .collect())
        }
    })
}

/// A customer with stored wishes who holds contacts of a send that names no customer.
#[derive(Debug, Clone, PartialEq)]
pub struct ContactHolder {
    /// The customer and their wishes.
    pub recipient: Recipient,
    /// Which of the send's contacts they hold.
    pub held: Held,
}

impl ContactHolder {
    /// Whether they hold the send's contact on `channel`.
    pub fn holds(&self, channel: Channel) -> bool {
        match channel {
            Channel::Email => self.held.email,
            Channel::Sms => self.held.phone,
            Channel::Telegram => self.held.telegram_chat_id,
            Channel::Push => self.held.push_token,
            Channel::Webhook => self.held.webhook_url,
        }
    }
}

/// The customers with stored wishes holding a send's contacts, by the send's [`ContactSet`]
/// (an absent answer: none).
pub type ContactHolderLookup = BatchLookup<ContactSet, Vec<ContactHolder>>;

/// Starts a [`ContactHolderLookup`] on `db`: per batch, one query finds the customers with
/// stored wishes holding any of the batch's contacts; their wishes are read only when there are
/// some.
pub fn contact_holders(db: DatabaseConnection) -> ContactHolderLookup {
    BatchLookup::spawn(move |sets: Vec<ContactSet>| {
        let db = db.clone();
        async move {
            let customers = repo::customers::with_wishes_holding(&db, &sets)
                .await
                .map_err(|e| e.to_string())?;
            if customers.is_empty() {
                return Ok(HashMap::new());
            }
            let ids: Vec<String> = customers.iter().map(|c| c.external_id.clone()).collect();
            let mut wishes = repo::preferences::load_many(&db, &ids)
                .await
                .map_err(|e| e.to_string())?;
            let found: Vec<Recipient> = customers
                .into_iter()
                .map(|customer| Recipient {
                    wishes: wishes.remove(&customer.external_id).unwrap_or_default(),
                    customer: Some(customer),
                })
                .collect();
            Ok(sets
                .into_iter()
                .map(|set| {
                    let holders = holders_of(&set, &found);
                    (set, holders)
                })
                .collect())
        }
    })
}

/// The recipients of `found` holding contacts of `set`.
fn holders_of(set: &ContactSet, found: &[Recipient]) -> Vec<ContactHolder> {
    found
        .iter()
        .filter_map(|recipient| {
            let held = set.held_by(recipient.customer.as_ref()?);
            held.any().then(|| ContactHolder {
                recipient: recipient.clone(),
                held,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::sync::Semaphore;

    use super::*;

    type Calls = Arc<Mutex<Vec<Vec<u32>>>>;

    /// How the load numbered `.1` (from 0) goes wrong.
    #[derive(Clone, Copy)]
    enum Fault {
        None,
        Fails(usize),
        Panics(usize),
    }

    /// A lookup whose loads record the keys they were asked for, then wait for a permit each;
    /// every key `k` is found with the value `k * 10`, except 0, which is never found.
    fn recording(permits: Arc<Semaphore>, fault: Fault) -> (BatchLookup<u32, u32>, Calls) {
        let calls = Calls::default();
        let seen = calls.clone();
        let lookup = BatchLookup::spawn(move |mut keys: Vec<u32>| {
            let (permits, seen) = (permits.clone(), seen.clone());
            async move {
                keys.sort_unstable();
                let load = {
                    let mut seen = seen.lock().expect("not poisoned");
                    seen.push(keys.clone());
                    seen.len() - 1
                };
                permits.acquire().await.expect("open").forget();
                match fault {
                    Fault::Fails(n) if n == load => return Err("database is down".to_string()),
                    Fault::Panics(n) if n == load => panic!("a bug in load {n}"),
                    _ => {}
                }
                Ok(keys
                    .into_iter()
                    .filter(|&k| k != 0)
                    .map(|k| (k, k * 10))
                    .collect())
            }
        });
        (lookup, calls)
    }

    /// Waits (at most 5 s) until `done` holds.
    async fn until(what: &str, done: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !done() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
    }

    /// Holds a first load of key 9 until `keys` are queued behind it, then lets the loads run;
    /// answers the queued lookups.
    async fn queued_behind_a_load(
        lookup: &BatchLookup<u32, u32>,
        calls: &Calls,
        permits: &Semaphore,
        keys: &[u32],
    ) -> Vec<Result<Option<u32>, String>> {
        let get = |key| {
            let lookup = lookup.clone();
            tokio::spawn(async move { lookup.get(key).await })
        };
        let first = get(9);
        until("the first load started", || {
            calls.lock().unwrap().len() == 1
        })
        .await;
        let rest: Vec<_> = keys.iter().copied().map(get).collect();
        let queued = || lookup.requests.max_capacity() - lookup.requests.capacity();
        until("the lookups queued behind it", || queued() == keys.len()).await;
        permits.add_permits(2);
        assert_eq!(first.await.expect("joined"), Ok(Some(90)));
        let mut answers = Vec::new();
        for task in rest {
            answers.push(task.await.expect("joined"));
        }
        answers
    }

    #[tokio::test]
    async fn lookups_that_arrive_during_a_load_share_the_next_load_with_keys_once() {
        let permits = Arc::new(Semaphore::new(0));
        let (lookup, calls) = recording(permits.clone(), Fault::None);
        let answers = queued_behind_a_load(&lookup, &calls, &permits, &[2, 3, 2, 0]).await;
        assert_eq!(
            answers,
            vec![Ok(Some(20)), Ok(Some(30)), Ok(Some(20)), Ok(None)]
        );
        assert_eq!(
            *calls.lock().expect("not poisoned"),
            vec![vec![9], vec![0, 2, 3]],
            "one load for the first lookup, one for the four that waited, each key once"
        );
    }

    #[tokio::test]
    async fn a_gated_load_takes_the_keys_that_arrived_while_it_waited_for_its_turn() {
        let gate = WriteGate::for_url("sqlite::memory:");
        let calls = Calls::default();
        let seen = calls.clone();
        let lookup = BatchLookup::spawn_gated(gate.clone(), move |mut keys: Vec<u32>| {
            let seen = seen.clone();
            async move {
                keys.sort_unstable();
                seen.lock().expect("not poisoned").push(keys.clone());
                Ok(keys.into_iter().map(|k| (k, k * 10)).collect())
            }
        });
        let queued = || lookup.requests.max_capacity() - lookup.requests.capacity();
        let held = gate.enter().await;
        let (reply, first) = oneshot::channel();
        lookup.requests.send((1, reply)).await.expect("serving");
        until("the first lookup is taken and waits for the turn", || {
            queued() == 0
        })
        .await;
        let get = |key| {
            let lookup = lookup.clone();
            tokio::spawn(async move { lookup.get(key).await })
        };
        let (second, third) = (get(2), get(3));
        until("two more lookups wait behind it", || queued() == 2).await;
        drop(held);
        assert_eq!(first.await.expect("answered"), Ok(Some(10)));
        assert_eq!(second.await.expect("joined"), Ok(Some(20)));
        assert_eq!(third.await.expect("joined"), Ok(Some(30)));
        assert_eq!(
            *calls.lock().expect("not poisoned"),
            vec![vec![1, 2, 3]],
            "one load in the turn, for the key that waited for it and the two that came meanwhile"
        );
    }

    #[tokio::test]
    async fn a_failing_or_panicking_load_answers_its_batch_with_an_error_and_the_next_runs() {
        for fault in [Fault::Fails(1), Fault::Panics(1)] {
            let permits = Arc::new(Semaphore::new(0));
            let (lookup, calls) = recording(permits.clone(), fault);
            let answers = queued_behind_a_load(&lookup, &calls, &permits, &[1, 2]).await;
            assert_eq!(answers.len(), 2);
            for answer in answers {
                let err = answer.expect_err("the failed load's lookups get its error");
                assert!(err.contains("down") || err.contains("panicked"), "{err}");
            }
            permits.add_permits(1);
            assert_eq!(
                lookup.get(3).await,
                Ok(Some(30)),
                "the task goes on serving"
            );
            assert_eq!(
                *calls.lock().expect("not poisoned"),
                vec![vec![9], vec![1, 2], vec![3]]
            );
        }
    }
}
