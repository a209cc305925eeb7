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
    // The first record: a complete deposit (the file also holds bad records, one not UTF-8).
    let records = std::fs::read(dir.join("records.jsonl")).unwrap();
    let value = records.split(|b| *b == b'\n').next().unwrap().to_vec();
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
    // The parts, to see where the time goes: the event's validation and serialisation alone, and
    // a syntax-only parse of the record (a lower bound for any reading of it).
    let MapOutcome::Event(event) = mapper.map(&rec) else {
        unreachable!()
    };
    let contract = *mapper.contract();
    g.bench_function("part_validate", |b| {
        b.iter(|| black_box(event.validate(black_box(&contract))).len())
    });
    g.bench_function("part_serialise", |b| {
        b.iter(|| {
            out.clear();
            event.write_json(&mut out);
            black_box(out.len())
        })
    });
    g.bench_function("part_parse_syntax_only", |b| {
        b.iter(|| serde_json::from_slice::<serde::de::IgnoredAny>(black_box(&value)).unwrap())
    });
    g.finish();
    wide(c);
}

/// A record of n custom properties (`{"u":"p-01","props":{"k00000":"v0",…}}`, about 16 bytes a
/// property) mapped with `properties = { from = "/props" }`, for n = 1k, 10k, 100k: the cost per
/// property must stay flat (issue 16: no input makes mapping slow; within 2× from 1k to 100k).
fn wide(c: &mut Criterion) {
    #[derive(serde::Deserialize)]
    struct Doc {
        mapping: Vec<datapulse_bridge::mapping::MappingConfig>,
    }
    let doc: Doc = toml::from_str(
        r#"[[mapping]]
topics = ["t"]
client_user_id = "/u"
event_name = { const = "custom" }
timestamp = { const = 1702963200 }
properties = { from = "/props" }
"#,
    )
    .expect("wide mapping");
    let mapper = Mapper::compile(&doc.mapping, &Default::default()).expect("wide mapping compiles");
    let mut g = c.benchmark_group("wide_record");
    g.sample_size(10);
    for n in [1_000usize, 10_000, 100_000] {
        let mut value = String::from(r#"{"u":"p-01","props":{"#);
        for i in 0..n {
            if i > 0 {
                value.push(',');
            }
            value.push_str(&format!(r#""k{i:05}":"v{i}""#));
        }
        value.push_str("}}");
        let rec = SourceRecord {
            topic: "t",
            partition: 0,
            offset: 0,
            timestamp_ms: None,
            key: None,
            value: Some(value.as_bytes()),
            headers: &[],
        };
        assert!(matches!(mapper.map(&rec), MapOutcome::Event(ref e) if e.properties.len() == n));
        g.throughput(Throughput::Elements(n as u64));
        let mut out = Vec::with_capacity(value.len() * 2);
        g.bench_function(format!("map_validate_serialise_{n}_properties"), |b| {
            b.iter(|| {
                out.clear();
                match mapper.map(black_box(&rec)) {
                    MapOutcome::Event(e) => e.write_json(&mut out),
                    other => panic!("{other:?}"),
                }
                black_box(out.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
