-- Account deletion: tasks learns of it from `user.deleted` on auth.user.v1 (see
-- domain/erasure.rs) and erases the account's tasks, history and idempotency keys in batches.

-- Event ids the consumer has applied (libs/events consumer): a redelivery changes nothing.
CREATE TABLE processed_events (
    event_id     uuid        PRIMARY KEY,
    topic        text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now()
);
-- What housekeeping forgets them by: rows arrive in time order, so BRIN is tiny and cheap.
CREATE INDEX processed_events_processed_at_idx ON processed_events USING brin (processed_at);

-- Accounts whose data is still being erased; a row goes once nothing of the account is left.
CREATE TABLE erasures (
    user_id      uuid        PRIMARY KEY,
    requested_at timestamptz NOT NULL
);

-- Users whose access tokens are refused although they have not expired (see
-- service_kit::revoked_users): only a SHA-256 of the id, until the last token has expired.
CREATE TABLE revoked_users (
    user_hash    bytea       PRIMARY KEY,
    revoked_at   timestamptz NOT NULL,
    forget_after timestamptz NOT NULL
);

-- Erasing an account's history batch by batch, in index order (the history outlives deleted
-- tasks, so it cannot be found through them).
CREATE INDEX task_revisions_owner_idx ON task_revisions (owner_id, task_id);
