//! Health, readiness, channel status, metrics and the published API description.

use herald_api::health::READINESS_TIMEOUT;
use herald_tests::{
    E2E_TIMEOUT, NatsServer, SmtpSink, TestDatabase, TestHerald, eventually, test_config,
};
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn readiness_follows_nats_and_reports_channels() {
    let mut nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let herald = TestHerald::start(test_config(&nats, &db, &smtp))
        .await
        .expect("herald");

    let (status, live) = herald.get("/health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(live["status"], "ok");

    let (status, ready) = herald.get("/health/ready").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["database"]["ok"], true);
    assert_eq!(ready["engine"]["ok"], true, "{ready}");
    assert_eq!(ready["pending_commands"], 0);
    assert_eq!(ready["channels"][0]["channel"], "email");
    assert_eq!(ready["channels"][0]["circuit"], "closed");

    nats.kill().await.expect("kill nats");
    let (status, not_ready) = eventually("readiness to fail", Duration::from_secs(15), || async {
        let (status, body) = herald.get("/health/ready").await;
        (status == StatusCode::SERVICE_UNAVAILABLE).then_some((status, body))
    })
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(not_ready["nats"]["ok"], false, "{not_ready}");
    // Liveness is unaffected: the process is fine, it waits for NATS.
    assert_eq!(herald.get("/health").await.0, StatusCode::OK);

    nats.restart().await.expect("restart nats");
    eventually("readiness to recover", Duration::from_secs(20), || async {
        (herald.get("/health/ready").await.0 == StatusCode::OK).then_some(())
    })
    .await;
    herald.shutdown().await.expect("shutdown");
}

