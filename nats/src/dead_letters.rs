//! Reading and removing dead letters on `NOTIFY_DLQ`.
//!
//! Entries are read one by one with the JetStream "get message" API (`STREAM.MSG.GET` with
//! `next_by_subj`), which skips deleted sequences and works on nats-server 2.9; no consumer is
//! created, so listing leaves no state behind on the server.

use async_nats::jetstream::{self, stream::RawMessageErrorKind};
use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::{NatsError, subjects};

/// One dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Its sequence number in `NOTIFY_DLQ`; the handle to replay or delete it.
    pub seq: u64,
    /// The subject it was published on (`notify.dlq.<source>`).
    pub subject: String,
    /// Why it was dead-lettered (`Herald-Dlq-Reason`).
    pub reason: Option<String>,
    /// Where the message was first published (`Herald-Original-Subject`).
    pub original_subject: Option<String>,
    /// How many times it had been delivered (`Herald-Deliveries`).
    pub deliveries: Option<u64>,
    /// Providers called in its last round (`Herald-Providers`).
    pub providers: Vec<String>,
    /// When it was dead-lettered.
    pub at: DateTime<Utc>,
    /// The original message, unchanged.
    pub payload: Bytes,
}

/// The dead-letter stream.
pub struct DeadLetters {
    stream: jetstream::stream::Stream<()>,
}

impl DeadLetters {
    /// The dead-letter stream of `js` (no request is made until it is read).
    pub async fn open(js: &jetstream::Context) -> Result<Self, NatsError> {
        let stream = js
            .get_stream_no_info(subjects::DLQ_STREAM)
            .await
            .map_err(|e| read_error("stream", e))?;
        Ok(Self { stream })
    }

    /// The first dead letter at or after sequence `seq`, if any.
    pub async fn next_from(&self, seq: u64) -> Result<Option<DeadLetter>, NatsError> {
        let found = self
            .stream
            .raw_message_builder()
            .sequence(seq.max(1))
            .next_by_subject(subjects::DLQ_ALL.to_string())
            .send()
            .await;
        match found {
            Ok(message) => Ok(Some(convert(message))),
            Err(err) if matches!(err.kind(), RawMessageErrorKind::NoMessageFound) => Ok(None),
            Err(err) => Err(read_error("message", err)),
        }
    }

    /// The dead letter with sequence `seq`, if it exists.
    pub async fn get(&self, seq: u64) -> Result<Option<DeadLetter>, NatsError> {
        if seq == 0 {
            return Ok(None);
        }
        Ok(self
            .next_from(seq)
            .await?
            .filter(|letter| letter.seq == seq))
    }

    /// What `keep` makes of up to `limit` dead letters from sequence `from` on (those it makes
    /// nothing of are passed over), looking at no more than `max_scan` entries. Returns them and
    /// the sequence to continue from, when more may follow. Each entry is handed to `keep` as it
    /// is read, so a page holds only what `keep` returns: a summary keeps no payloads in memory.
    pub async fn page<T>(
        &self,
        from: u64,
        limit: usize,
        max_scan: usize,
        keep: impl Fn(DeadLetter) -> Option<T>,
    ) -> Result<(Vec<T>, Option<u64>), NatsError> {
        let mut found = Vec::new();
        let mut next = from.max(1);
        for _ in 0..max_scan {
            let Some(letter) = self.next_from(next).await? else {
                return Ok((found, None));
            };
            next = letter.seq + 1;
            if let Some(kept) = keep(letter) {
                found.push(kept);
                if found.len() >= limit {
                    break;
                }
            }
        }
        Ok((found, Some(next)))
    }

    /// The sequence number of the last message stored so far (0 when none ever was): an entry
    /// dead-lettered later has a higher one.
    pub async fn last_seq(&self) -> Result<u64, NatsError> {
        let info = self
            .stream
            .get_info()
            .await
            .map_err(|e| read_error("info", e))?;
        Ok(info.state.last_sequence)
    }

    /// Removes the dead letter with sequence `seq`; `false` when it was not there.
    pub async fn delete(&self, seq: u64) -> Result<bool, NatsError> {
        match self.stream.delete_message(seq).await {
            Ok(deleted) => Ok(deleted),
            Err(err) if err.to_string().contains("no message found") => Ok(false),
            Err(err) => Err(read_error("delete", err)),
        }
    }
}

fn convert(message: async_nats::jetstream::message::StreamMessage) -> DeadLetter {
    let header = |name: &str| {
        message
            .headers
            .get(name)
            .map(|value| value.as_str().to_string())
    };
    let nanos = message.time.unix_timestamp_nanos();
    let at = i64::try_from(nanos)
        .map(DateTime::from_timestamp_nanos)
        .unwrap_or_default();
    DeadLetter {
        seq: message.sequence,
        subject: message.subject.to_string(),
        reason: header(subjects::HEADER_DLQ_REASON),
        original_subject: header(subjects::HEADER_DLQ_ORIGINAL_SUBJECT),
        deliveries: header(subjects::HEADER_DLQ_DELIVERIES).and_then(|d| d.parse().ok()),
        providers: header(subjects::HEADER_DLQ_PROVIDERS)
            .map(|p| p.split(',').map(str::to_string).collect())
            .unwrap_or_default(),
        at,
        payload: message.payload,
    }
}

fn read_error(what: &str, err: impl std::fmt::Display) -> NatsError {
    NatsError::Read {
        what: format!("{} {what}", subjects::DLQ_STREAM),
        reason: err.to_string(),
    }
}
