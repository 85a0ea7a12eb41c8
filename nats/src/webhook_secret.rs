//! The format of a Standard Webhooks signing secret, `whsec_` followed by a base64 key: the one
//! rule the configuration (`channels.webhook.secret`), the customers API (a customer's own
//! `webhook_secret`) and the webhook provider that signs with either all apply, so that the API
//! never accepts a secret the provider would then refuse.

use base64::{Engine as _, engine::general_purpose::STANDARD};

/// What every secret starts with.
pub const PREFIX: &str = "whsec_";

/// The shortest key accepted, in bytes (192 bits).
pub const MIN_KEY_BYTES: usize = 24;

/// Why a secret is not a Standard Webhooks signing secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// It does not start with `whsec_`.
    #[error("must start with \"whsec_\" followed by a base64 key")]
    Prefix,
    /// The part after `whsec_` is not base64.
    #[error("is not valid base64 after \"whsec_\": {0}")]
    Encoding(String),
    /// The key is too short to be safe.
    #[error("key is {0} bytes; at least 24 are required")]
    TooShort(usize),
}

/// The HMAC key of `secret` (surrounding whitespace ignored).
pub fn decode(secret: &str) -> Result<Vec<u8>, SecretError> {
    let encoded = secret
        .trim()
        .strip_prefix(PREFIX)
        .ok_or(SecretError::Prefix)?;
    let key = STANDARD
        .decode(encoded)
        .map_err(|e| SecretError::Encoding(e.to_string()))?;
    if key.len() < MIN_KEY_BYTES {
        return Err(SecretError::TooShort(key.len()));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_whsec_and_a_base64_key_of_24_bytes_or_more() {
        let key = decode(" whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw ").expect("valid");
        assert_eq!(key.len(), 24);
        assert_eq!(
            decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Err(SecretError::Prefix)
        );
        assert!(matches!(
            decode("whsec_not base64!"),
            Err(SecretError::Encoding(_))
        ));
        assert_eq!(decode("whsec_c2hvcnQ="), Err(SecretError::TooShort(5)));
    }
}
