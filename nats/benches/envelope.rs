//! Envelope encode/decode: every send command is encoded once when accepted and decoded once per
//! delivery; every domain event is decoded once by the Router.
//!
//! `cargo bench -p herald-nats --bench envelope`

use std::hint::black_box;

use chrono::Utc;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use herald_nats::events::{OrderCreated, OrderItem};
use herald_nats::{
    Category, Channel, Contacts, Content, DomainEvent, EventData, SCHEMA_VERSION, SendCommand,
};
use uuid::Uuid;

/// A command shaped like the bench's load: one email, subject and text.
fn command() -> SendCommand {
    SendCommand {
        v: SCHEMA_VERSION,
        notification_id: Uuid::now_v7(),
        customer_id: Some("customer-4711".into()),
        contacts: Contacts {
            email: Some("customer-4711@bench.invalid".into()),
            ..Contacts::default()
        },
        category: Category::Transactional,
        channels: vec![Channel::Email, Channel::Sms],
        content: Content {
            subject: Some("Your order #100042 is confirmed".into()),
            text: "Thanks for your order #100042. We'll tell you when it ships.".into(),
            html: Some("<p>Thanks for your order <b>#100042</b>.</p>".into()),
            short: None,
            template: None,
        },
        created_at: Utc::now(),
    }
}

fn order_created() -> DomainEvent {
    DomainEvent::new(EventData::OrderCreated(OrderCreated {
        customer_id: "customer-4711".into(),
        order_number: "100042".into(),
        total_minor: 4_200,
        currency: "EUR".into(),
        items: vec![
            OrderItem {
                name: "Tea".into(),
                quantity: 2,
                unit_price_minor: 1_050,
            },
            OrderItem {
                name: "Cup".into(),
                quantity: 1,
                unit_price_minor: 2_100,
            },
        ],
    }))
}

fn send_command(c: &mut Criterion) {
    let cmd = command();
    let bytes = cmd.encode().expect("encodes");
    let mut group = c.benchmark_group("send_command");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("encode", |b| b.iter(|| black_box(&cmd).encode()));
    group.bench_function("encoded_len", |b| b.iter(|| black_box(&cmd).encoded_len()));
    group.bench_function("decode", |b| {
        b.iter(|| SendCommand::decode(black_box(&bytes)))
    });
    group.finish();
}

fn domain_event(c: &mut Criterion) {
    let event = order_created();
    let bytes = event.encode().expect("encodes");
    let mut group = c.benchmark_group("domain_event");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("encode", |b| b.iter(|| black_box(&event).encode()));
    group.bench_function("decode", |b| {
        b.iter(|| DomainEvent::decode(black_box(&bytes)))
    });
    group.finish();
}

criterion_group!(benches, send_command, domain_event);
criterion_main!(benches);
