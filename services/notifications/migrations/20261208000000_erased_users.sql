-- Accounts erased here (service_kit::erased_users): a write about a user takes the user's
-- erasure lock shared and finds the tombstone, so events, reminders and requests that come after
-- the erasure (a partition behind it, a token verified just before the refusal) leave nothing.
-- Only a SHA-256 of the id, forgotten after 8 days: by then the topics hold none of its events.
CREATE TABLE erased_users (
    user_hash bytea       PRIMARY KEY,
    erased_at timestamptz NOT NULL
);
CREATE INDEX erased_users_erased_at_idx ON erased_users USING brin (erased_at);
