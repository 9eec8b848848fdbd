-- Users whose access tokens are refused although they have not expired: deleted accounts (see
-- service_kit::revoked_users). Only a SHA-256 of the user id is kept, until the last token
-- issued to the user has expired.
CREATE TABLE revoked_users (
    user_hash    bytea       PRIMARY KEY,
    revoked_at   timestamptz NOT NULL,
    forget_after timestamptz NOT NULL
);
