-- A description's limit counts characters (10,240), as the API and its OpenAPI document say
-- (JSON Schema's maxLength cannot count bytes). Every description the byte limit let in has at
-- most 10,240 characters, so the new rule holds for all rows: added NOT VALID here (no scan
-- under the table lock) and validated in the next migration, which only reads.
ALTER TABLE tasks
    DROP CONSTRAINT tasks_description_size,
    ADD CONSTRAINT tasks_description_length CHECK (char_length(description) <= 10240) NOT VALID;
