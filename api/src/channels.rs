//! `/api/v1/channels`: providers and their circuit breakers.

use poem_openapi::{OpenApi, Tags, payload::Json};

use crate::{ApiError, AppState, auth::ReadKey, engine_view::ChannelView};

#[derive(Tags)]
enum ChannelTags {
    /// Providers, circuits and their counters.
    Channels,
}

/// Channel endpoints.
pub struct ChannelsApi {
    state: AppState,
}

impl ChannelsApi {
    /// The endpoints over the shared state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[OpenApi(prefix_path = "/api/v1", tag = "ChannelTags::Channels")]
impl ChannelsApi {
    /// Every configured provider of this instance: circuit state, in-flight sends, counters and
    /// the last error.
    #[oai(path = "/channels", method = "get")]
    async fn list(&self, _auth: ReadKey) -> Result<Json<Vec<ChannelView>>, ApiError> {
        Ok(Json(self.state.engine.channels().await))
    }
}
