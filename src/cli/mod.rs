//! The subcommands besides `run` (which is `app`), one module each.

pub mod backfill;
pub mod check;
pub mod replay;
pub mod status;
