//! Property tests of the send-command envelope: decoding never panics, whatever the bytes, and
//! every command round-trips.

use chrono::{DateTime, Utc};
use herald_nats::{
    Category, Channel, CommandDecodeError, Contacts, Content, SCHEMA_VERSION, SendCommand,
};
use proptest::prelude::*;
use uuid::Uuid;

fn channel() -> impl Strategy<Value = Channel> {
    prop::sample::select(Channel::ALL.to_vec())
}

fn category() -> impl Strategy<Value = Category> {
    prop::sample::select(Category::ALL.to_vec())
}

fn text() -> impl Strategy<Value = String> {
    // Any Unicode, control characters and quotes included.
    any::<String>()
}

fn contacts() -> impl Strategy<Value = Contacts> {
    (
        prop::option::of(text()),
        prop::option::of(text()),
        prop::option::of(text()),
        prop::collection::vec(text(), 0..3),
        prop::option::of(text()),
    )
        .prop_map(
            |(email, phone, telegram_chat_id, push_tokens, webhook_url)| Contacts {
                email,
                phone,
                telegram_chat_id,
                push_tokens,
                webhook_url,
            },
        )
}

fn content() -> impl Strategy<Value = Content> {
    (
        prop::option::of(text()),
        text(),
        prop::option::of(text()),
        prop::option::of(text()),
    )
        .prop_map(|(subject, text, html, short)| Content {
            subject,
            text,
            html,
            short,
            template: None,
        })
}

fn command() -> impl Strategy<Value = SendCommand> {
    (
        any::<u128>(),
        prop::option::of(text()),
        contacts(),
        category(),
        prop::collection::vec(channel(), 0..6),
        content(),
        0i64..4_102_444_800,
        0u32..1_000_000_000,
    )
        .prop_map(
            |(id, customer_id, contacts, category, channels, content, secs, nanos)| SendCommand {
                v: SCHEMA_VERSION,
                notification_id: Uuid::from_u128(id),
                customer_id,
                contacts,
                category,
                channels,
                content,
                created_at: DateTime::<Utc>::from_timestamp(secs, nanos).unwrap_or_default(),
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = SendCommand::decode(&bytes);
    }

    #[test]
    fn decoding_arbitrary_json_objects_never_panics(
        v in prop_oneof![Just(serde_json::json!(1)), any::<i64>().prop_map(serde_json::Value::from), text().prop_map(serde_json::Value::from)],
        fields in prop::collection::hash_map("[a-z_]{1,16}", prop_oneof![
            any::<i64>().prop_map(serde_json::Value::from),
            text().prop_map(serde_json::Value::from),
            Just(serde_json::Value::Null),
            Just(serde_json::json!([])),
            Just(serde_json::json!({})),
        ], 0..8),
    ) {
        let mut object: serde_json::Map<String, serde_json::Value> = fields.into_iter().collect();
        object.insert("v".into(), v.clone());
        let bytes = serde_json::to_vec(&object).expect("json");
        match SendCommand::decode(&bytes) {
            Ok(command) => prop_assert_eq!(u64::from(command.v), 1),
            Err(CommandDecodeError::UnknownVersion(n)) => prop_assert_ne!(n, 1),
            Err(_) => {}
        }
        if v != serde_json::json!(1) && v.as_u64().is_some() {
            prop_assert!(matches!(SendCommand::decode(&bytes), Err(CommandDecodeError::UnknownVersion(_))));
        }
    }

    #[test]
    fn commands_round_trip(command in command()) {
        let bytes = command.encode().expect("encodes");
        prop_assert_eq!(SendCommand::decode(&bytes).expect("decodes"), command);
    }

    #[test]
    fn truncated_commands_are_errors_not_panics(command in command(), cut in any::<prop::sample::Index>()) {
        let bytes = command.encode().expect("encodes");
        let cut = cut.index(bytes.len());
        prop_assert!(SendCommand::decode(&bytes[..cut]).is_err());
    }
}
