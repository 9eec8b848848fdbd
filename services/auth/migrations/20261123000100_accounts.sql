-- Accounts, and the refresh tokens of their sessions.

-- Usernames are stored lower-cased, so the unique constraint makes them case-insensitive and
-- settles two simultaneous signups for the same name.
CREATE TABLE users (
    id            uuid        PRIMARY KEY,
    username      text        NOT NULL CONSTRAINT users_username_key UNIQUE,
    password_hash text        NOT NULL,
    nickname      text,
    avatar_url    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT users_username_format CHECK (username ~ '^[a-z0-9][a-z0-9_.-]{2,29}$'),
    CONSTRAINT users_nickname_length CHECK (char_length(nickname) BETWEEN 1 AND 30),
    CONSTRAINT users_avatar_url_length CHECK (char_length(avatar_url) <= 200)
);

-- One family per login session. Every refresh token of a session belongs to its family, so
-- presenting an already-rotated token (a sign it was stolen) revokes the whole session.
CREATE TABLE refresh_token_families (
    id             uuid        PRIMARY KEY,
    user_id        uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at     timestamptz,
    revoked_reason text
);
CREATE INDEX refresh_token_families_user_id_idx ON refresh_token_families (user_id);

-- Only a SHA-256 of each token is kept: a copy of this table cannot be used to log in.
CREATE TABLE refresh_tokens (
    token_hash bytea       PRIMARY KEY,
    family_id  uuid        NOT NULL REFERENCES refresh_token_families (id) ON DELETE CASCADE,
    issued_at  timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    -- Set when the token is rotated; presenting it again afterwards is reuse.
    used_at    timestamptz
);
CREATE INDEX refresh_tokens_family_id_idx ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_expires_at_idx ON refresh_tokens (expires_at);
