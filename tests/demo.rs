//! The README's first command: `datapulse-bridge demo` runs with no setup and accounts for
//! every record.

#[test]
fn demo_accounts_for_every_record() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_datapulse-bridge"))
        .args(["demo", "--records", "2000", "--seed", "11"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("unaccounted           0"), "{stdout}");
    assert!(stdout.contains(", 0 transaction ids more than once"), "{stdout}");
    for reason in [
        "mapping: not_json",
        "validation: financial_fields",
        "dedupe: double_count",
    ] {
        assert!(stdout.contains(reason), "dead letters for {reason} expected: {stdout}");
    }
}
