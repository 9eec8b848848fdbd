-- The recorder example's tables (the consumer library's integration tests).
CREATE TABLE processed_events (
    event_id     uuid        PRIMARY KEY,
    topic        text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now()
);

-- Which instance applied each event, and how often (exactly once is the point).
CREATE TABLE recorded_events (
    event_id     uuid    PRIMARY KEY,
    topic        text    NOT NULL,
    partition    integer NOT NULL,
    consumer     text    NOT NULL,
    applications integer NOT NULL
);
