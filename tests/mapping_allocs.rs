//! Allocations per mapped record, the largest cost of the hot path (see docs/mapping.md,
//! "Speed"): a guard against adding ones the event does not need.

use datapulse_bridge::mapping::{MapOutcome, Mapper, SourceRecord};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn nested_example_record_allocations() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nested-wallet");
    let loaded = datapulse_bridge::config::load(&dir.join("datapulse-bridge.toml"), true).unwrap();
    let mapper = Mapper::compile(&loaded.config.mapping, &loaded.config.api.contract()).unwrap();
    let records = std::fs::read(dir.join("records.jsonl")).unwrap();
    let value = records.split(|b| *b == b'\n').next().unwrap().to_vec();
    let rec = SourceRecord {
        topic: "wallet.transactions",
        partition: 0,
        offset: 0,
        timestamp_ms: None,
        key: None,
        value: Some(&value),
        headers: &[],
    };
    // Warm the per-thread reading slots.
    assert!(matches!(mapper.map(&rec), MapOutcome::Event(_)));
    let before = ALLOCS.load(Ordering::Relaxed);
    let out = mapper.map(&rec);
    let n = ALLOCS.load(Ordering::Relaxed) - before;
    assert!(matches!(out, MapOutcome::Event(_)));
    eprintln!("allocations for one nested-wallet record: {n}");
    // 10 strings read (8 kept), the meta object (map, 2 keys, 2 values), the table value, 2
    // prefixed names, the property list, the boxed event.
    assert!(n <= 5, "{n} allocations");
}
