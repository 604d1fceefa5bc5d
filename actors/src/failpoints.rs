//! Crash hooks for the crash tests. With the `failpoints` feature and
//! `FAILPOINTS="<name>=return"` (or `"<name>=2*off->return"`: the third time), the process
//! aborts at that point, as a power cut would. Without the feature they compile to nothing.

/// Files staged and acked; the commit transaction has not run.
pub const STAGED_NOT_COMMITTED: &str = "cfaudit::staged_not_committed";
/// The commit transaction is durable; its files are not yet published.
pub const COMMITTED_NOT_PUBLISHED: &str = "cfaudit::committed_not_published";

#[inline]
pub fn crash_point(name: &str) {
    #[cfg(feature = "failpoints")]
    if fail::eval(name, |_| ()).is_some() {
        eprintln!("failpoint {name}: aborting the process");
        std::process::abort();
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}
