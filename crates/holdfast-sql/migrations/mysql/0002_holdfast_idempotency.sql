CREATE TABLE IF NOT EXISTS holdfast_idempotency (
    idem_key VARCHAR(255) NOT NULL PRIMARY KEY,
    fingerprint VARCHAR(255) NOT NULL,
    state VARCHAR(20) NOT NULL,
    owner_token VARCHAR(64) NULL,
    result_body TEXT NULL,
    created_at_ms BIGINT NOT NULL,
    lease_until_ms BIGINT NULL,
    expires_at_ms BIGINT NOT NULL,
    KEY holdfast_idempotency_expires (expires_at_ms)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
