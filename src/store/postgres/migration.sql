CREATE TABLE IF NOT EXISTS {table} (
    key           text        PRIMARY KEY,
    state         text        NOT NULL CHECK (state IN ('in_flight', 'completed')),
    lease_token   text,        -- the lease holder's token, while in flight
    fingerprint   bytea       NOT NULL,
    record        bytea,       -- the encoded Record, once completed
    created_at_ms bigint      NOT NULL,
    expires_at    timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS {index} ON {table} (expires_at);
