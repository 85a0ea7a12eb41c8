//! The per-delivery decisions of the hot path: rendering a template (the Router, once per
//! notification of an event), the token-bucket decision (the rate limiter, once per limited
//! notification) and the circuit-breaker decision (the channel actor, once per send).
//!
//! `cargo bench -p herald-actors --bench hot_path`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use herald_actors::channel::circuit::{CircuitBreaker, CircuitSettings, FailureSource};
use herald_actors::policy::token_bucket::{BucketSpec, TokenBucket};
use herald_actors::templates;
use serde_json::{Map, Value, json};
use uuid::Uuid;

fn order_placed_vars() -> Map<String, Value> {
    let vars = json!({
        "customer_name": "Ada Lovelace",
        "order_number": "100042",
        "total": "42.00 EUR",
        "items": [
            { "name": "Tea", "quantity": 2, "price": "21.00 EUR" },
            { "name": "Cup", "quantity": 1, "price": "21.00 EUR" }
        ]
    });
    match vars {
        Value::Object(map) => map,
        _ => unreachable!("a JSON object literal"),
    }
}

fn template_render(c: &mut Criterion) {
    let vars = order_placed_vars();
    let mut group = c.benchmark_group("template_render");
    group.bench_function("order_placed_en", |b| {
        b.iter(|| templates::render("order_placed", black_box("en"), "en", black_box(&vars)))
    });
    group.bench_function("order_placed_de_DE_fallback", |b| {
        b.iter(|| templates::render("order_placed", black_box("de-DE"), "en", black_box(&vars)))
    });
    group.finish();
}

fn token_bucket(c: &mut Criterion) {
    // The default transactional limit: 30 a minute.
    let spec = BucketSpec {
        capacity: 30,
        period: Duration::from_secs(60),
    };
    let t0 = Instant::now();
    let mut group = c.benchmark_group("rate_limit_decision");
    group.bench_function("take_allowed", |b| {
        b.iter_batched_ref(
            || TokenBucket::full(&spec, t0),
            |bucket| bucket.take(&spec, black_box(t0)),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("take_refused", |b| {
        let mut empty = TokenBucket::full(&spec, t0);
        while empty.take(&spec, t0).is_ok() {}
        b.iter(|| empty.take(&spec, black_box(t0)))
    });
    group.finish();
}

fn circuit_decision(c: &mut Criterion) {
    let now = Instant::now();
    let mut group = c.benchmark_group("circuit_decision");
    group.bench_function("closed_admit_and_success", |b| {
        let mut circuit = CircuitBreaker::new(CircuitSettings::default());
        b.iter(|| {
            let admission = circuit.admit(black_box(now));
            let period = circuit.period();
            circuit.on_success(admission, period, now);
            admission
        })
    });
    group.bench_function("open_refuse", |b| {
        let mut circuit = CircuitBreaker::new(CircuitSettings::default());
        circuit.open(now, None);
        b.iter(|| circuit.admit(black_box(now)))
    });
    group.bench_function("closed_failure_in_window", |b| {
        // Each run has a breaker of its own: one source serves them all, and its id is not timed.
        let source = FailureSource::Notification(Uuid::now_v7());
        b.iter_batched_ref(
            || CircuitBreaker::new(CircuitSettings::default()),
            |circuit| {
                let admission = circuit.admit(now);
                let period = circuit.period();
                circuit.on_failure(admission, period, source, black_box(now), None);
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, template_render, token_bucket, circuit_decision);
criterion_main!(benches);
