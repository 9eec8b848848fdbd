-- What housekeeping finds sessions to delete by (old ones with no token left).
CREATE INDEX refresh_token_families_created_at_idx ON refresh_token_families (created_at);
