//! Property tests of the send-request validators: they never panic, and what they accept keeps
//! the promised shape.

use proptest::prelude::*;

use super::*;

fn opt_text() -> impl Strategy<Value = Option<String>> {
    prop::option::of(any::<String>())
}

fn recipient() -> impl Strategy<Value = Recipient> {
    (
        opt_text(),
        prop::option::of(prop_oneof![
            any::<String>(),
            "[a-z0-9.+ -]{0,20}@[a-z0-9.-]{0,20}",
        ]),
        prop::option::of(prop_oneof![any::<String>(), "\\+?[0-9 ]{0,20}"]),
        opt_text(),
        prop::collection::vec(any::<String>(), 0..25),
        opt_text(),
    )
        .prop_map(
            |(customer_id, email, phone, telegram_chat_id, push_tokens, webhook_url)| Recipient {
                customer_id,
                email,
                phone,
                telegram_chat_id,
                push_tokens,
                webhook_url,
            },
        )
}

fn content() -> impl Strategy<Value = MessageContent> {
    (opt_text(), any::<String>(), opt_text(), opt_text()).prop_map(
        |(subject, text, html, short)| MessageContent {
            subject,
            text,
            html,
            short,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn recipient_validation_never_panics_and_keeps_its_promises(r in recipient()) {
        if let Ok(ValidRecipient { contacts, customer_id, key }) = validate_recipient(&r) {
            prop_assert!(customer_id.is_none_or(|id| id.trim() == id && id.len() <= 200));
            prop_assert!(key.len() <= 2048, "a key PostgreSQL can index");
            if let Some(email) = &contacts.email {
                prop_assert!(looks_like_email(email) && email.len() <= 254);
                prop_assert_eq!(email.trim(), email.as_str());
            }
            if let Some(phone) = &contacts.phone {
                prop_assert!(is_e164(phone));
            }
            if let Some(url) = &contacts.webhook_url {
                prop_assert!(url.starts_with("http://") || url.starts_with("https://"));
            }
            prop_assert!(contacts.push_tokens.len() <= 20);
            prop_assert!(contacts.push_tokens.iter().all(|t| !t.is_empty() && t.len() <= 2048));
        }
    }

    #[test]
    fn content_validation_never_panics_and_keeps_its_promises(c in content()) {
        if let Ok(content) = validate_content(c) {
            prop_assert!(!content.text.trim().is_empty() && content.text.len() <= MAX_BODY);
            if let Some(subject) = &content.subject {
                prop_assert!(!subject.contains(['\r', '\n']) && subject.len() <= MAX_SUBJECT);
            }
            if let Some(short) = &content.short {
                prop_assert!(!short.trim().is_empty() && short.chars().count() <= 1600);
            }
        }
    }

    #[test]
    fn e164_is_a_plus_and_8_to_15_digits(digits in "[0-9]{8,15}", junk in any::<String>()) {
        let number = format!("+{digits}");
        prop_assert!(is_e164(&number));
        prop_assert!(!is_e164(&digits), "the plus is required");
        if is_e164(&junk) {
            prop_assert!(junk.starts_with('+') && junk[1..].bytes().all(|b| b.is_ascii_digit()));
        }
    }

    #[test]
    fn email_check_never_panics(s in any::<String>()) {
        if looks_like_email(&s) {
            prop_assert!(s.contains('@') && !s.chars().any(char::is_whitespace));
        }
    }
}
