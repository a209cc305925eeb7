//! Mapping + contract validation + JSON serialisation of one event, for the nested wallet
//! example (`examples/nested-wallet`). Target: 1,000,000 events per second per core.
//! Run: `cargo bench --bench mapping`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use datapulse_bridge::mapping::{MapOutcome, Mapper, SourceRecord};
use std::hint::black_box;
use std::path::Path;

fn bench(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nested-wallet");
    let loaded = datapulse_bridge::config::load(&dir.join("datapulse-bridge.toml"), true).expect("example config");
    let mapper = Mapper::compile(&loaded.config.mapping, &loaded.config.api.contract()).expect("example mapping");
    let records = std::fs::read_to_string(dir.join("records.jsonl")).unwrap();
    let value = records.lines().next().unwrap().as_bytes().to_vec();
    let rec = SourceRecord {
        topic: "wallet.transactions",
        partition: 0,
        offset: 0,
        timestamp_ms: Some(1_702_963_200_000),
        key: Some(b"p-77"),
        value: Some(&value),
        headers: &[],
    };
    assert!(matches!(mapper.map(&rec), MapOutcome::Event(_)));

    let mut g = c.benchmark_group("mapping");
    g.throughput(Throughput::Elements(1));
    let mut out = Vec::with_capacity(1024);
    g.bench_function("nested_wallet_map_validate_serialise", |b| {
        b.iter(|| {
            out.clear();
            match mapper.map(black_box(&rec)) {
                MapOutcome::Event(e) => e.write_json(&mut out),
                other => panic!("{other:?}"),
            }
            black_box(out.len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
