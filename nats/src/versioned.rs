//! Reading a versioned JSON message: parsed once in the shape of this build's version; a message
//! that does not fit is read again for its version alone, to tell a malformed message from
//! another version from a bad body.

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Why a versioned message could not be read.
#[derive(Debug)]
pub(crate) enum VersionedError {
    /// Not JSON, or JSON without a numeric `v`.
    Malformed(serde_json::Error),
    /// A version this build does not read.
    UnknownVersion(u64),
    /// This build's version, with a body that does not fit it.
    InvalidBody(serde_json::Error),
}

/// A message whose shape names its version.
pub(crate) trait Versioned: DeserializeOwned {
    /// The version this build reads.
    const VERSION: u16;
    /// The version the message says it is.
    fn version(&self) -> u16;
}

/// Parses `payload` as `T`, which must be of `T::VERSION`.
pub(crate) fn decode<T: Versioned>(payload: &[u8]) -> Result<T, VersionedError> {
    #[derive(Deserialize)]
    struct VersionOnly {
        v: u64,
    }
    let body_error = match serde_json::from_slice::<T>(payload) {
        Ok(message) if message.version() == T::VERSION => return Ok(message),
        Ok(message) => return Err(VersionedError::UnknownVersion(message.version().into())),
        Err(err) => err,
    };
    let version: VersionOnly =
        serde_json::from_slice(payload).map_err(VersionedError::Malformed)?;
    Err(if version.v == u64::from(T::VERSION) {
        VersionedError::InvalidBody(body_error)
    } else {
        VersionedError::UnknownVersion(version.v)
    })
}
