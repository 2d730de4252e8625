CREATE TABLE IF NOT EXISTS holdfast_offline_locks (
    object_type VARCHAR(100) NOT NULL,
    object_id VARCHAR(255) NOT NULL,
    holder VARCHAR(255) NOT NULL,
    reason VARCHAR(255) NULL,
    hold_count BIGINT NOT NULL,
    acquired_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NULL,
    PRIMARY KEY (object_type, object_id)
);
CREATE INDEX IF NOT EXISTS holdfast_offline_locks_holder ON holdfast_offline_locks (holder);
CREATE INDEX IF NOT EXISTS holdfast_offline_locks_expires ON holdfast_offline_locks (expires_at_ms);
