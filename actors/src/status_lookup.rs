//! Group reads of notification progress (status and attempts made): the dispatcher checks every
//! command's stored status before sending (never send what is unknown or already final), and doing that one query per
//! command costs more than the send. Lookups that arrive together are answered by one query;
//! an idle lookup is answered at once.

use std::collections::HashMap;

use herald_entities::repo::{self, notifications::Progress};
use sea_orm::DatabaseConnection;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Most ids per query.
const MAX_BATCH: usize = 500;

type Reply = oneshot::Sender<Result<Option<Progress>, String>>;

/// Handle to the lookup task; cheap to clone. The task ends when every handle is dropped.
#[derive(Clone)]
pub struct StatusLookup {
    requests: mpsc::Sender<(Uuid, Reply)>,
}

impl StatusLookup {
    /// Starts the lookup task on `db`.
    pub fn spawn(db: DatabaseConnection) -> Self {
        let (requests, receiver) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(serve(db, receiver));
        Self { requests }
    }

    /// The stored progress of `id`, `None` if there is no such notification.
    pub async fn progress(&self, id: Uuid) -> Result<Option<Progress>, String> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send((id, reply))
            .await
            .map_err(|_| "status lookup stopped".to_string())?;
        answer
            .await
            .map_err(|_| "status lookup dropped the request".to_string())?
    }
}

async fn serve(db: DatabaseConnection, mut receiver: mpsc::Receiver<(Uuid, Reply)>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while receiver.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let ids: Vec<Uuid> = batch.iter().map(|(id, _)| *id).collect();
        let found: Result<HashMap<Uuid, Progress>, String> =
            repo::notifications::progress_of(&db, &ids)
                .await
                .map_err(|e| e.to_string());
        for (id, reply) in batch.drain(..) {
            let answer = match &found {
                Ok(statuses) => Ok(statuses.get(&id).copied()),
                Err(err) => Err(err.clone()),
            };
            let _ = reply.send(answer);
        }
    }
}
