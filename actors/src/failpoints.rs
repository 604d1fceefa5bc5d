//! Crash hooks for the crash tests. With the `failpoints` feature and
//! `FAILPOINTS="<name>=return"` (or `"<name>=2*off->return"`: the third time), the process
//! aborts at that point, as a power cut would. Without the feature they compile to nothing.

/// Files staged and acked; the commit transaction has not run.
pub const STAGED_NOT_COMMITTED: &str = "cfaudit::staged_not_committed";
/// The commit transaction is durable; its files are not yet published.
pub const COMMITTED_NOT_PUBLISHED: &str = "cfaudit::committed_not_published";
/// A commit's files are published; PostgreSQL does not know yet.
pub const PUBLISHED_NOT_MARKED: &str = "cfaudit::published_not_marked";
/// Part-way through publishing a commit's files: some are published, the rest are not.
pub const BETWEEN_PUBLISHED_FILES: &str = "cfaudit::between_published_files";
/// A file is copied to its final name; its staged copy is not deleted yet (publishing is a
/// copy, then a delete, on S3 as on the local filesystem).
pub const COPIED_NOT_DELETED: &str = "cfaudit::copied_not_deleted";
/// Start-up recovery published the files a crash left; PostgreSQL does not know yet.
pub const RECOVERED_NOT_MARKED: &str = "cfaudit::recovered_not_marked";
/// Start-up recovery is part-way through deleting the staged files of uncommitted batches.
pub const BETWEEN_DISCARDED_FILES: &str = "cfaudit::between_discarded_files";

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
