//! The `herald` binary's library: configuration, wiring and shutdown, so that tests and benchmarks
//! start the very same application the binary runs.

pub mod apikey;
pub mod app;
pub mod bench;
pub mod config;
pub mod engine_view;
pub mod migration_lock;
pub mod prometheus;
pub mod send_cli;
pub mod telemetry;
pub mod template_catalog;

pub use app::Herald;
pub use config::Config;
