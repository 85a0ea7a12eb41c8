//! Notification ids derived from what makes a notification, ordered by time like the API's.
//!
//! The API gives each notification a UUIDv7: its first 48 bits are the millisecond it was
//! accepted, so ordering by id is ordering by acceptance (the history, the dashboard's feed and
//! their cursors rely on it). Notifications an event or a bulk send makes need an id that is the
//! same every time they are made again (a redelivered event, a fan-out redone after a restart),
//! so a hash of what makes them. A plain name-based UUID (v5) begins with hash bits, and most of
//! them sort above every UUIDv7 of this century: they would stay at the top of every newest-first
//! list. [`derived_id`] keeps the hash but puts a time in front, as a UUIDv8.

use chrono::{DateTime, Utc};
use uuid::{Builder, Uuid};

/// The id made of `name` within `namespace`, sorting at `at` among UUIDv7s: the time's
/// milliseconds in the first 48 bits (0 before 1970, the largest 48-bit value after 10889),
/// then 74 bits of the name's SHA-1 (as in UUIDv5), version 8.
pub fn derived_id(at: DateTime<Utc>, namespace: &Uuid, name: &[u8]) -> Uuid {
    let millis = u64::try_from(at.timestamp_millis())
        .unwrap_or(0)
        .min((1 << 48) - 1);
    let mut bytes = *Uuid::new_v5(namespace, name).as_bytes();
    bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
    Builder::from_custom_bytes(bytes).into_uuid()
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn at(millis: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(millis).single().expect("a time")
    }

    #[test]
    fn the_same_name_and_time_give_the_same_id() {
        let ns = Uuid::now_v7();
        let now = Utc::now();
        assert_eq!(derived_id(now, &ns, b"a"), derived_id(now, &ns, b"a"));
        assert_ne!(derived_id(now, &ns, b"a"), derived_id(now, &ns, b"b"));
        assert_ne!(
            derived_id(now, &ns, b"a"),
            derived_id(now, &Uuid::now_v7(), b"a")
        );
        assert_eq!(derived_id(now, &ns, b"a").get_version_num(), 8);
    }

    #[test]
    fn ids_sort_among_uuid_v7s_by_their_time() {
        let ns = Uuid::now_v7();
        let v7 = |millis: u64| {
            let ts = uuid::Timestamp::from_unix(
                uuid::NoContext,
                millis / 1_000,
                (millis % 1_000) as u32 * 1_000_000,
            );
            Uuid::new_v7(ts)
        };
        let now = Utc::now().timestamp_millis();
        let (before, after) = (v7(now as u64), v7(now as u64 + 2));
        let derived = derived_id(at(now + 1), &ns, b"x");
        assert!(
            before < derived && derived < after,
            "{before} {derived} {after}"
        );
        // Whatever the hash, a later millisecond sorts later.
        let names: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i]).collect();
        for name in &names {
            assert!(derived_id(at(1_000), &ns, name) < derived_id(at(1_001), &ns, b"zz"));
        }
    }

    #[test]
    fn times_outside_48_bits_are_clamped() {
        let ns = Uuid::nil();
        let first = derived_id(at(-5), &ns, b"a").as_bytes()[..6].to_vec();
        assert_eq!(first, [0; 6]);
        let last = derived_id(DateTime::<Utc>::MAX_UTC, &ns, b"a").as_bytes()[..6].to_vec();
        assert_eq!(last, [0xff; 6]);
    }
}
