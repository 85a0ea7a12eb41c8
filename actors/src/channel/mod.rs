//! Channels: the provider trait, one file per provider, the circuit breaker, and the actors that
//! own them.

pub mod actor;
pub mod announce;
pub mod circuit;
pub mod email;
pub mod google_auth;
mod hold;
mod http;
pub mod provider;
pub mod push;
pub mod sms;
pub mod smtp_pool;
pub mod supervisor;
pub mod telegram;
mod text;
pub mod webhook;

pub use actor::{
    ChannelActor, ChannelArgs, ChannelMsg, ChannelSettings, ChannelSnapshot, NotStartedCause,
    Readmission, SendOutcome, SendReport, Verdict,
};
pub use provider::{
    ContactMove, Incident, OutboundMessage, Provider, ProviderError, Receipt, WebhookSecret,
};
pub use supervisor::{ChannelDirectory, ChannelSupervisor, ChannelSupervisorArgs};
