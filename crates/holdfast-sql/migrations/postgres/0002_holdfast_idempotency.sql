CREATE TABLE IF NOT EXISTS holdfast_idempotency (
    idem_key VARCHAR(255) NOT NULL PRIMARY KEY,
    fingerprint VARCHAR(255) NOT NULL,
    state VARCHAR(20) NOT NULL,
    owner_token VARCHAR(64) NULL,
    result_body TEXT NULL,
    created_at_ms BIGINT NOT NULL,
    lease_until_ms BIGINT NULL,
    expires_at_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS holdfast_idempotency_expires ON holdfast_idempotency (expires_at_ms);
