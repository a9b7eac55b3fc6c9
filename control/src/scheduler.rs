//! Scheduler: placeholder.
pub const NAME: &str = "default-scheduler";
