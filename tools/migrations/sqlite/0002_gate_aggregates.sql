-- Per-wave aggregates for gate judging, kept up to date at every check-in, so a gate reads a
-- few rows per wave instead of every device's telemetry. Same text for SQLite and PostgreSQL.

-- The devices of a rollout: each one's first wave (the smallest i with bucket < waves[i]),
-- whether it reported on the rollout's version (an event, telemetry, or running it) and whether
-- it failed (install_failed, selftest_failed, rolled_back_self). Filled with the fleet when the
-- rollout is created; devices enrolled later join at their first check-in.
CREATE TABLE rollout_devices (
    rollout_id BIGINT NOT NULL,
    device_id TEXT NOT NULL,
    wave BIGINT NOT NULL,
    reported BIGINT NOT NULL,
    failed BIGINT NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX rollout_devices_wave ON rollout_devices (rollout_id, wave, reported, failed);

-- Telemetry of a rollout's devices summed per first wave: `series` is `inferences` or `errors`
-- (bin 0), `latency` (the LATENCY_BUCKETS_US bins), `input:I` / `output:I` (the BASELINE bins)
-- on the rollout's version, and `prev_latency` on the previous version (the gate's reference
-- latency). Added to while the rollout runs with `INSERT … ON CONFLICT DO UPDATE SET
-- n = n + excluded.n`, rows in (series, bin) order so concurrent check-ins lock them in one
-- order.
CREATE TABLE rollout_stats (
    rollout_id BIGINT NOT NULL,
    wave BIGINT NOT NULL,
    series TEXT NOT NULL,
    bin BIGINT NOT NULL,
    n BIGINT NOT NULL,
    PRIMARY KEY (rollout_id, wave, series, bin)
);
