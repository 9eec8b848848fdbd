-- notifications, part 2: due-date reminders, the inbox, and Web Push to devices
-- (src/domain/{reminders, inbox, preferences, devices, push}.rs).

-- The transactional outbox (libs/events): `notifications.notification.v1` events are written
-- here in the transaction that creates the notification; the relay publishes them in order.
CREATE TABLE outbox (
    position     bigserial   PRIMARY KEY,
    event_id     uuid        NOT NULL UNIQUE,
    topic        text        NOT NULL,
    message_key  text        NOT NULL,
    event_type   text        NOT NULL,
    source       text        NOT NULL,
    subject      text        NOT NULL,
    occurred_at  timestamptz NOT NULL,
    traceparent  text,
    payload      json        NOT NULL,
    published_at timestamptz
);
CREATE INDEX outbox_unpublished_idx ON outbox (position) WHERE published_at IS NULL;
CREATE INDEX outbox_published_at_idx ON outbox (published_at) WHERE published_at IS NOT NULL;

-- What each user wants: per kind `push` (inbox and devices), `inbox` (inbox only) or `off`;
-- how long before a due date "due soon" fires; quiet hours (push held until they end), a local
-- time window in an IANA time zone. No row: the defaults.
CREATE TABLE notification_preferences (
    user_id               uuid    PRIMARY KEY,
    due_soon              text    NOT NULL CHECK (due_soon IN ('push', 'inbox', 'off')),
    overdue               text    NOT NULL CHECK (overdue IN ('push', 'inbox', 'off')),
    reminder_lead_minutes integer NOT NULL CHECK (reminder_lead_minutes BETWEEN 1 AND 10080),
    quiet_start           time,
    quiet_end             time,
    time_zone             text,
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CHECK ((quiet_start IS NULL) = (quiet_end IS NULL) AND (quiet_start IS NULL) = (time_zone IS NULL))
);

-- The schedule: a "due soon" and an "overdue" reminder per open task with a due date, kept from
-- tasks.task.v1. An instance claims the reminders due within its look-ahead (claimed_by,
-- claim_expires_at; FOR UPDATE SKIP LOCKED), fires each at its time in one transaction that
-- also writes the notification, and sets fired_at. A claim that is not fired before it expires
-- (the instance died) is taken by another. A moved due date sets a new fire_at, clears fired_at
-- and the claim; a cleared due date, a finished or a deleted task deletes the rows.
CREATE TABLE reminders (
    task_id          uuid        NOT NULL,
    kind             text        NOT NULL CHECK (kind IN ('task.due_soon', 'task.overdue')),
    user_id          uuid        NOT NULL,
    title            text        NOT NULL,
    due_at           timestamptz NOT NULL,
    fire_at          timestamptz NOT NULL,
    -- The task version that set the schedule: older events change nothing.
    task_version     bigint      NOT NULL,
    claimed_by       uuid,
    claim_expires_at timestamptz,
    fired_at         timestamptz,
    PRIMARY KEY (task_id, kind)
);
-- What the schedulers claim: the unfired reminders, soonest first.
CREATE INDEX reminders_pending_idx ON reminders (fire_at) WHERE fired_at IS NULL;
CREATE INDEX reminders_user_idx ON reminders (user_id);

-- The inbox. Ids are UUIDv7, so newest first is `id DESC` and the keyset cursor is an id.
CREATE TABLE notifications (
    id         uuid        PRIMARY KEY,
    user_id    uuid        NOT NULL,
    kind       text        NOT NULL,
    task_id    uuid,
    title      text        NOT NULL,
    body       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    read_at    timestamptz
);
CREATE INDEX notifications_user_idx ON notifications (user_id, id DESC);
CREATE INDEX notifications_unread_idx ON notifications (user_id, id) WHERE read_at IS NULL;

-- Mark-all-read is one write: everything up to `read_through` counts as read.
CREATE TABLE inbox_watermarks (
    user_id      uuid PRIMARY KEY,
    read_through uuid NOT NULL
);

-- Web Push subscriptions as browsers hand them out. An endpoint belongs to whoever registered
-- it last (one browser profile, another account).
CREATE TABLE push_subscriptions (
    id         uuid        PRIMARY KEY,
    user_id    uuid        NOT NULL,
    endpoint   text        NOT NULL UNIQUE,
    p256dh     bytea       NOT NULL,
    auth       bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX push_subscriptions_user_idx ON push_subscriptions (user_id);

-- One row per notification and device: pending until the push service accepted it (sent), or
-- it failed for good. Claimed like the reminders, so a crash loses none (a claim that expires
-- is sent again; `Topic` lets the push service replace the copy it may already hold).
CREATE TABLE push_deliveries (
    id              uuid        PRIMARY KEY,
    notification_id uuid        NOT NULL REFERENCES notifications ON DELETE CASCADE,
    subscription_id uuid        NOT NULL REFERENCES push_subscriptions ON DELETE CASCADE,
    state           text        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'failed')),
    urgency         text        NOT NULL CHECK (urgency IN ('very-low', 'low', 'normal', 'high')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL,
    claimed_until   timestamptz,
    last_status     integer,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);
CREATE INDEX push_deliveries_due_idx ON push_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX push_deliveries_notification_idx ON push_deliveries (notification_id);
CREATE INDEX push_deliveries_subscription_idx ON push_deliveries (subscription_id);
CREATE INDEX push_deliveries_finished_at_idx ON push_deliveries USING brin (finished_at);
