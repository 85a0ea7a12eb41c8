//! Liveness.

use poem_openapi::{Object, OpenApi, Tags, payload::Json};

#[derive(Tags)]
enum HealthTags {
    /// Process health.
    Health,
}

/// Liveness answer.
#[derive(Object)]
pub struct Liveness {
    /// Always `ok` while the process serves HTTP.
    pub status: String,
    /// Herald's version.
    pub version: String,
}

/// Health endpoints.
pub struct HealthApi;

#[OpenApi(tag = "HealthTags::Health")]
impl HealthApi {
    /// Liveness: the process is up and serving HTTP.
    #[oai(path = "/health", method = "get")]
    async fn live(&self) -> Json<Liveness> {
        Json(Liveness {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        })
    }
}
