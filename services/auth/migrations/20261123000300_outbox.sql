-- The transactional outbox (see libs/events): events are written here in the transaction that
-- makes the change, and the relay publishes them to Kafka in `position` order, then marks them.
CREATE TABLE outbox (
    position     bigserial   PRIMARY KEY,
    event_id     uuid        NOT NULL UNIQUE,
    topic        text        NOT NULL,
    message_key  text        NOT NULL,
    event_type   text        NOT NULL,
    source       text        NOT NULL,
    subject      text        NOT NULL,
    occurred_at  timestamptz NOT NULL,
    traceparent  text,
    -- json, not jsonb: published byte for byte as the service wrote it.
    payload      json        NOT NULL,
    published_at timestamptz
);
-- What the relay reads: the unpublished rows, oldest first.
CREATE INDEX outbox_unpublished_idx ON outbox (position) WHERE published_at IS NULL;
-- What the clean-up deletes.
CREATE INDEX outbox_published_at_idx ON outbox (published_at) WHERE published_at IS NOT NULL;