/// The engine's root supervisor dying took every actor with it while the API went on answering 202
/// and readiness 200: nothing noticed. Readiness now reports the engine, and the engine's end is
/// watched (`herald serve` exits on it).
#[tokio::test]
async fn a_stopped_engine_turns_readiness_503_and_is_noticed() {
    let nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let herald = TestHerald::start(test_config(&nats, &db, &smtp))
        .await
        .expect("herald");
    let (status, ready) = herald.get("/health/ready").await;
    assert_eq!(status, StatusCode::OK, "{ready}");

    // The engine's root supervisor fails (killed: no shutdown asked for it).
    let supervisor = herald
        .app()
        .dispatcher()
        .expect("dispatcher")
        .get_cell()
        .try_get_supervisor()
        .expect("the dispatcher is supervised by the engine supervisor");
    supervisor.kill();

    tokio::time::timeout(Duration::from_secs(10), herald.app().engine_stopped())
        .await
        .expect("the engine's end is noticed within 10 s");
    let (status, not_ready) = eventually(
        "readiness to report the stopped engine",
        Duration::from_secs(10),
        || async {
            let (status, body) = herald.get("/health/ready").await;
            (status == StatusCode::SERVICE_UNAVAILABLE).then_some((status, body))
        },
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(not_ready["engine"]["ok"], false, "{not_ready}");
    assert_eq!(not_ready["nats"]["ok"], true, "{not_ready}");
    herald.shutdown().await.expect("shutdown");
}

/// Readiness asked JetStream for each stream one after another, each request allowed the client's
/// 5 s: with NATS connected but JetStream not answering (a cluster without quorum) a probe timed out
/// before the `503` came. The checks now run together under one bound, and a check that has not
/// answered by then is reported as failed, by name.
#[tokio::test]
async fn readiness_answers_503_naming_a_jetstream_that_does_not_answer() {
    let nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let herald = TestHerald::start(test_config(&nats, &db, &smtp))
        .await
        .expect("herald");
    let (status, ready) = herald.get("/health/ready").await;
    assert_eq!(status, StatusCode::OK, "{ready}");

    // The connection stays up (no ping goes unanswered this soon) while nothing answers.
    nats.freeze().expect("SIGSTOP");
    // Twice the bound: the request waits for nothing else, the old one waited 5 s at least.
    let limit = READINESS_TIMEOUT * 2;
    let answer = tokio::time::timeout(limit, herald.get("/health/ready")).await;
    nats.resume().expect("SIGCONT");
    let (status, not_ready) = answer.unwrap_or_else(|_| {
        panic!("/health/ready did not answer within {limit:?} while JetStream was silent")
    });
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{not_ready}");
    assert_eq!(not_ready["status"], "not_ready", "{not_ready}");
    assert_eq!(not_ready["nats"]["ok"], true, "{not_ready}");
    assert_eq!(not_ready["streams"]["ok"], false, "{not_ready}");
    assert_eq!(
        not_ready["streams"]["detail"],
        format!("EVENTS: no answer within {} s", READINESS_TIMEOUT.as_secs()),
        "{not_ready}"
    );
    assert_eq!(not_ready["database"]["ok"], true, "{not_ready}");
    herald.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn channels_metrics_and_the_openapi_spec_are_served() {
    let nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let herald = TestHerald::start(test_config(&nats, &db, &smtp))
        .await
        .expect("herald");

    let (status, channels) = herald.get("/api/v1/channels").await;
    assert_eq!(status, StatusCode::OK);
    let email = &channels[0];
    assert_eq!(email["channel"], "email");
    assert_eq!(email["provider"], "smtp");
    assert_eq!(email["circuit"], "closed");

    let (status, spec) = herald.get("/api/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        spec["openapi"]
            .as_str()
            .unwrap_or_default()
            .starts_with("3.")
    );
    for path in [
        "/api/v1/notifications",
        "/api/v1/notifications/{id}",
        "/api/v1/channels",
        "/health",
        "/health/ready",
    ] {
        assert!(spec["paths"].get(path).is_some(), "spec documents {path}");
    }
    assert!(
        spec["components"]["schemas"].get("ErrorBody").is_some(),
        "the error shape is documented"
    );

    let docs = herald
        .http()
        .get(format!("{}/api/docs", herald.base()))
        .send()
        .await
        .expect("docs");
    assert_eq!(docs.status(), StatusCode::OK);
    assert!(docs.text().await.unwrap_or_default().contains("swagger"));

    let metrics = herald.metrics_text().await;
    assert!(metrics.contains("herald_circuit_state"), "{metrics}");
    herald.shutdown().await.expect("shutdown");
}

/// `/metrics` exposed every histogram as a summary (quantiles of one process, no buckets), which
/// cannot be added up across instances and which `histogram_quantile()` does not read. They are
/// Prometheus histograms now, labels kept on every bucket.
#[tokio::test]
async fn durations_are_exposed_as_prometheus_histograms() {
    let nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let herald = TestHerald::start(test_config(&nats, &db, &smtp))
        .await
        .expect("herald");
    let id = herald
        .send_accepted(&serde_json::json!({
            "recipient": { "email": "ada@example.com" },
            "category": "transactional",
            "channels": ["email"],
            "content": { "subject": "Hello", "text": "Hello there." }
        }))
        .await;
    herald.wait_status(&id, "sent").await;

    let text = herald.metrics_text().await;
    assert!(!text.contains(" summary\n"), "no summaries: {text}");
    assert!(!text.contains("quantile="), "no summaries: {text}");
    assert!(
        text.contains("# TYPE herald_attempt_seconds histogram"),
        "{text}"
    );
    assert!(
        herald
            .metric(
                "herald_attempt_seconds_bucket",
                &[("channel", "email"), ("le", "+Inf")]
            )
            .await
            >= 1.0,
        "an email attempt in the +Inf bucket: {text}"
    );
    assert!(
        text.contains("# TYPE herald_api_send_stage_seconds histogram"),
        "{text}"
    );
    for stage in ["store", "publish"] {
        assert!(
            herald
                .metric(
                    "herald_api_send_stage_seconds_bucket",
                    &[("stage", stage), ("le", "+Inf")]
                )
                .await
                >= 1.0,
            "a send's {stage} in the +Inf bucket: {text}"
        );
    }
    assert!(
        herald
            .metric("herald_attempt_seconds_count", &[("channel", "email")])
            .await
            >= 1.0,
        "{text}"
    );
    herald.shutdown().await.expect("shutdown");
}

/// The samples of `herald_notifications_accepted_total` from `source`.
async fn accepted(herald: &TestHerald, source: &str) -> f64 {
    herald
        .metric("herald_notifications_accepted_total", &[("source", source)])
        .await
}

/// Waits until `herald_notifications_accepted_total{source}` reaches `at_least`.
async fn accepted_reaches(herald: &TestHerald, source: &str, at_least: f64) {
    eventually(
        &format!("herald_notifications_accepted_total{{source=\"{source}\"}} to reach {at_least}"),
        E2E_TIMEOUT,
        || async { (accepted(herald, source).await >= at_least).then_some(()) },
    )
    .await;
}

/// `herald_notifications_accepted_total` counted only sends to `POST /api/v1/notifications` that
/// were to go out now. It counts every notification Herald accepts, by where it came from: a send
/// through the API (a scheduled one too), a notification the Router made from a domain event, and
/// each recipient of a bulk send once the fan-out stores it. Read as increases: the recorder is
/// shared by every test of the process.
#[tokio::test]
async fn every_accepted_notification_counts_in_accepted_total_by_source() {
    let nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let herald = TestHerald::start(test_config(&nats, &db, &smtp))
        .await
        .expect("herald");
    let email = |to: &str| {
        json!({
            "recipient": { "email": to },
            "category": "transactional",
            "channels": ["email"],
            "content": { "subject": "Hello", "text": "Hello there." }
        })
    };

    let api = accepted(&herald, "api").await;
    herald.send_accepted(&email("now@example.com")).await;
    let mut later = email("later@example.com");
    later["scheduled_at"] = json!((chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339());
    let (status, body) = herald.send(&later).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"], "scheduled", "{body}");
    let now = accepted(&herald, "api").await;
    assert!(
        now >= api + 2.0,
        "a send for now and a scheduled one counted when answered: {api} then {now}"
    );

    let (status, body) = herald
        .post(
            "/api/v1/customers",
            &json!({"id": "c-counted", "name": "Ada", "email": "ada@example.com",
                    "locale": "en", "timezone": "Europe/Berlin"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let event = accepted(&herald, "event").await;
    let event_id = uuid::Uuid::now_v7();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", event_id.to_string().as_str());
    let payload = json!({
        "v": 1,
        "id": event_id,
        "type": "orders.created",
        "occurred_at": "2026-11-22T10:00:00Z",
        "data": {"customer_id": "c-counted", "order_number": "7001", "total_minor": 4200,
                 "currency": "EUR",
                 "items": [{"name": "Green tea", "quantity": 2, "unit_price_minor": 2100}]}
    });
    async_nats::jetstream::new(nats.client().await.expect("nats client"))
        .publish_with_headers("events.orders.created", headers, payload.to_string().into())
        .await
        .expect("publish")
        .await
        .expect("stored by JetStream");
    accepted_reaches(&herald, "event", event + 1.0).await;

    let bulk = accepted(&herald, "bulk").await;
    let (status, body) = herald
        .post(
            "/api/v1/notifications/bulk",
            &json!({
                "recipients": [
                    { "email": "one@example.com" },
                    { "email": "two@example.com" },
                    { "email": "three@example.com" }
                ],
                "category": "transactional",
                "channels": ["email"],
                "content": { "subject": "News", "text": "For all three." }
            }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    accepted_reaches(&herald, "bulk", bulk + 3.0).await;
    // The event's email and the bulk send's three went out: each counted source was delivered.
    smtp.wait_for_count(5, E2E_TIMEOUT)
        .await
        .expect("the event's and the bulk send's emails, and the send for now");
    herald.shutdown().await.expect("shutdown");
}

/// An instance whose `nats.partitions` is not the count the deployment records (another instance
/// recorded its own while the record was missing) consumes no partition: readiness says so with
/// `503` and `partitions.conflict`, so it is taken out of rotation (its send commands go by the
/// recorded count meanwhile), and is ready again once the counts agree. The running instance used to write
/// its own count back over the recorded one with every heartbeat and stay ready.
#[tokio::test]
async fn readiness_fails_while_another_partition_count_is_recorded() {
    let nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let mut config = test_config(&nats, &db, &smtp);
    config.cluster.lease_ttl_ms = 2_000;
    config.nats.partitions = 8;
    let herald = TestHerald::start(config).await.expect("herald");
    eventually(
        "the instance to own its partitions",
        E2E_TIMEOUT,
        || async {
            let (status, ready) = herald.get("/health/ready").await;
            (status == StatusCode::OK && ready["partitions"]["owned"].as_array()?.len() == 8)
                .then_some(())
        },
    )
    .await;

    // Another instance started with 16 while the record was missing, and recorded 16.
    let js = async_nats::jetstream::new(nats.client().await.expect("client"));
    let kv = js
        .get_key_value(herald_nats::leases::LEASE_BUCKET)
        .await
        .expect("the lease bucket");
    let key = herald_nats::leases::PARTITIONS_KEY;
    kv.put(key, "16".into()).await.expect("record 16");
    let not_ready = eventually(
        "readiness to report the partition count conflict",
        Duration::from_secs(10),
        || async {
            let (status, ready) = herald.get("/health/ready").await;
            (status == StatusCode::SERVICE_UNAVAILABLE).then_some(ready)
        },
    )
    .await;
    assert_eq!(not_ready["status"], "not_ready");
    let conflict = not_ready["partitions"]["conflict"]
        .as_str()
        .unwrap_or_else(|| panic!("the conflict is named: {not_ready}"));
    assert!(
        conflict.contains("nats.partitions = 8 but the deployment records 16"),
        "{conflict}"
    );
    assert_eq!(not_ready["partitions"]["owned"], json!([]), "{not_ready}");
    assert_eq!(
        kv.get(key).await.expect("read").as_deref(),
        Some(&b"16"[..]),
        "the recorded count is not overwritten"
    );

    // The counts agree again: it takes its partitions again and is ready.
    kv.put(key, "8".into()).await.expect("record 8");
    eventually("readiness to recover", Duration::from_secs(15), || async {
        let (status, ready) = herald.get("/health/ready").await;
        (status == StatusCode::OK
            && ready["partitions"].get("conflict").is_none()
            && ready["partitions"]["owned"].as_array()?.len() == 8)
            .then_some(())
    })
    .await;
    herald.shutdown().await.expect("shutdown");
}
