//! Herald's end-to-end suite, one test binary (`--test e2e`), a module per area.
//!
//! One binary rather than one per file: each of those linked the whole engine (compiling the
//! suite took three times as long and its binaries took ten times the disk), and cargo ran them one
//! after another, so a module's slowest test left a core idle; here all tests share one pool of
//! test threads. Run one module with a name filter: `cargo test -p herald-tests --test e2e
//! dashboard::`.

mod api;
mod api_writes;
mod bench;
mod channels;
mod claims;
mod cluster;
mod contacts;
mod control_characters;
mod dashboard;
mod delivery;
mod events;
mod harness;
mod health;
mod insert_queue;
mod migrations;
mod nats_auth;
mod outages;
mod poison;
mod pull;
mod query_plans;
mod races;
mod reliability;
mod schemathesis;
mod send_cli;
mod serve;
mod smtp;
mod startup;
mod status_writer;
mod templates;
mod unknown_fields;
mod wishes;
