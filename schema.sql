-- piDeploy schema. Applied at every start inside one transaction under an
-- advisory lock, so it must stay idempotent: IF NOT EXISTS, OR REPLACE.
-- Bump schema_version below when this file changes shape. Needs PostgreSQL 14+.

CREATE TABLE IF NOT EXISTS schema_version (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS instance (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id text NOT NULL CHECK (user_id ~ '^[A-Za-z0-9_.@-]{1,128}$'),
    name text NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    status text NOT NULL DEFAULT 'creating'
        CHECK (status IN ('creating', 'running', 'stopped', 'updating', 'deleting', 'error')),
    image text NOT NULL,
    container_id text,
    port integer CHECK (port BETWEEN 1024 AND 65535),
    config jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(config) = 'object'),
    storage_path text,
    recovery_failures integer NOT NULL DEFAULT 0 CHECK (recovery_failures >= 0),
    next_recovery_at timestamptz,   -- heartbeat: no restart attempt before this
    healthy_since timestamptz,      -- heartbeat: resets recovery_failures after a while
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, name)
);
-- The secret half of the instance's route key (`/i/<id>-<route_token>/`, proxy.route_key):
-- ids are sequential, so without it anyone could walk every instance's route. Rows from
-- before this column get one of their own (a volatile default is evaluated per row).
ALTER TABLE instance ADD COLUMN IF NOT EXISTS route_token text NOT NULL
    DEFAULT replace(gen_random_uuid()::text, '-', '') CHECK (route_token ~ '^[0-9a-f]{32}$');
-- A host port belongs to at most one instance; deleted instances are deleted rows.
CREATE UNIQUE INDEX IF NOT EXISTS instance_port_unique ON instance (port) WHERE port IS NOT NULL;
CREATE INDEX IF NOT EXISTS instance_user ON instance (user_id);

CREATE TABLE IF NOT EXISTS task (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    type text NOT NULL CHECK (type IN ('instance_create', 'instance_start', 'instance_stop',
                                       'instance_delete', 'instance_update', 'heartbeat')),
    params jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(params) = 'object'),
    status text NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    -- SET NULL: a finished delete task outlives its instance row.
    instance_id bigint REFERENCES instance (id) ON DELETE SET NULL,
    user_id text NOT NULL CHECK (user_id ~ '^[A-Za-z0-9_.@-]{1,128}$'),
    result jsonb,
    error_class text,
    last_error text,
    attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts integer NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    locked_by text,
    lease_expires_at timestamptz,
    cancel_requested boolean NOT NULL DEFAULT false,
    dedupe_key text,
    trace_file text,
    turns integer,
    cost_usd double precision,
    duration_s double precision,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz,
    CHECK ((status = 'running') = (locked_by IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CHECK ((status IN ('succeeded', 'failed', 'cancelled')) = (finished_at IS NOT NULL))
);
-- One unfinished task per dedupe key: a repeated submission finds the first.
CREATE UNIQUE INDEX IF NOT EXISTS task_dedupe_unfinished ON task (dedupe_key)
    WHERE status IN ('queued', 'running') AND dedupe_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS task_unfinished ON task (id) WHERE status IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS task_instance_unfinished ON task (instance_id, id)
    WHERE status IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS task_user ON task (user_id, id);

-- Wake idle workers at once; polling stays as the backstop.
CREATE OR REPLACE FUNCTION task_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'queued' THEN
        PERFORM pg_notify('pideploy_task', NEW.id::text);
    END IF;
    RETURN NEW;
END $$;
CREATE OR REPLACE TRIGGER task_notify AFTER INSERT OR UPDATE OF status ON task
    FOR EACH ROW EXECUTE FUNCTION task_notify();

-- Append-only history of everything that changes an instance. No foreign key
-- on instance_id on purpose: the history stays after the instance is deleted.
CREATE TABLE IF NOT EXISTS event (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id bigint,
    user_id text,
    task_id bigint REFERENCES task (id) ON DELETE SET NULL,
    kind text NOT NULL CHECK (kind ~ '^[a-z_]{1,64}$'),
    detail jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(detail) = 'object'),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS event_instance ON event (instance_id, id);

CREATE OR REPLACE FUNCTION event_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'event is append-only';
END $$;
CREATE OR REPLACE TRIGGER event_append_only BEFORE UPDATE OR DELETE ON event
    FOR EACH ROW EXECUTE FUNCTION event_append_only();

-- A model that keeps failing is skipped until `until`, across runs and processes.
CREATE TABLE IF NOT EXISTS model_cooldown (
    model text PRIMARY KEY,
    until timestamptz NOT NULL,
    reason text NOT NULL DEFAULT ''
);

-- One row per heartbeat round (serve or cron), for /metrics and operators.
CREATE TABLE IF NOT EXISTS heartbeat_round (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now(),
    duration_s double precision NOT NULL DEFAULT 0,
    drifts integer NOT NULL DEFAULT 0,
    repaired integer NOT NULL DEFAULT 0,
    unrepaired integer NOT NULL DEFAULT 0,
    cost_usd double precision NOT NULL DEFAULT 0,
    source text NOT NULL DEFAULT 'serve',
    trace_file text
);

INSERT INTO schema_version (version) VALUES (1), (2) ON CONFLICT DO NOTHING;
