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
//! - **Answers a client does not take**: a connection whose client takes none of an answer's
//!   bytes for `header_read_timeout` (it stopped reading, or pipelines requests without reading
//!   the answers) is closed: the socket's writes go through `tokio_io_timeout`'s write timeout,
//!   which runs while a write waits and restarts with every byte taken. hyper has no such timer,
//!   and without it such clients held their connection and their place under the cap for ever
//!   (found by a new user's trial: 64 of them made the ops port answer `/health/live` with 503).
//! - **Bodies**: only the sandbox's handlers read a body, each under its own deadline (see
//!   `sandbox::api`); a body a handler leaves unread is not drained: hyper closes the
//!   connection's read side after the answer, so a slow body costs nothing past the answer.
//! - **Descriptors**: the cap is lowered, with a warning naming the setting, to the process's
//!   descriptor limit (`RLIMIT_NOFILE`, `ulimit -n`) less [`RESERVED_DESCRIPTORS`], so that
//!   `accept` keeps working and a client over the cap gets the fast refusal, not a hang.
//! - **Shutdown**: connections still open [`SHUTDOWN_GRACE`] after shutdown began are dropped.
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
    /// The setting `max_connections` came from (`--max-connections`,
    /// `telemetry.max_connections`), named when the descriptor limit lowers it.
    pub max_connections_setting: &'static str,
}

/// Descriptors kept out of the connection cap for the process's own use (its log, the broker,
/// Redis and API connections of the bridge, the listener, the runtime).
pub const RESERVED_DESCRIPTORS: u64 = 32;

/// How long a server waits, once shutdown began, for its connections to finish the request they
/// are on; then the rest are dropped (a client that stops reading cannot hold a stop).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// `max_connections` lowered to the descriptor limit `nofile` (the soft `RLIMIT_NOFILE`) less
/// [`RESERVED_DESCRIPTORS`], at least 1; `None` when it fits.
fn capped_by_descriptors(max_connections: usize, nofile: u64) -> Option<usize> {
    let room = nofile.saturating_sub(RESERVED_DESCRIPTORS).max(1);
    (max_connections as u64 > room).then_some(room as usize)
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
    let mut max_connections = limits.max_connections;
    if let Ok((nofile, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        if let Some(room) = capped_by_descriptors(max_connections, nofile) {
            tracing::warn!(
                setting = limits.max_connections_setting,
                configured = max_connections,
                lowered_to = room,
                descriptor_limit = nofile,
                reserved = RESERVED_DESCRIPTORS,
                "the connection cap is above what the process's descriptor limit (ulimit -n) allows: lowered, \
                 so that a client over the cap is refused at once instead of waiting for a descriptor"
            );
            max_connections = room;
        }
    }
    let slots = Arc::new(Semaphore::new(max_connections));
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
        let mut io = tokio_io_timeout::TimeoutStream::new(stream);
        io.set_write_timeout(Some(limits.header_read_timeout));
        let conn = graceful.watch(http1.serve_connection(TokioIo::new(Box::pin(io)), service));
        tokio::spawn(async move {
            // A connection's error (reset, header timeout, malformed request) is its own end.
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the shutdown grace were dropped");
    }
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
    fn the_cap_leaves_room_for_the_process_own_descriptors() {
        assert_eq!(capped_by_descriptors(256, 1024), None);
        assert_eq!(capped_by_descriptors(256, 128), Some(96));
        assert_eq!(capped_by_descriptors(96, 128), None);
        assert_eq!(capped_by_descriptors(64, 16), Some(1));
        assert_eq!(
            capped_by_descriptors(usize::MAX, u64::MAX),
            Some((u64::MAX - 32) as usize)
        );
    }

    #[test]
    fn the_over_capacity_answer_declares_its_length() {
        let text = std::str::from_utf8(OVER_CAPACITY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        serde_json::from_str::<serde_json::Value>(body).unwrap();
    }
}
