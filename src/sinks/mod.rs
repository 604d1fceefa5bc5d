//! Where events land. One module per store; each is given to the pipeline as a `SinkTarget`
//! (PostgreSQL also keeps the commit state, the `CheckpointStore`).

pub mod dataset;
pub mod lake;
pub mod postgres;
