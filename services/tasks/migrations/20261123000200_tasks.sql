-- Tasks: the current state of each task, its append-only revision history, the label index and
-- remembered idempotency keys. Every write touches them in one transaction.

-- The current state: what GET and the list read, so "latest" never needs a scan of history.
-- Ids are UUIDv7 (time-ordered): newest first is `ORDER BY id DESC`, and keyset pagination
-- continues with `id < <last id seen>`.
CREATE TABLE tasks (
    id          uuid        PRIMARY KEY,
    owner_id    uuid        NOT NULL,
    title       text        NOT NULL,
    description text,
    status      text        NOT NULL,
    priority    text        NOT NULL,
    due_at      timestamptz,
    labels      text[]      NOT NULL DEFAULT '{}',
    -- 1 when created, +1 on every change: the ETag, and what If-Match is compared with.
    version     bigint      NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    CONSTRAINT tasks_title_length CHECK (char_length(title) BETWEEN 1 AND 200),
    CONSTRAINT tasks_description_size CHECK (octet_length(description) <= 10240),
    CONSTRAINT tasks_status_known CHECK (status IN ('todo', 'in_progress', 'blocked', 'done')),
    CONSTRAINT tasks_priority_known CHECK (priority IN ('low', 'medium', 'high', 'urgent')),
    CONSTRAINT tasks_labels_count CHECK (cardinality(labels) <= 20)
);
-- The list, newest first, per owner; and the same under each filter.
CREATE INDEX tasks_owner_newest_idx ON tasks (owner_id, id DESC);
CREATE INDEX tasks_owner_status_newest_idx ON tasks (owner_id, status, id DESC);
CREATE INDEX tasks_owner_due_idx ON tasks (owner_id, due_at) WHERE due_at IS NOT NULL;

-- One row per (task, label), so "tasks with label X, newest first" is an index range scan.
CREATE TABLE task_labels (
    owner_id uuid NOT NULL,
    label    text NOT NULL,
    task_id  uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    PRIMARY KEY (owner_id, label, task_id)
);
CREATE INDEX task_labels_task_id_idx ON task_labels (task_id);

-- Every change ever made, never rewritten: who, when, and each changed field's old and new value.
-- No foreign key to tasks: the history outlives a deleted task.
CREATE TABLE task_revisions (
    task_id    uuid        NOT NULL,
    version    bigint      NOT NULL,
    owner_id   uuid        NOT NULL,
    actor_id   uuid        NOT NULL,
    kind       text        NOT NULL CHECK (kind IN ('created', 'updated', 'deleted')),
    changes    jsonb       NOT NULL,
    changed_at timestamptz NOT NULL,
    PRIMARY KEY (task_id, version)
);

-- History is append-only: rewriting a revision is refused by the database itself.
CREATE FUNCTION task_revisions_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'task_revisions is append-only';
END $$;
CREATE TRIGGER task_revisions_no_update BEFORE UPDATE ON task_revisions
    FOR EACH ROW EXECUTE FUNCTION task_revisions_append_only();

-- A POST with an Idempotency-Key claims the key in the task's transaction; a retry with the
-- same key and body gets the stored first answer. Keys are forgotten after a day.
CREATE TABLE idempotency_keys (
    owner_id     uuid        NOT NULL,
    key          text        NOT NULL,
    request_hash bytea       NOT NULL,
    task_id      uuid        NOT NULL,
    response     jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner_id, key)
);
CREATE INDEX idempotency_keys_created_at_idx ON idempotency_keys (created_at);
