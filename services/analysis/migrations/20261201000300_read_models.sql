-- analysis's read models, built from tasks.task.v1 and auth.user.v1 (src/domain). Nothing here is
-- computed at read time by scanning: every answer reads a bounded number of rows through an index.

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

-- One row per task ever seen: its analysis as JSON (domain::TaskModel), and beside it the columns
-- the reads select by. A deleted task stays as a tombstone (`deleted`, no model), so an older event
-- replayed later cannot bring it back.
CREATE TABLE task_analysis (
    task_id    uuid    PRIMARY KEY,
    owner_id   uuid    NOT NULL,
    version    bigint  NOT NULL,
    deleted    boolean NOT NULL DEFAULT false,
    -- The due date while the task is open (not done, not deleted): what "overdue now" counts.
    open_due_at timestamptz,
    model      jsonb
);
-- Export and erasure walk a user's tasks in id order.
CREATE INDEX task_analysis_owner_idx ON task_analysis (owner_id, task_id);
-- "Overdue now": a range of one user's open due dates.
CREATE INDEX task_analysis_open_due_idx ON task_analysis (owner_id, open_due_at)
    WHERE open_due_at IS NOT NULL;

-- Per user, how many live tasks have each status and priority (at most 16 rows a user).
CREATE TABLE user_task_counts (
    owner_id uuid   NOT NULL,
    status   text   NOT NULL,
    priority text   NOT NULL,
    tasks    bigint NOT NULL,
    PRIMARY KEY (owner_id, status, priority)
);

-- Per user and UTC day, tasks created that day and tasks whose current completion fell on it
-- (reopening a task takes its completion back). Weekly throughput is summed from these.
CREATE TABLE user_days (
    owner_id  uuid   NOT NULL,
    day       date   NOT NULL,
    created   bigint NOT NULL DEFAULT 0,
    completed bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (owner_id, day)
);

-- Per user, completed tasks' cycle times as a histogram with buckets about 9% wide
-- (domain::cycle_bucket): percentiles read at most a few hundred rows, never the tasks.
CREATE TABLE user_cycle_times (
    owner_id uuid     NOT NULL,
    bucket   smallint NOT NULL,
    tasks    bigint   NOT NULL,
    PRIMARY KEY (owner_id, bucket)
);

-- Per user, the newest event applied: the dashboard's `as_of`.
CREATE TABLE user_as_of (
    owner_id  uuid        PRIMARY KEY,
    event_at  timestamptz NOT NULL,
    topic     text        NOT NULL,
    partition integer     NOT NULL,
    "offset"  bigint      NOT NULL
);

-- Accounts that were deleted: their read models are gone, and events about them that arrive
-- later (tasks' own `task.deleted` for each erased task, a replay) are not applied. Only a SHA-256
-- of the id, forgotten after 8 days: by then the topics (7 days' retention) no longer hold any of
-- the account's events.
CREATE TABLE erased_users (
    user_hash bytea       PRIMARY KEY,
    erased_at timestamptz NOT NULL
);
CREATE INDEX erased_users_erased_at_idx ON erased_users USING brin (erased_at);
