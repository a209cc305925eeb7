//! A record's headers, read from librdkafka without rdkafka's name check.
//!
//! rdkafka 0.39's `Headers::try_get` turns each header name into a `&str` with
//! `CStr::to_str().unwrap()` (`rdkafka/src/message.rs`, `BorrowedHeaders::try_get`): a producer
//! that writes a name that is not UTF-8 (the Kafka protocol's header key is a length-prefixed
//! string, and clients other than Java's write any bytes) would panic the consumer thread, on
//! every restart, for ever. The bridge never panics on input, so it reads the headers through
//! librdkafka's C API directly (`rd_kafka_header_cnt`, `rd_kafka_header_get_all`), the one
//! `unsafe` of the crate. A well-kept crate cannot do it today: rdkafka is that crate.

use rdkafka::bindings::{rd_kafka_header_cnt, rd_kafka_header_get_all, rd_kafka_headers_t};
use rdkafka::message::{BorrowedHeaders, BorrowedMessage};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::Message;
use std::ffi::CStr;

/// One header: its name (a name that is not UTF-8 with each bad byte as U+FFFD: the record's
/// other parts stay exact, and a dead letter carries the name as read) and its value as the
/// broker gave it, `None` for a header without a value.
pub type Header = (String, Option<Vec<u8>>);

/// The record's headers in order.
pub fn of(m: &BorrowedMessage<'_>) -> Vec<Header> {
    match m.headers() {
        // `BorrowedHeaders` is librdkafka's `rd_kafka_headers_t` itself: rdkafka makes it by a
        // pointer cast (`BorrowedHeaders::from_native_ptr`) and reads it back the same way.
        Some(h) => read(h as *const BorrowedHeaders as *const rd_kafka_headers_t),
        None => Vec::new(),
    }
}

/// Reads every header of a librdkafka header list.
fn read(native: *const rd_kafka_headers_t) -> Vec<Header> {
    // SAFETY: `native` is a live header list (borrowed from a message, or made by a test) for the
    // length of this call; librdkafka's getters only read it.
    let count = unsafe { rd_kafka_header_cnt(native) };
    (0..count)
        .filter_map(|idx| {
            let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null(), 0usize);
            // SAFETY: as above; `idx` < count; the out-pointers are valid for writes.
            let err = unsafe { rd_kafka_header_get_all(native, idx, &mut name, &mut value, &mut size) };
            if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                return None;
            }
            // SAFETY: librdkafka gives a NUL-terminated name and, when not null, `size` bytes of
            // value, both owned by the header list, which outlives these copies.
            let name = unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned();
            let value =
                (!value.is_null()).then(|| unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }.to_vec());
            Some((name, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::bindings::{rd_kafka_header_add, rd_kafka_headers_destroy, rd_kafka_headers_new};

    /// Found by a new user's trial of issue 17: a header name that is not UTF-8 panicked the
    /// consumer inside rdkafka. Read here from a real librdkafka header list: the name with
    /// U+FFFD, values exact, no value as no value, order kept.
    #[test]
    fn a_header_name_that_is_not_utf8_is_read_not_a_panic() {
        let added: [(&[u8], Option<&[u8]>); 4] = [
            (b"x-client-ip", Some(b"203.0.113.7")),
            (b"bad-\xff\xfe-name", Some(b"v\x00\xff")),
            (b"no-value", None),
            (b"empty", Some(b"")),
        ];
        // SAFETY: a list made, filled and destroyed here; names and values outlive each call.
        let got = unsafe {
            let list = rd_kafka_headers_new(4);
            for (name, value) in added {
                let (v, len) = match value {
                    Some(v) => (v.as_ptr().cast(), v.len() as isize),
                    None => (std::ptr::null(), 0),
                };
                let err = rd_kafka_header_add(list, name.as_ptr().cast(), name.len() as isize, v, len);
                assert_eq!(err, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR);
            }
            let got = read(list);
            rd_kafka_headers_destroy(list);
            got
        };
        assert_eq!(
            got,
            vec![
                ("x-client-ip".to_string(), Some(b"203.0.113.7".to_vec())),
                ("bad-\u{fffd}\u{fffd}-name".to_string(), Some(b"v\x00\xff".to_vec())),
                ("no-value".to_string(), None),
                ("empty".to_string(), Some(Vec::new())),
            ]
        );
    }
}
