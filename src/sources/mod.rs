//! Where events come from. One module per source; each implements the pipeline's
//! `AuditSource` port.

pub mod cloudflare;
