//! What one audit record costs, piece by piece, on one thread: building
//! its line (JSON body, SHA-256 link) and appending it to the spool, the
//! group fsync, and shipping it to the memory store, in passes as the
//! broker's shipper makes them (`AUDIT_CHUNK` records each). CPU time of this process per record (user + system),
//! so the file system's work on our behalf is counted.
//!
//! Then the sink: the same records shipped into a real PostgreSQL (a
//! throw-away database on `CREDBROKER_TEST_PG`, schema migrated), and what
//! that costs PostgreSQL: the CPU time of every `postgres` process on the
//! machine (backends, WAL writer, checkpointer) over the records shipped.
//!
//! `cargo bench --bench audit` (`AUDIT_RECORDS`, `AUDIT_CHUNK`,
//! `AUDIT_TENANTS`: how many tenants the records name, 16).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/common/backends.rs"]
mod backends;
#[path = "common/cpu.rs"]
mod cpu;

use std::{borrow::Cow, time::Instant};

use cpu::cpu_secs;

use credbroker::{
    audit::{AuditRecord, AuditSink as _, ship, spool::Spool},
    broker::types::{ExchangeId, TenantId},
    memstore::MemoryMetadataStore,
};

/// A GetCredentials record as the layer writes it, for `tenant`.
fn record(tenant: TenantId) -> AuditRecord {
    let id = uuid::Uuid::now_v7();
    AuditRecord {
        id,
        timestamp: time::OffsetDateTime::now_utc(),
        event_type: Cow::Borrowed("secret_access"),
        user: "spiffe://prod.example/tenant/7f1c2a9e-52a4-4c1b-9d0e-0b6f4a1d2c3e/pod/bench".into(),
        role: Cow::Borrowed("trader"),
        resource: Cow::Borrowed("binance_api_key"),
        action: Cow::Borrowed("GetCredentials"),
        result: Cow::Borrowed("success"),
        ip_address: Some("127.0.0.1".into()),
        user_agent: Some("grpc-rust/0.14 tonic/0.14".into()),
        tenant_id: Some(tenant),
        exchange: Some(ExchangeId::Binance),
        versions: vec![3],
        request_id: id,
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        grpc_code: Cow::Borrowed("OK"),
        duration_ms: 0.042,
        key_hint: None,
        count: None,
    }
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let env = |k: &str, d: usize| std::env::var(k).ok().map_or(d, |v| v.parse().unwrap());
    let n = env("AUDIT_RECORDS", if quick { 2_000 } else { 200_000 });
    // Records per shipping pass: at 40,000 calls/s the shipper (every
    // 200 ms) finds about 8,000.
    let chunk = env("AUDIT_CHUNK", 8_000).min(n);
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 1 << 40).unwrap();
    // A deployment's tenants (each record names one, round robin).
    let tenants: Vec<TenantId> = (0..env("AUDIT_TENANTS", 16))
        .map(|_| TenantId::new(uuid::Uuid::new_v4()))
        .collect();
    let records: Vec<AuditRecord> = (0..n).map(|i| record(tenants[i % tenants.len()])).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let meta = MemoryMetadataStore::default();

    // (wall, CPU) seconds of: appending, the group fsync, shipping.
    let mut spent = [(0f64, 0f64); 3];
    let mut timed = |i: usize, f: &mut dyn FnMut()| {
        let (wall, cpu) = (Instant::now(), cpu_secs());
        f();
        spent[i].0 += wall.elapsed().as_secs_f64();
        spent[i].1 += cpu_secs() - cpu;
    };
    let mut shipped = 0;
    for part in records.chunks(chunk) {
        timed(0, &mut || {
            for r in part {
                spool.append(r).unwrap();
            }
        });
        timed(1, &mut || spool.sync().unwrap());
        timed(2, &mut || {
            shipped += rt.block_on(ship::ship_once(&spool, &meta)).unwrap().records;
        });
    }
    assert_eq!(shipped, n);

    // The sink: the same records into PostgreSQL as the shipper sends
    // them (pages by binary COPY), then, side by side in the same database,
    // as it did before (a row per record, `INSERT ... SELECT unnest(...)`
    // in batches of 500, into a table shaped as the v8 schema's).
    let ((pg_wall, pg_cpu, ours), (ins_wall, ins_cpu, ins_ours)) = rt.block_on(async {
        let db = backends::TestDb::create().await;
        let store = db.migrated_store(4).await;
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 40).unwrap();
        for r in &records {
            spool.append(r).unwrap();
        }
        spool.sync().unwrap();
        let (wall, pg, ours) = (Instant::now(), cpu::postgres_cpu_secs(), cpu_secs());
        let mut shipped = 0;
        while shipped < n {
            shipped += ship::ship_once(&spool, &store).await.unwrap().records;
        }
        let pages = (
            wall.elapsed().as_secs_f64(),
            cpu::postgres_cpu_secs() - pg,
            cpu_secs() - ours,
        );
        let rows = store.audit_chains().await.unwrap().remove(0).rows;
        assert_eq!(rows.len(), n);
        let c = db.connect().await;
        c.batch_execute(
            "CREATE TABLE audit_log_v8 (id UUID NOT NULL, chain_id UUID NOT NULL, seq BIGINT NOT NULL, \
             prev_hash TEXT NOT NULL, hash TEXT NOT NULL, at TIMESTAMPTZ NOT NULL, tenant_id UUID, \
             body TEXT NOT NULL, PRIMARY KEY (chain_id, seq)); \
             CREATE INDEX ON audit_log_v8 (tenant_id, at DESC, id DESC); CHECKPOINT",
        )
        .await
        .unwrap();
        let (wall, pg, ours) = (Instant::now(), cpu::postgres_cpu_secs(), cpu_secs());
        for batch in rows.chunks(500) {
            let ids: Vec<uuid::Uuid> = batch.iter().map(|r| r.id).collect();
            let chains: Vec<uuid::Uuid> = batch.iter().map(|r| r.chain_id).collect();
            let seqs: Vec<i64> = batch.iter().map(|r| r.seq as i64).collect();
            let prevs: Vec<&str> = batch.iter().map(|r| r.prev_hash.as_str()).collect();
            let hashes: Vec<&str> = batch.iter().map(|r| r.hash.as_str()).collect();
            let ats: Vec<time::OffsetDateTime> = batch.iter().map(|r| r.at).collect();
            let tenants: Vec<Option<uuid::Uuid>> =
                batch.iter().map(|r| r.tenant.map(|t| t.as_uuid())).collect();
            let bodies: Vec<&str> = batch.iter().map(|r| r.body.as_str()).collect();
            c.execute(
                "INSERT INTO audit_log_v8 (id, chain_id, seq, prev_hash, hash, at, tenant_id, body) \
                 SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::text[], \
                 $6::timestamptz[], $7::uuid[], $8::text[]) ON CONFLICT (chain_id, seq) DO NOTHING",
                &[&ids, &chains, &seqs, &prevs, &hashes, &ats, &tenants, &bodies],
            )
            .await
            .unwrap();
        }
        let per_row = (
            wall.elapsed().as_secs_f64(),
            cpu::postgres_cpu_secs() - pg,
            cpu_secs() - ours,
        );
        drop(c);
        drop(store);
        drop(db);
        (pages, per_row)
    });

    let files = spool.dir().read_dir().unwrap().count();
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "audit record costs ({n} records, shipped every {chunk}, one thread, {profile} build, files left: {files})"
    );
    let per = |secs: f64| secs / n as f64 * 1e6;
    for (name, (w, c)) in [
        "append (line, hash, write)",
        "fsync (once per pass)",
        "ship (to the memory store)",
    ]
    .into_iter()
    .zip(spent)
    {
        println!(
            "{name:<28} {:>6.2} µs wall  {:>6.2} µs CPU per record",
            per(w),
            per(c)
        );
    }
    for (name, wall, ours, pg) in [
        ("pages, binary COPY", pg_wall, ours, pg_cpu),
        ("row per record (before)", ins_wall, ins_ours, ins_cpu),
    ] {
        println!(
            "ship to PostgreSQL, {name:<23} {:>6.2} µs wall  {:>6.2} µs CPU per record (the broker's side)  {:>6.2} µs CPU of PostgreSQL (all processes)",
            per(wall),
            per(ours),
            per(pg)
        );
    }
}
