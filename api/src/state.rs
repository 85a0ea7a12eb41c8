//! What every endpoint shares.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use herald_nats::{Category, Channel, Publisher};
use metrics_exporter_prometheus::PrometheusHandle;
use sea_orm::DatabaseConnection;

/// Shared state of the HTTP façade. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// Database pool.
    pub db: DatabaseConnection,
    /// Stores new notifications (group commit with the Router's).
    pub inserts: herald_entities::repo::insert_queue::InsertQueue,
    /// NATS publisher.
    pub publisher: Publisher,
    /// Channel chain used when a request names none, per category.
    pub default_chains: Arc<HashMap<Category, Vec<Channel>>>,
    /// The channels a provider is configured for (email always): a request naming none of them
    /// is refused.
    pub configured_channels: Arc<HashSet<Channel>>,
    /// The configured providers by name, with their channel: a delivery receipt's provider is
    /// checked here, not by asking the channel actors (one that does not answer would lose it).
    pub providers: Arc<HashMap<String, Channel>>,
    /// Whether webhook URLs may name internal addresses (the webhook provider's
    /// `allow_private_targets`; `false` without a webhook provider): when not, the API refuses
    /// them, as the provider would refuse to send to them.
    pub allow_private_webhook_targets: bool,
    /// The engine's live state.
    pub engine: Arc<dyn crate::engine_view::EngineView>,
    /// Renders `/metrics`, when a recorder is installed.
    pub metrics: Option<PrometheusHandle>,
    /// Verifies API keys.
    pub auth: Arc<crate::auth::KeyVerifier>,
    /// The engine's templates (list and preview).
    pub templates: Arc<dyn crate::templates::TemplateCatalog>,
    /// The operator dashboard's settings.
    pub dashboard: Arc<crate::dashboard::DashboardSettings>,
    /// Checks Twilio's status callbacks (`channels.sms.status_callback_url` and the auth token);
    /// `None` when they are off.
    pub twilio_status: Option<Arc<crate::twilio::StatusCallbacks>>,
    /// How long final notifications are kept (`scheduler.retention_days`); `None` keeps them.
    pub retention: Option<chrono::Duration>,
    /// How long the `EVENTS` stream keeps an event (`nats.retention.events.max_age_secs`); `None`
    /// keeps it whatever its age.
    pub events_max_age: Option<chrono::Duration>,
}
