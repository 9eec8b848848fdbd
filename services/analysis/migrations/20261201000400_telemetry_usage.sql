-- Client telemetry folded from analysis.telemetry.v1 (src/domain/telemetry.rs): per user, UTC day
-- of the event's own time, and event name, how many events. A batch is counted once: the consumer
-- records its id (the message's ce_id) in processed_events in the same transaction.
CREATE TABLE user_usage (
    owner_id uuid   NOT NULL,
    day      date   NOT NULL,
    name     text   NOT NULL,
    events   bigint NOT NULL,
    PRIMARY KEY (owner_id, day, name)
);
