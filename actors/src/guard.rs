//! How an actor calls what it is given (a port, a sink, its own mapping), in one place.
//!
//! A panic in the call must not kill the arbiter: actix does not restart an actor on a panic,
//! so the panic becomes `None` here, and the actor that sees it stops and is restarted by its
//! supervisor (which tells the Checkpointer, which rewinds). A call that hangs (a lock on a
//! table, a stalled request) fails at its deadline instead of holding its batch, and the
//! batch's memory, for ever.

use std::fmt::Display;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;

use crate::ports::SinkError;

/// Runs `call`; `None` if it panicked.
pub(crate) async fn catch_panic<T>(call: impl Future<Output = T>) -> Option<T> {
    AssertUnwindSafe(call).catch_unwind().await.ok()
}

/// Runs synchronous `work`; `None` if it panicked.
pub(crate) fn catch_panic_now<T>(work: impl FnOnce() -> T) -> Option<T> {
    std::panic::catch_unwind(AssertUnwindSafe(work)).ok()
}

/// Runs `call` with a deadline: a call still running after `limit` fails as a transient error
/// that names `what`.
pub(crate) async fn deadline<T>(
    limit: Duration,
    what: impl Display,
    call: impl Future<Output = Result<T, SinkError>>,
) -> Result<T, SinkError> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(SinkError::transient(format!(
            "{what} did not answer within {limit:?}"
        )))
    })
}

/// Both: `call` with a deadline, `None` if it panicked.
pub(crate) async fn guarded<T>(
    limit: Duration,
    what: impl Display,
    call: impl Future<Output = Result<T, SinkError>>,
) -> Option<Result<T, SinkError>> {
    catch_panic(deadline(limit, what, call)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_rt::test]
    async fn a_panic_is_none_and_a_hung_call_fails_at_its_deadline() {
        let limit = Duration::from_millis(20);
        let ok = guarded(limit, "ok", async { Ok::<_, SinkError>(1) }).await;
        assert!(matches!(ok, Some(Ok(1))));
        let panicked = guarded(limit, "p", async {
            panic!("boom");
            #[allow(unreachable_code)]
            Ok::<u8, SinkError>(0)
        })
        .await;
        assert!(panicked.is_none());
        let hung = guarded(
            limit,
            "the sink",
            std::future::pending::<Result<u8, SinkError>>(),
        )
        .await;
        match hung {
            Some(Err(SinkError::Transient(message))) => {
                assert!(
                    message.starts_with("the sink did not answer within"),
                    "{message}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(catch_panic_now(|| 2), Some(2));
        assert_eq!(catch_panic_now(|| -> u8 { panic!("boom") }), None);
    }
}
