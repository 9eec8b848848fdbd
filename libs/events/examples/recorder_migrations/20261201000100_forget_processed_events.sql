-- What housekeeping forgets processed event ids by (see the consumer library): rows arrive in
-- time order, so a BRIN index is tiny and cheap to keep up to date.
CREATE INDEX processed_events_processed_at_idx ON processed_events USING brin (processed_at);
