-- notifications: each user's durable, ordered change feed (src/domain/feed.rs), and what the
-- consumer and the token checks need.

-- Event ids the consumer has applied (libs/events consumer): a redelivery changes nothing.
CREATE TABLE processed_events (
    event_id     uuid        PRIMARY KEY,
    topic        text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX processed_events_processed_at_idx ON processed_events USING brin (processed_at);

-- Users whose access tokens are refused although they have not expired (service_kit::revoked_users).
CREATE TABLE revoked_users (
    user_hash    bytea       PRIMARY KEY,
    revoked_at   timestamptz NOT NULL,
    forget_after timestamptz NOT NULL
);

-- Sessions auth ended (logout, reused refresh token): their access tokens may not open a socket
-- although they have not expired. Forgotten once the session's last token has.
CREATE TABLE revoked_sessions (
    session_id   uuid        PRIMARY KEY,
    forget_after timestamptz NOT NULL
);

-- Each user's latest sequence number. Never reset while the account lives, so a sequence is
-- never reused: a client's `since` always means the same entry.
CREATE TABLE live_heads (
    user_id  uuid   PRIMARY KEY,
    last_seq bigint NOT NULL CHECK (last_seq > 0)
);

-- The feed: one row per change, numbered 1, 2, 3... per user without gaps. Trimmed from the
-- oldest end only (at most LIVE_FEED_MAX_ENTRIES per user, none older than the retention), so
-- what is kept of a user's feed is always one unbroken run ending at the head.
CREATE TABLE live_feed (
    user_id     uuid        NOT NULL,
    seq         bigint      NOT NULL,
    kind        text        NOT NULL,
    entity_id   uuid        NOT NULL,
    version     bigint      NOT NULL,
    -- When the change happened (the event's time): the frame's `at`.
    changed_at  timestamptz NOT NULL,
    written_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, seq)
);
CREATE INDEX live_feed_written_at_idx ON live_feed USING brin (written_at);
