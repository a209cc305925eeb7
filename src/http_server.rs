//! The HTTP/1.1 server both of the project's servers run, the operations port (`telemetry`) and
//! the sandbox: an axum router served by hyper with limits, so that idle, slow and surplus
//! clients cannot hold it (issue 23: with neither, 5 idle and 5 slow-header connections were
//! never closed, and 200 idle connections under a 128-descriptor limit made a valid request time
//! out).
//!
//! - **Header-read timeout, which is also the idle keep-alive timeout**: hyper's own
//!   `http1::Builder::header_read_timeout`. hyper starts that timer whenever it begins waiting
//!   for a request head, on accept and again after each answer on a kept-alive connection, and
//!   closes the connection if the whole head has not arrived when it fires. A connection that
//!   sends nothing and one that sends its head a line at a time are both closed after it.
//! - **Connection cap**: at most `max_connections` connections are served at once; one more is
//!   answered at once with a `503` (`Connection: close`, `Retry-After: 1`) and closed, never
//!   queued, so it costs a descriptor for microseconds, and the cap kept below the process's
//!   descriptor limit keeps `accept` working for the clients that come after.
//! - **Bodies**: only the sandbox's handlers read a body, each under its own deadline (see
//!   `sandbox::api`); a body a handler leaves unread is not drained: hyper closes the
//!   connection's read side after the answer, so a slow body costs nothing past the answer.
//!
//! This module imports nothing from the crate: a leaf that `telemetry` and `sandbox` use.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The limits of one server. Each server documents its own keys and defaults (the operations
/// port: `telemetry.header_read_timeout`, `telemetry.max_connections`; the sandbox:
/// `--header-read-timeout`, `--max-connections`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long a connection may take to deliver a whole request head, counted from when the
    /// server starts waiting for it (on accept, and after each answer on a kept-alive connection,
    /// so this is the idle keep-alive timeout too). Must be longer than zero.
    pub header_read_timeout: Duration,
    /// Most connections served at once; more are refused at once with a 503. At least 1.
    pub max_connections: usize,
}

/// The answer a connection over the cap gets, written without waiting, before it is closed.
const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 87\r\n\
\r\n\
{\"error\":\"too_many_connections\",\"message\":\"the server is at its connection cap; retry\"}";

/// Serves `router` on `listener` with `limits` until `shutdown` is cancelled; then stops
/// accepting, lets every connection finish the request it is on (idle ones close at once) and
/// returns when all have closed. Errors of single connections (a client that went away, a
/// timeout) end that connection only.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // Nagle's algorithm would hold small answers back behind delayed ACKs.
        let _ = stream.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refuse(stream);
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let conn = graceful.watch(http1.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // A connection's error (reset, header timeout, malformed request) is its own end.
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Answers a connection over the cap with [`OVER_CAPACITY`] if the socket takes it at once, and
/// closes it: a fast refusal, never a wait.
fn refuse(stream: TcpStream) {
    let _ = stream.try_write(OVER_CAPACITY);
}

/// An `accept` error: a connection that failed before it was accepted is nobody's concern; any
/// other (out of descriptors, for one) is logged and the loop pauses briefly, since retrying at
/// once would spin.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed; retrying in 100 ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_over_capacity_answer_declares_its_length() {
        let text = std::str::from_utf8(OVER_CAPACITY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        serde_json::from_str::<serde_json::Value>(body).unwrap();
    }
}
