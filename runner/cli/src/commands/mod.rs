//! One module per command, each with its arguments and what it does; `main.rs` only parses the
//! command line and dispatches here.

pub mod detach;
pub mod doctor;
pub mod export;
pub mod gc;
pub mod plan;
pub mod plot;
pub mod plugins;
pub mod query;
pub mod report;
pub mod reproduce;
pub mod run;
pub mod search;
pub mod show;
pub mod status;
