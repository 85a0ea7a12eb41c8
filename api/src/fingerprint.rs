//! Request fingerprints: what tells a repeated request from another request reusing its request
//! id (idempotency key).
//!
//! A fingerprint is the SHA-256 of the accepted request's meaning, serialised as JSON from a
//! struct of its checked fields (fixed field order; objects such as template variables with their
//! keys sorted, as `serde_json`'s map keeps them), not of the bytes received: key order,
//! whitespace, surrounding spaces of contacts or an offset instead of `Z` in a time do not make
//! a request different. The request id itself is not part of it. It is stored with the
//! notification or batch (`request_fingerprint`) and compared when the request id comes again.
//!
//! Cost: one serialisation of the request's fields into the hash and one SHA-256 over them, for
//! requests with a request id only. For the `envelope` bench's command (336 bytes of JSON), timed
//! apart in a release build on the 2-core development machine: 0.7–3 µs (noisy), of which
//! serialising is 0.3–1 µs, against 616–664 µs of CPU per API request (`docs/performance.md`).
//! Hashing while serialising measured the same as hashing a serialised buffer, and keeps a bulk
//! send's 10,000 recipients out of a second buffer.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::ApiError;

/// Names how fingerprints are made: a change to what they cover (or to how the types they borrow
/// serialise; the known-answer tests in `notifications` and `bulk` catch that) must change it,
/// so that fingerprints stored before are not compared with ones made differently. Rows with a
/// fingerprint of another version are then taken for repeats of any request under their id
/// until their retention ends, as rows stored before fingerprints are.
const VERSION: &str = "v1";

/// The fingerprint of `request` (the fields that make its meaning): `v1:` and the hex SHA-256 of
/// its JSON.
pub fn of(request: &impl Serialize) -> Result<String, ApiError> {
    let mut hasher = Sha256::new();
    serde_json::to_writer(&mut hasher, request).map_err(|e| ApiError::internal(&e))?;
    Ok(format!("{VERSION}:{}", hex::encode(hasher.finalize())))
}

/// Whether a request with fingerprint `new` repeats the one stored with `stored`. A row stored
/// without a fingerprint (before they were recorded), or with one made another way, cannot tell:
/// the request is taken for a repeat, as it was before fingerprints.
pub fn is_repeat(stored: Option<&str>, new: &str) -> bool {
    match stored {
        Some(stored) if same_version(stored, new) => stored == new,
        _ => true,
    }
}

fn same_version(a: &str, b: &str) -> bool {
    a.split_once(':').map(|(v, _)| v) == b.split_once(':').map(|(v, _)| v)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_fingerprint_is_versioned_hex_sha256() {
        let fingerprint = of(&json!({ "a": 1 })).unwrap();
        let (version, digest) = fingerprint.split_once(':').unwrap();
        assert_eq!(version, VERSION);
        assert_eq!(digest.len(), 64);
        assert!(digest.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn object_keys_in_any_order_give_one_fingerprint() {
        // Parsed from text as request bodies are: a map that kept the order received (serde_json's
        // `preserve_order`) would break this.
        let a: serde_json::Value =
            serde_json::from_str(r#"{"b": 2, "a": {"y": 1, "x": [1, 2]}}"#).unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{"a":{"x":[1,2],"y":1},"b":2}"#).unwrap();
        assert_eq!(of(&a).unwrap(), of(&b).unwrap());
        let c: serde_json::Value =
            serde_json::from_str(r#"{"a":{"x":[2,1],"y":1},"b":2}"#).unwrap();
        assert_ne!(of(&a).unwrap(), of(&c).unwrap(), "array order counts");
    }

    #[test]
    fn only_a_different_fingerprint_of_the_same_version_is_another_request() {
        let one = of(&json!({ "text": "one" })).unwrap();
        let two = of(&json!({ "text": "two" })).unwrap();
        assert!(is_repeat(Some(&one), &one));
        assert!(!is_repeat(Some(&one), &two));
        assert!(is_repeat(None, &two), "stored before fingerprints");
        assert!(is_repeat(Some("v0:abc"), &two), "made another way");
    }
}
