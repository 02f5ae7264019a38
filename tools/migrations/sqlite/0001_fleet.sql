-- Fleet server schema (SQLite). Keep in step with ../postgres/0001_fleet.sql: same tables,
-- columns and types (BIGINT, DOUBLE PRECISION, TEXT); only the id columns differ.

CREATE TABLE models (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    version BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    security_counter BIGINT NOT NULL,
    target TEXT NOT NULL,
    signed_by TEXT NOT NULL,
    lineage TEXT NOT NULL,
    baseline TEXT NOT NULL,
    stage TEXT NOT NULL,
    pushed_by TEXT NOT NULL,
    pushed_at BIGINT NOT NULL,
    UNIQUE (name, version)
);
CREATE INDEX models_sha256 ON models (sha256);

CREATE TABLE audit (
    id INTEGER PRIMARY KEY,
    at BIGINT NOT NULL,
    who TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);

CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    board TEXT NOT NULL,
    cohort TEXT NOT NULL,
    agent TEXT NOT NULL,
    enrolled_at BIGINT NOT NULL,
    last_seen BIGINT,
    running_model TEXT,
    running_version BIGINT,
    last_event TEXT
);

CREATE TABLE device_events (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    version BIGINT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX device_events_version ON device_events (model, version, at);

CREATE TABLE telemetry (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    model TEXT NOT NULL,
    version BIGINT NOT NULL,
    at BIGINT NOT NULL,
    inferences BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    latency TEXT NOT NULL,
    input_hist TEXT NOT NULL,
    output_hist TEXT NOT NULL
);
CREATE INDEX telemetry_version ON telemetry (model, version, at);

CREATE TABLE blocked (
    device_id TEXT NOT NULL,
    model TEXT NOT NULL,
    version BIGINT NOT NULL,
    rollout_id BIGINT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (device_id, model, version)
);

CREATE TABLE rollouts (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    version BIGINT NOT NULL,
    previous BIGINT,
    cohort TEXT,
    waves TEXT NOT NULL,
    min_devices BIGINT NOT NULL,
    max_failure_pct DOUBLE PRECISION NOT NULL,
    max_latency_regression_pct DOUBLE PRECISION NOT NULL,
    max_psi DOUBLE PRECISION NOT NULL,
    wave_wait_s BIGINT NOT NULL,
    state TEXT NOT NULL,
    wave BIGINT NOT NULL,
    wave_started_at BIGINT NOT NULL,
    reason TEXT,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX rollouts_model ON rollouts (model, id);

CREATE TABLE rollout_gates (
    rollout_id BIGINT NOT NULL,
    wave BIGINT NOT NULL,
    passed BIGINT NOT NULL,
    figures TEXT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (rollout_id, wave)
);
