//! Opaque pagination cursors: the base64url form of the last id of a page. Ids are time-ordered, so
//! "after this id" in descending id order is "older than this notification".

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use uuid::Uuid;

/// The cursor that continues after `id`.
pub fn encode(id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(id.as_bytes())
}

/// The id a cursor continues after; `None` when it is not a cursor this API issued.
pub fn decode(cursor: &str) -> Option<Uuid> {
    let bytes = URL_SAFE_NO_PAD.decode(cursor.as_bytes()).ok()?;
    Uuid::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_are_url_safe() {
        for _ in 0..100 {
            let id = Uuid::now_v7();
            let cursor = encode(id);
            assert_eq!(cursor.len(), 22);
            assert!(
                cursor
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{cursor}"
            );
            assert_eq!(decode(&cursor), Some(id));
        }
    }

    #[test]
    fn foreign_strings_are_not_cursors() {
        assert_eq!(decode(""), None);
        assert_eq!(decode("not a cursor!"), None);
        assert_eq!(decode(&URL_SAFE_NO_PAD.encode([1u8; 15])), None);
        assert_eq!(decode(&URL_SAFE_NO_PAD.encode([1u8; 17])), None);
        assert_eq!(decode(&Uuid::nil().to_string()), None);
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn any_id_round_trips(bits in any::<u128>()) {
            let id = Uuid::from_u128(bits);
            prop_assert_eq!(decode(&encode(id)), Some(id));
        }

        #[test]
        fn decoding_any_string_never_panics(s in any::<String>()) {
            if let Some(id) = decode(&s) {
                prop_assert_eq!(encode(id), s);
            }
        }
    }
}
