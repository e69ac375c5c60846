//! The xlab scheduler: places the jobs of a validated plan on a pool of device slots, runs one
//! `xlab-worker` process per job, and records everything they report through a single store
//! writer; or submits them to Slurm (see [`slurm`]). Never links libtorch.

pub mod disk;
pub mod hub;
mod machine;
pub mod pool;
mod run;
pub mod search;
pub mod slurm;
pub mod spawn;
pub mod tpe;
mod writer;

pub use pool::{build_pool, detect_gpus, Devices, Gpu, Held, Need, Pool, PoolRequest, Slot, Slots};
pub use run::{check_placement, run, with_proposed_trials, Progress, RunOptions, RunReport, SchedError};
