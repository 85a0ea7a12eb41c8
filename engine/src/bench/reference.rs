//! The reference: raw JetStream publish + consume of the same number of messages of the same size,
//! on the same server, in the same run — what the transport alone can do here.

use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, consumer::pull, stream};
use bytes::Bytes;
use futures::{StreamExt, stream::FuturesUnordered};
use herald_nats::Connection;

const STREAM: &str = "HERALD_BENCH_REFERENCE";
/// Publish acks outstanding at once.
const ACK_WINDOW: usize = 1_000;

/// Publishes `count` messages of `size` bytes with pipelined acks while a durable pull consumer
/// consumes and acks them; returns messages per second over the whole exchange.
pub async fn jetstream_rate(nats: Connection<'_>, count: u64, size: usize) -> anyhow::Result<f64> {
    let client = herald_nats::connect::connect_within(nats, super::NATS_PATIENCE).await?;
    let js = jetstream::new(client);
    let _ = js.delete_stream(STREAM).await;
    let stream = js
        .create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec!["herald_bench.ref".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("reference stream")?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("reference".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await
        .context("reference consumer")?;
    let payload = Bytes::from(vec![b'x'; size]);
    let started = Instant::now();
    let consume = tokio::spawn(async move {
        let mut messages = consumer.messages().await?;
        let mut seen = 0u64;
        while seen < count {
            match tokio::time::timeout(Duration::from_secs(30), messages.next()).await {
                Ok(Some(Ok(message))) => {
                    message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                    seen += 1;
                }
                Ok(Some(Err(err))) => anyhow::bail!("reference consume: {err}"),
                Ok(None) | Err(_) => anyhow::bail!("reference consume stalled at {seen}"),
            }
        }
        anyhow::Ok(())
    });
    let mut acks = FuturesUnordered::new();
    for _ in 0..count {
        if acks.len() >= ACK_WINDOW
            && let Some(ack) = acks.next().await
        {
            ack?;
        }
        let ack = js.publish("herald_bench.ref", payload.clone()).await?;
        acks.push(async move { ack.await.map(|_| ()).map_err(anyhow::Error::from) });
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    consume.await??;
    let rate = count as f64 / started.elapsed().as_secs_f64();
    let _ = js.delete_stream(STREAM).await;
    Ok(rate)
}
